"""Optimizers applied by the servers, with the semantics of ``torch.optim``.

An optimizer here is a *description*: a small immutable value that a worker passes when it declares
a table. The servers apply it in the C++ core, one step per push, block by block (dense tables) or
row by row (embedding tables), each with its own state and step count. Argument names, defaults and
update rules are torch's (the single-tensor path of torch 2.x), and the tests hold the core to
``torch.optim`` step by step. The core also rounds like torch: it performs torch's operations in
torch's order, fusing a multiply and an add exactly where ATen does, so SGD agrees bit for bit and
Adagrad/Adam differ only where torch's vectorized sqrt is one ulp off.

Every hyperparameter is validated in ``__init__``; a bad one raises :class:`ValueError` naming it.
Instances are immutable, hashable and compare by value, so two workers declaring the same table with
equal optimizers attach to one table.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from paramserver import _core
from paramserver._frozen import FrozenValue

__all__ = ["Optimizer", "SGD", "Adagrad", "Adam", "AdamW", "FedAdam", "FedAdagrad",
           "optimizer_from_dict"]


def _number(name: str, value: Any, *, label: str | None = None, low: float = 0.0,
            high: float = math.inf, high_open: bool = False) -> float:
    """``value`` as a float, or an error naming the argument ``name`` (and torch's ``label``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < low or number > high or (high_open and number >= high):
        bound = f"in [{low}, {high})" if high_open else f">= {low}"
        raise ValueError(f"Invalid {label or name}: {name}={number!r} (must be finite and {bound})")
    return number


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


class Optimizer(FrozenValue):
    """Base class of the optimizer descriptions. Not instantiated directly."""

    #: The core's optimizer kind; set by each subclass.
    kind: ClassVar[_core.OptimizerKind]
    #: Names of the constructor's hyperparameters, in order (``betas`` is one name).
    _fields: ClassVar[tuple[str, ...]]

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters as a dict of torch's argument names (``betas`` as a tuple)."""
        return self._values()

    def flat_hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters with ``betas`` split into ``beta1`` and ``beta2``: the field names
        of the core's OptimizerConfig and of the wire's OptimizerSpec."""
        out = self.hyperparameters()
        if "betas" in out:
            out["beta1"], out["beta2"] = out.pop("betas")
        return out

    def to_config(self) -> _core.OptimizerConfig:
        """The core's configuration object for this optimizer."""
        config = _core.OptimizerConfig()
        config.kind = self.kind
        for name, value in self.flat_hyperparameters().items():
            setattr(config, name, value)
        return config

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serializable description: ``{"name": "Adam", "lr": ..., ...}``."""
        out: dict[str, Any] = {"name": type(self).__name__}
        for name, value in self.hyperparameters().items():
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def num_slots(self) -> int:
        """Float32 state values the optimizer keeps per parameter element."""
        return _core.num_slots(self.to_config())



class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with momentum (``torch.optim.SGD``).

    For gradient :math:`g_t` of parameter :math:`\theta` at step :math:`t` (1-based)::

        g = -g_t if maximize else g_t
        g = g + weight_decay * theta                      # if weight_decay != 0
        if momentum != 0:
            b = g                       if t == 1         # no dampening on the first step
            b = momentum * b + (1 - dampening) * g        otherwise
            g = g + momentum * b        if nesterov else b
        theta = theta - lr * g

    Args:
        lr: learning rate (default 1e-3, torch's).
        momentum: momentum factor (default 0).
        dampening: dampening for momentum (default 0).
        weight_decay: L2 penalty (default 0).
        nesterov: Nesterov momentum; requires momentum > 0 and dampening == 0.
        maximize: ascend the objective instead of descending it.

    State per element: the momentum buffer when momentum != 0, else none.
    """

    kind = _core.OptimizerKind.SGD
    _fields = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")

    def __init__(self, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False) -> None:
        lr = _number("lr", lr, label="learning rate")
        momentum = _number("momentum", momentum)
        dampening = _number("dampening", dampening, low=-math.inf)
        weight_decay = _number("weight_decay", weight_decay)
        nesterov = _flag("nesterov", nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Nesterov momentum requires momentum > 0 and dampening == 0, got "
                f"momentum={momentum}, dampening={dampening}")
        self._set(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                  nesterov=nesterov, maximize=_flag("maximize", maximize))


class Adagrad(Optimizer):
    r"""Adagrad (``torch.optim.Adagrad``).

    At step :math:`t` (1-based)::

        g = -g_t if maximize else g_t
        g = g + weight_decay * theta                      # if weight_decay != 0
        clr = lr / (1 + (t - 1) * lr_decay)
        s = s + g * g                                     # s starts at initial_accumulator_value
        theta = theta - clr * g / (sqrt(s) + eps)

    Args:
        lr: learning rate (default 1e-2).
        lr_decay: learning-rate decay per step (default 0).
        weight_decay: L2 penalty (default 0).
        initial_accumulator_value: starting value of the sum of squares (default 0).
        eps: added to the denominator (default 1e-10).
        maximize: ascend the objective instead of descending it.

    State per element: the sum of squared gradients.
    """

    kind = _core.OptimizerKind.Adagrad
    _fields = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize")

    def __init__(self, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *,
                 maximize: bool = False) -> None:
        self._set(lr=_number("lr", lr, label="learning rate"),
                  lr_decay=_number("lr_decay", lr_decay),
                  weight_decay=_number("weight_decay", weight_decay),
                  initial_accumulator_value=_number("initial_accumulator_value",
                                                    initial_accumulator_value),
                  eps=_number("eps", eps, label="epsilon value"),
                  maximize=_flag("maximize", maximize))


class _AdamBase(Optimizer):
    _fields = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")

    def __init__(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 amsgrad: bool, maximize: bool) -> None:
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        betas = (_number("betas[0]", beta1, label="beta parameter at index 0", high=1.0,
                         high_open=True),
                 _number("betas[1]", beta2, label="beta parameter at index 1", high=1.0,
                         high_open=True))
        self._set(lr=_number("lr", lr, label="learning rate"), betas=betas,
                  eps=_number("eps", eps, label="epsilon value"),
                  weight_decay=_number("weight_decay", weight_decay),
                  amsgrad=_flag("amsgrad", amsgrad), maximize=_flag("maximize", maximize))


class Adam(_AdamBase):
    r"""Adam (``torch.optim.Adam``), with L2 weight decay added to the gradient.

    At step :math:`t` (1-based; each block or embedding row counts its own steps)::

        g = -g_t if maximize else g_t
        g = g + weight_decay * theta                      # if weight_decay != 0
        m = m + (1 - beta1) * (g - m)                     # torch's lerp
        v = beta2 * v + (1 - beta2) * g * g
        vmax = max(vmax, v)                               # if amsgrad; then v := vmax below
        denom = sqrt(v) / sqrt(1 - beta2 ** t) + eps
        theta = theta - lr / (1 - beta1 ** t) * m / denom

    Args:
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2), each in [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: L2 penalty (default 0).
        amsgrad: use the maximum of past second moments (default False).
        maximize: ascend the objective instead of descending it.

    State per element: exp_avg, exp_avg_sq (and max_exp_avg_sq with amsgrad).
    """

    kind = _core.OptimizerKind.Adam

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize)


