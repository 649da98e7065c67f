"""Deterministic initializers for embedding rows (and dense tables).

An initializer is a *description*: a small immutable value a worker passes when it declares a
table, that the servers turn into the C++ core's configuration. A fresh embedding row's values are
a pure function of (initializer, table seed, row id): the same on every server, after every restart
and on every platform, so a row that moves between servers or is recreated after a failure starts
from the same values.

    >>> import paramserver as ps
    >>> ps.init.normal(0.0, 0.01)
    normal(mean=0.0, std=0.01)
    >>> ps.init.uniform(-0.1, 0.1)((4, 8), seed=7).shape    # rows of ids 0..3
    (4, 8)

Calling an initializer with a shape gives exactly what an embedding table with that seed creates
for ids ``0 .. shape[0] - 1`` (rows of ``prod(shape[1:])`` values), so the same objects can
initialize dense tables too.

Random values come from a counter-based generator (splitmix64 of the seed, the id and the element
index) with IEEE double arithmetic only; normal values use the Box-Muller transform. The value of
element ``j`` of a row does not depend on the row's width.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from paramserver import _core
from paramserver._frozen import FrozenValue

__all__ = ["Initializer", "Zeros", "Uniform", "Normal", "zeros", "uniform", "normal",
           "initializer_from_dict"]

_SEED_LIMIT = 1 << 64


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value} (must be finite)")
    return value


class Initializer(FrozenValue):
    """Base class of the initializer descriptions. Not instantiated directly.

    Instances are immutable, hashable and compare by value. Thread safe.
    """

    #: Name used in :meth:`to_dict` and ``repr``; set by each subclass.
    name: ClassVar[str]
    def params(self) -> dict[str, float]:
        """The parameters as a dict of argument names."""
        return self._values()

    def _call_name(self) -> str:
        return self.name  # reads as the factory call: uniform(a=-0.05, b=0.05)

    def to_config(self) -> _core.InitializerConfig:
        """The core's configuration object for this initializer."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serializable description: ``{"name": "normal", "mean": 0.0, "std": 0.01}``."""
        return {"name": self.name, **self.params()}

    def __call__(self, shape: int | tuple[int, ...], seed: int = 0) -> np.ndarray:
        """Values for a tensor of ``shape``: row ``i`` (``shape[0]`` rows of ``prod(shape[1:])``
        values) equals the initial row of id ``i`` in an embedding table with this ``seed``.

        Args:
            shape: a non-negative int or tuple of them. ``()`` and ``(n,)`` are rows of one value.
            seed: the table seed, an int in [0, 2**64).

        Returns:
            A new float32 array of ``shape``. Computed without the GIL.

        Raises:
            TypeError / ValueError: a bad shape or seed.
        """
        dims = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else tuple(shape)
        for d in dims:
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
                raise ValueError(f"shape must be non-negative ints, got {shape!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
                0 <= seed < _SEED_LIMIT):
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        rows = dims[0] if dims else 1
        width = math.prod(dims[1:]) if len(dims) > 1 else 1
        out = np.empty((rows, width), dtype=np.float32)
        if rows and width:
            _core.initialize_rows(self.to_config(), int(seed), np.arange(rows, dtype=np.uint64), out)
        return out.reshape(dims)


class Zeros(Initializer):
    """Every value 0."""

    name = "zeros"

    def to_config(self) -> _core.InitializerConfig:
        config = _core.InitializerConfig()
        config.kind = _core.InitializerKind.Zeros
        return config


class Uniform(Initializer):
    """Values uniform in ``[a, b)`` (float32 rounding may give ``b`` itself, as in torch).

    Args:
        a: lower bound (default -0.05).
        b: upper bound, ``>= a`` (default 0.05).
    """

    name = "uniform"
    _fields = ("a", "b")

    def __init__(self, a: float = -0.05, b: float = 0.05) -> None:
        a, b = _finite("a", a), _finite("b", b)
        if a > b:
            raise ValueError(f"uniform initializer needs a <= b, got a={a}, b={b}")
        self._set(a=a, b=b)

    def to_config(self) -> _core.InitializerConfig:
        config = _core.InitializerConfig()
        config.kind = _core.InitializerKind.Uniform
        config.low, config.high = self.a, self.b
        return config


class Normal(Initializer):
    """Values ``mean + std * z`` with ``z`` standard normal (Box-Muller).

    Args:
        mean: mean (default 0).
        std: standard deviation, ``>= 0`` (default 0.01).
    """

    name = "normal"
    _fields = ("mean", "std")

    def __init__(self, mean: float = 0.0, std: float = 0.01) -> None:
        mean, std = _finite("mean", mean), _finite("std", std)
        if std < 0:
            raise ValueError(f"Invalid std value: {std} (must be >= 0)")
        self._set(mean=mean, std=std)

    def to_config(self) -> _core.InitializerConfig:
        config = _core.InitializerConfig()
        config.kind = _core.InitializerKind.Normal
        config.mean, config.stddev = self.mean, self.std
        return config


def zeros() -> Zeros:
    """Initializer of all-zero rows."""
    return Zeros()


def uniform(a: float = -0.05, b: float = 0.05) -> Uniform:
    """Initializer of rows uniform in ``[a, b)``; see :class:`Uniform`."""
    return Uniform(a, b)


def normal(mean: float = 0.0, std: float = 0.01) -> Normal:
    """Initializer of rows ``N(mean, std**2)``; see :class:`Normal`."""
    return Normal(mean, std)


_BY_NAME: dict[str, type[Initializer]] = {cls.name: cls for cls in (Zeros, Uniform, Normal)}


def initializer_from_dict(description: dict[str, Any]) -> Initializer:
    """Rebuild an initializer from :meth:`Initializer.to_dict` output; ``ValueError`` if malformed."""
    values = dict(description)
    name = values.pop("name", None)
    cls = _BY_NAME.get(name)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown initializer {name!r}; expected one of {sorted(_BY_NAME)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"bad {name} initializer description {description!r}: {exc}") from None
