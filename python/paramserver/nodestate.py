"""The job's nodes in the scheduler's saved state (``--recover``).

A scheduler saves every node it answered a registration (role, rank, node id, address, pid, host,
incarnation, whether it left, restarts, rolled-back updates). A restarted scheduler loads them as
known nodes that count as alive until ``now + grace`` without a heartbeat, so their calls (a
barrier, a step, a checkpoint) are served before they report back; a node that re-registers with
its incarnation is the same node, not a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["FIELDS", "from_state", "to_state"]

#: The attributes of a node that are saved, with their types.
FIELDS = {"role": int, "rank": int, "node_id": str, "address": str, "pid": int, "hostname": str,
          "incarnation": str, "left": bool, "restarts": int, "rolled_back": int}

T = TypeVar("T")


def to_state(nodes: Iterable[Any]) -> list[dict]:
    """The saved form of ``nodes`` (objects with the attributes in :data:`FIELDS`)."""
    return [{name: getattr(node, name) for name in FIELDS} for node in nodes]


def from_state(entries: list[dict], make: Callable[..., T], now: float, grace: float) -> list[T]:
    """Nodes made by ``make(**fields, last_heartbeat=now, grace_until=now + grace)`` from saved
    ``entries``. Raises ValueError naming the first malformed entry."""
    nodes = []
    for i, entry in enumerate(entries):
        try:
            fields = {name: kind(entry[name]) for name, kind in FIELDS.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"node entry {i} is malformed: {exc!r}") from None
        nodes.append(make(**fields, last_heartbeat=now, grace_until=now + grace))
    return nodes
