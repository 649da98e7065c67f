"""Optimizer descriptions: torch's names and defaults, and every hyperparameter validated."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import pytest
import torch

from paramserver import _core, optim

PAIRS = [(optim.SGD, torch.optim.SGD), (optim.Adagrad, torch.optim.Adagrad),
         (optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)]
# torch arguments that choose an implementation (or, for Adam's decoupled_weight_decay, a different
# optimizer: paramserver spells that AdamW), not a hyperparameter of the update.
TORCH_ONLY = {"params", "foreach", "fused", "capturable", "differentiable",
              "decoupled_weight_decay"}

NONNEGATIVE = {"lr", "momentum", "weight_decay", "lr_decay", "initial_accumulator_value", "eps"}
BAD_NONNEGATIVE = [-1e-9, -1.0, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_signature_matches_torch(ours: type[optim.Optimizer], theirs: type) -> None:
    mine = list(inspect.signature(ours).parameters.values())
    torch_params = [p for p in inspect.signature(theirs).parameters.values()
                    if p.name not in TORCH_ONLY]
    assert [p.name for p in mine] == [p.name for p in torch_params]
    for a, b in zip(mine, torch_params):
        assert a.default == b.default, f"{ours.__name__}({a.name}): {a.default!r} != {b.default!r}"
        assert a.kind == b.kind, f"{ours.__name__}({a.name}) is {a.kind}, torch's is {b.kind}"
    # The descriptions list exactly these names, in this order.
    assert ours._fields == tuple(p.name for p in mine)
    assert ours().hyperparameters() == {p.name: p.default for p in torch_params}


def _numeric_fields(cls: type[optim.Optimizer]) -> list[str]:
    return [f for f in cls._fields if f in NONNEGATIVE]


def _cases() -> list[tuple[type[optim.Optimizer], str, Any]]:
    out = []
    for cls, _ in PAIRS:
        for field in _numeric_fields(cls):
            out += [(cls, field, v) for v in BAD_NONNEGATIVE]
    return out


@pytest.mark.parametrize("cls,field,value", _cases())
def test_bad_hyperparameter_is_a_value_error_naming_it(cls: type[optim.Optimizer], field: str,
                                                        value: float) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}=") as info:
        cls(**{field: value})
    assert repr(float(value)) in str(info.value)


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
@pytest.mark.parametrize("index,value", [(0, 1.0), (0, -0.1), (0, math.nan), (1, 1.0), (1, 1.5),
                                         (1, -1e-9), (1, math.inf)])
def test_bad_beta_names_its_index(cls: type[optim.Optimizer], index: int, value: float) -> None:
    betas = [0.9, 0.999]
    betas[index] = value
    with pytest.raises(ValueError, match=re.escape(f"betas[{index}]=")):
        cls(betas=tuple(betas))


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999), 0.9, None])
def test_betas_must_be_a_pair(cls: type[optim.Optimizer], betas: Any) -> None:
    with pytest.raises(ValueError, match="betas must be a pair"):
        cls(betas=betas)


def test_edges_are_accepted() -> None:
    # The closed ends of each range are valid, as in torch.
    assert optim.SGD(lr=0.0, momentum=0.0, weight_decay=0.0).lr == 0.0
    assert optim.SGD(momentum=0.9, dampening=-0.5).dampening == -0.5  # torch does not bound it
    assert optim.Adagrad(eps=0.0, lr_decay=0.0).eps == 0.0
    assert optim.Adam(betas=(0.0, 0.0), eps=0.0).betas == (0.0, 0.0)
    assert optim.AdamW(lr=1, weight_decay=0).lr == 1.0  # ints become floats
    assert isinstance(optim.AdamW(lr=1).lr, float)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_dampening_must_be_finite(value: float) -> None:
    with pytest.raises(ValueError, match=r"\bdampening="):
        optim.SGD(momentum=0.9, dampening=value)


@pytest.mark.parametrize("kwargs", [dict(nesterov=True), dict(nesterov=True, momentum=0.0),
                                    dict(nesterov=True, momentum=0.9, dampening=0.1)])
def test_nesterov_needs_momentum_and_no_dampening(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(**kwargs)


@pytest.mark.parametrize("cls,field", [(cls, f) for cls, _ in PAIRS for f in cls._fields
                                       if f != "betas"])
@pytest.mark.parametrize("value", ["0.1", None, [0.1]])
def test_wrong_type_is_a_type_error_naming_it(cls: type[optim.Optimizer], field: str,
                                              value: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{field} must be a"):
        cls(**{field: value})


@pytest.mark.parametrize("cls", [c for c, _ in PAIRS])
def test_numbers_reject_bools_and_flags_reject_numbers(cls: type[optim.Optimizer]) -> None:
    with pytest.raises(TypeError, match="^lr must be a number"):
        cls(lr=True)
    with pytest.raises(TypeError, match="^maximize must be a bool"):
        cls(maximize=1)


def test_core_validate_rechecks_every_kind() -> None:
    """The C++ core re-validates, so a direct caller of _core cannot build a bad table either."""
    for kind, field, value in [(_core.OptimizerKind.SGD, "lr", -1.0),
                               (_core.OptimizerKind.SGD, "momentum", math.nan),
                               (_core.OptimizerKind.Adagrad, "lr_decay", -1.0),
                               (_core.OptimizerKind.Adagrad, "initial_accumulator_value", -1.0),
                               (_core.OptimizerKind.Adagrad, "eps", math.inf),
                               (_core.OptimizerKind.Adam, "beta1", 1.0),
                               (_core.OptimizerKind.AdamW, "beta2", -0.5),
                               (_core.OptimizerKind.AdamW, "weight_decay", -1.0)]:
        config = _core.OptimizerConfig()
        config.kind = kind
        setattr(config, field, value)
        with pytest.raises(ValueError, match=field):
            _core.validate(config)
        with pytest.raises(ValueError, match=field):
            _core.DenseTable(10, 4, config)
    config = _core.OptimizerConfig()
    config.kind = _core.OptimizerKind.SGD
    config.nesterov = True
    with pytest.raises(ValueError, match="nesterov"):
        _core.validate(config)


@pytest.mark.parametrize("opt", [optim.SGD(lr=0.5, momentum=0.9, nesterov=True, maximize=True),
                                 optim.Adagrad(lr_decay=0.1, initial_accumulator_value=0.3),
                                 optim.Adam(betas=(0.5, 0.6), amsgrad=True, weight_decay=0.2),
                                 optim.AdamW(eps=1e-6)])
def test_config_and_dict_round_trip(opt: optim.Optimizer) -> None:
    config = opt.to_config()
    assert config.kind == opt.kind
    for name, value in opt.hyperparameters().items():
        if name == "betas":
            assert (config.beta1, config.beta2) == value
        else:
            assert getattr(config, name) == value
    again = optim.optimizer_from_dict(opt.to_dict())
    assert again == opt and hash(again) == hash(opt) and again is not opt
    with pytest.raises(AttributeError, match="immutable"):
        opt.lr = 1.0  # type: ignore[misc]


def test_num_slots() -> None:
    assert optim.SGD().num_slots == 0
    assert optim.SGD(momentum=0.9).num_slots == 1
    assert optim.Adagrad().num_slots == 1
    assert optim.Adam().num_slots == 2
    assert optim.AdamW(amsgrad=True).num_slots == 3


def test_from_dict_rejects_unknown_and_malformed() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.optimizer_from_dict({"name": "Lion"})
    with pytest.raises(ValueError, match="bad Adam description"):
        optim.optimizer_from_dict({"name": "Adam", "momentum": 0.9})