class AdamW(_AdamBase):
    r"""AdamW (``torch.optim.AdamW``): Adam with decoupled weight decay.

    As :class:`Adam`, except that the gradient gets no L2 term and instead, before the update::

        theta = theta * (1 - lr * weight_decay)

    Args:
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2), each in [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2, torch's).
        amsgrad: use the maximum of past second moments (default False).
        maximize: ascend the objective instead of descending it.
    """

    kind = _core.OptimizerKind.AdamW

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize)


class FedAdam(Optimizer):
    r"""The FedAdam server optimizer of adaptive federated optimization (Reddi et al., ICLR 2021,
    Algorithm 2), for the tables of a federated job (see docs/federated.md).

    A federated round gives each table one pseudo-gradient ``g = -Delta``, minus the
    example-weighted mean of the participants' model deltas. With ``t`` the round::

        m = beta1 * m + (1 - beta1) * g                   # (the core computes it as a lerp)
        v = beta2 * v + (1 - beta2) * g * g
        theta = theta - lr * m / (sqrt(v) + tau)          # no bias correction, as in the paper

    which is the paper's ``x += eta * m_t / (sqrt(v_t) + tau)`` with ``eta = lr`` and its
    ``m_t`` the negative of ``m`` here. It is Adam without bias correction, applied by the same
    core kernels.

    Args:
        lr: server learning rate ``eta`` (default 1e-2).
        betas: (beta1, beta2), each in [0, 1) (default (0.9, 0.99), the paper's).
        tau: adaptivity ``tau`` added to the denominator (default 1e-3, the paper's best range
            is 1e-3 to 1e-1 for most tasks).

    State per element: m and v.
    """

    kind = _core.OptimizerKind.Adam
    _fields = ("lr", "betas", "tau")

    def __init__(self, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99),
                 tau: float = 1e-3) -> None:
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        betas = (_number("betas[0]", beta1, high=1.0, high_open=True),
                 _number("betas[1]", beta2, high=1.0, high_open=True))
        tau = _number("tau", tau)
        if tau <= 0:
            raise ValueError(f"Invalid tau: tau={tau!r} (must be > 0: it keeps the update "
                             f"finite where v is 0)")
        self._set(lr=_number("lr", lr, label="learning rate"), betas=betas, tau=tau)

    def flat_hyperparameters(self) -> dict[str, Any]:
        """The core's (and the wire's) Adam fields: ``tau`` is ``eps``, bias correction off."""
        values = self.hyperparameters()
        return {"lr": values["lr"], "beta1": values["betas"][0], "beta2": values["betas"][1],
                "eps": values["tau"]}

    def to_config(self) -> _core.OptimizerConfig:
        """The core's configuration: Adam without bias correction."""
        config = super().to_config()
        config.bias_correction = False
        return config


