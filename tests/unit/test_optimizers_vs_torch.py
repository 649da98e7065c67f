"""The core's optimizers held to ``torch.optim`` step by step.

Every optimizer and each of its hyperparameters runs 100 steps of random gradients on a tensor whose
size is not a multiple of the block size, through a :class:`paramserver._core.DenseTable`, beside
the same optimizer in torch (single-tensor path, ``foreach=False``, also torch's CPU default).
After *every* step the parameters and every optimizer-state slot are compared with

    |core - torch| <= RTOL * |torch| + ATOL_SCALE * max|torch|        (element-wise)

RTOL is the 1e-5 relative bound of the issue. The absolute floor exists because a relative bound
alone is meaningless for elements that pass near zero: such an element is the difference of two
larger numbers, so one ulp of those (one sqrt that rounds differently: torch's vectorized sqrt is
not always correctly rounded) becomes an arbitrarily large relative error of the small result. The
floor is 1e-7 of the tensor's largest magnitude, about one float32 ulp of that element, so it
cannot hide a real difference in any element of normal size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from paramserver import _core, optim

RTOL = 1e-5
ATOL_SCALE = 1e-7
STEPS = 100
NUM_ELEMENTS = 1003  # 7 full blocks of 128 and a ragged one of 107, itself not a multiple of 16
BLOCK_SIZE = 128

# (paramserver optimizer, torch class, torch kwargs): each entry turns on one more hyperparameter.
CASES: list[tuple[optim.Optimizer, type[torch.optim.Optimizer], dict[str, Any]]] = []


def _case(ours: optim.Optimizer, theirs: type[torch.optim.Optimizer]) -> None:
    kwargs = ours.hyperparameters()
    CASES.append((ours, theirs, kwargs))


for _kw in [dict(lr=0.1), dict(lr=0.1, weight_decay=0.05), dict(lr=0.05, momentum=0.9),
            dict(lr=0.05, momentum=0.9, dampening=0.3),
            dict(lr=0.05, momentum=0.9, nesterov=True),
            dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.1, maximize=True),
            dict(lr=0.05, momentum=0.8, dampening=0.5, weight_decay=0.01, maximize=True),
            dict(lr=0.1, maximize=True)]:
    _case(optim.SGD(**_kw), torch.optim.SGD)
for _kw in [dict(), dict(lr=0.1, lr_decay=0.05), dict(lr=0.1, weight_decay=0.1),
            dict(lr=0.1, initial_accumulator_value=0.5), dict(lr=0.1, eps=1e-3),
            dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1,
                 eps=1e-6, maximize=True)]:
    _case(optim.Adagrad(**_kw), torch.optim.Adagrad)
for _cls, _torch_cls in [(optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)]:
    for _kw in [dict(), dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.0),
                dict(lr=0.01, amsgrad=True), dict(lr=0.01, maximize=True),
                # beta1 < 0.5 takes the other branch of torch's lerp
                dict(lr=0.01, betas=(0.3, 0.9)), dict(lr=0.01, betas=(0.0, 0.5), eps=1e-3),
                dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True,
                     maximize=True)]:
        _case(_cls(**_kw), _torch_cls)


def _supported_isas() -> list[str]:
    native = _core.kernel_isa()
    levels = ["baseline", "x86-64-v3", "x86-64-v4"]
    return levels[:levels.index(native) + 1]


@pytest.fixture(params=_supported_isas())
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each kernel code path this CPU can run (the baseline one rounds without FMA)."""
    native = _core.kernel_isa()
    _core.set_kernel_isa(request.param)
    try:
        yield request.param
    finally:
        _core.set_kernel_isa(native)


def _torch_state(opt: torch.optim.Optimizer, p: torch.Tensor, kind: str) -> list[np.ndarray]:
    state = opt.state[p]
    names = {"SGD": ["momentum_buffer"], "Adagrad": ["sum"],
             "Adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
             "AdamW": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]}[kind]
    return [state[name].numpy() for name in names if name in state and state[name] is not None]


def _assert_close(what: str, step: int, core: np.ndarray, ref: np.ndarray) -> None:
    atol = ATOL_SCALE * float(np.max(np.abs(ref)))
    err = np.abs(core.astype(np.float64) - ref.astype(np.float64))
    bound = RTOL * np.abs(ref.astype(np.float64)) + atol
    bad = np.flatnonzero(err > bound)
    if bad.size:
        i = int(bad[np.argmax(err[bad] - bound[bad])])
        pytest.fail(f"{what} differs from torch after step {step} at element {i}: "
                    f"core {core[i]!r}, torch {ref[i]!r} (|diff| {err[i]:.3g} > "
                    f"bound {bound[i]:.3g}; {bad.size} elements out of bound)")


