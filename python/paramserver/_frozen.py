"""Immutable descriptions compared by value: the base of optimizers and initializers."""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["FrozenValue"]


class FrozenValue:
    """An immutable value described by its constructor's arguments.

    Subclasses name those arguments in ``_fields`` and store them with :meth:`_set` in
    ``__init__`` (after validating them). Instances are then immutable, hashable, compare by type
    and values, and print as the call that makes them. Thread safe.
    """

    #: The constructor's arguments, in order; set by each subclass.
    _fields: ClassVar[tuple[str, ...]] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; create a new one")

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def _call_name(self) -> str:
        """The name ``repr`` shows before the arguments."""
        return type(self).__name__

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self._values().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._values().items())
        return f"{self._call_name()}({args})"