def FedAdagrad(lr: float = 1e-2, tau: float = 1e-3) -> Adagrad:  # noqa: N802 (reads as a class)
    r"""The FedAdagrad server optimizer (Reddi et al., ICLR 2021): with the round's
    pseudo-gradient ``g = -Delta``, ``v = v + g * g`` and ``theta = theta - lr * g / (sqrt(v) +
    tau)``, ``v`` starting at ``tau ** 2`` (the paper's ``v_{-1} >= tau^2``). It is exactly
    :class:`Adagrad` with ``eps=tau`` and ``initial_accumulator_value=tau ** 2``, which this
    returns.

    Args:
        lr: server learning rate ``eta`` (default 1e-2).
        tau: adaptivity ``tau`` (default 1e-3; > 0).
    """
    tau = _number("tau", tau)
    if tau <= 0:
        raise ValueError(f"Invalid tau: tau={tau!r} (must be > 0)")
    return Adagrad(lr=lr, eps=tau, initial_accumulator_value=tau * tau)


_BY_NAME: dict[str, type[Optimizer]] = {cls.__name__: cls
                                        for cls in (SGD, Adagrad, Adam, AdamW, FedAdam)}


def optimizer_from_dict(description: dict[str, Any]) -> Optimizer:
    """Rebuild an optimizer from :meth:`Optimizer.to_dict` output; ``ValueError`` if malformed."""
    values = dict(description)
    name = values.pop("name", None)
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(_BY_NAME)}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"bad {name} description {description!r}: {exc}") from None