def _gradients(rng: np.random.Generator, n: int) -> np.ndarray:
    # Mixed magnitudes, so the adaptive optimizers see very different per-element scales.
    scale = rng.choice(np.array([1e-3, 1.0, 10.0]), size=n)
    return (rng.standard_normal(n) * scale).astype(np.float32)


@pytest.mark.parametrize("ours,theirs,kwargs", CASES, ids=[repr(c[0]) for c in CASES])
def test_matches_torch_every_step(ours: optim.Optimizer, theirs: type[torch.optim.Optimizer],
                                  kwargs: dict[str, Any], isa: str) -> None:
    assert _core.kernel_isa() == isa
    rng = np.random.default_rng(1234)
    x0 = rng.standard_normal(NUM_ELEMENTS).astype(np.float32)
    table = _core.DenseTable(NUM_ELEMENTS, BLOCK_SIZE, ours.to_config())
    blocks = np.arange(table.num_blocks, dtype=np.int64)
    assert table.num_blocks == 8 and table.block_length(7) == NUM_ELEMENTS - 7 * BLOCK_SIZE
    table.assign_many(blocks, x0)

    p = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    opt = theirs([p], foreach=False, **kwargs)
    kind = type(ours).__name__

    values = np.empty(NUM_ELEMENTS, np.float32)
    slot = np.empty(NUM_ELEMENTS, np.float32)
    for step in range(1, STEPS + 1):
        g = _gradients(rng, NUM_ELEMENTS)
        # Every update path of the table: one call per block, batched on 1 or 2 threads.
        if step % 3 == 0:
            for b in blocks:
                off = table.block_offset(int(b))
                table.apply(int(b), g[off:off + table.block_length(int(b))])
        else:
            table.apply_many(blocks, g, num_threads=1 + step % 2)
        p.grad = torch.from_numpy(g.copy())
        opt.step()

        table.read_many(blocks, values)
        _assert_close(f"{kind} parameter", step, values, p.detach().numpy())
        ref_slots = _torch_state(opt, p, kind)
        assert table.num_slots == len(ref_slots) == ours.num_slots
        for s, ref in enumerate(ref_slots):
            for b in blocks:
                off, length = table.block_offset(int(b)), table.block_length(int(b))
                table.read_slot(int(b), s, slot[off:off + length])
            _assert_close(f"{kind} slot {s}", step, slot, ref)
    assert all(table.step(int(b)) == STEPS for b in blocks)


def test_sgd_is_bit_exact() -> None:
    """SGD has no sqrt, so with torch's op order and fma placement it matches to the last bit."""
    if _core.kernel_isa() == "baseline" and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        pytest.skip("baseline kernels round like torch's non-FMA build, not like this CPU's torch")
    rng = np.random.default_rng(7)
    ours = optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    table = _core.DenseTable(NUM_ELEMENTS, BLOCK_SIZE, ours.to_config())
    blocks = np.arange(table.num_blocks, dtype=np.int64)
    x0 = rng.standard_normal(NUM_ELEMENTS).astype(np.float32)
    table.assign_many(blocks, x0)
    p = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    opt = torch.optim.SGD([p], foreach=False, **ours.hyperparameters())
    out = np.empty(NUM_ELEMENTS, np.float32)
    for _ in range(20):
        g = _gradients(rng, NUM_ELEMENTS)
        table.apply_many(blocks, g)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    table.read_many(blocks, out)
    np.testing.assert_array_equal(out, p.detach().numpy())


def test_kernel_isa_is_reported_and_selectable() -> None:
    native = _core.kernel_isa()
    assert native in {"x86-64-v4", "x86-64-v3", "baseline"}
    with pytest.raises(ValueError, match="unknown instruction set 'avx9'"):
        _core.set_kernel_isa("avx9")
    if native != "x86-64-v4":
        with pytest.raises(ValueError, match="does not support x86-64-v4"):
            _core.set_kernel_isa("x86-64-v4")
    try:
        _core.set_kernel_isa("baseline")
        assert _core.kernel_isa() == "baseline"
    finally:
        _core.set_kernel_isa(native)
    assert _core.kernel_isa() == native
