"""What a federated round accepts and what it checks before its step (see docs/federated.md).

- A participant's weight, ``num_examples``, is a finite number in ``(0, MAX_NUM_EXAMPLES]``: the
  participant, every server and the scheduler refuse anything else, naming the bound. With that
  bound the weights of a round sum to far less than a float64 can hold, so combining cannot
  overflow.
- Before a round changes anything, each server combines the counted updates into the step's
  pseudo-gradient and checks that it is finite (float32), then runs the table's optimizer on a
  copy of the blocks it holds (values, optimizer state and step count) and checks that the new
  values and the new optimizer state are finite. A round whose step would not be finite on any
  server is abandoned on all of them; :func:`trial_step` and :func:`blame` make the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from paramserver import _core
from paramserver.wire import first_non_finite

__all__ = ["MAX_NUM_EXAMPLES", "check_num_examples", "trial_step", "blame"]

#: The largest ``num_examples`` a federated update may carry (a quadrillion examples). Far
#: above any real dataset, and small enough that the weights of any round sum without overflow.
MAX_NUM_EXAMPLES = 1e15

#: Bytes of values and optimizer state copied at once by :func:`trial_step`.
_TRIAL_BYTES = 16 << 20


def check_num_examples(value: Any, who: str) -> float:
    """``value`` as a float if it is a finite number in ``(0, MAX_NUM_EXAMPLES]``; otherwise
    ValueError naming ``who``, the value and the bound."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and 0 < weight <= MAX_NUM_EXAMPLES):
        raise ValueError(f"{who}: num_examples must be a finite number in "
                         f"(0, {MAX_NUM_EXAMPLES:g}], got {value!r}")
    return weight


def trial_step(table: Any, optimizer: Any, blocks: Sequence[int], grad: np.ndarray,
               threads: int) -> tuple[int, str, float] | None:
    """Run one optimizer step with ``grad`` (float32, the blocks' gradients concatenated in the
    order of ``blocks``) on a copy of ``blocks`` of the core DenseTable ``table`` (values,
    optimizer state and step count; ``optimizer`` is the table's core OptimizerConfig), in
    pieces of at most about 16 MB. ``table`` is not changed. Returns None if every new value and
    every new optimizer state element is finite, else ``(offset into grad, "values" or "optimizer
    state", the value)`` of the first one that is not."""
    num_slots = table.num_slots
    per_element = 4 * (1 + num_slots)
    order = [int(b) for b in blocks]
    start = 0
    i = 0
    while i < len(order):
        chunk = [order[i]]
        size = table.block_length(order[i])
        i += 1
        while i < len(order) and (size + table.block_length(order[i])) * per_element <= _TRIAL_BYTES:
            size += table.block_length(order[i])
            chunk.append(order[i])
            i += 1
        found = _trial_chunk(table, optimizer, chunk, grad[start:start + size], threads, num_slots)
        if found is not None:
            return (start + found[0], found[1], found[2])
        start += size
    return None


def _trial_chunk(table: Any, optimizer: Any, chunk: list[int], grad: np.ndarray, threads: int,
                 num_slots: int) -> tuple[int, str, float] | None:
    scratch = _core.DenseTable(table.num_elements, table.block_size, optimizer, chunk)
    for b in chunk:
        length = table.block_length(b)
        values = np.empty(length, dtype=np.float32)
        table.read(b, values)
        slots = [np.empty(length, dtype=np.float32) for _ in range(num_slots)]
        for s, slot in enumerate(slots):
            table.read_slot(b, s, slot)
        scratch.restore_block(b, values, slots, table.step(b))
    ids = np.array(chunk, dtype=np.int64)
    scratch.apply_many(ids, np.ascontiguousarray(grad, dtype=np.float32), threads)
    values = np.empty(grad.size, dtype=np.float32)
    scratch.read_many(ids, values, threads)
    bad = first_non_finite(values)
    if bad >= 0:
        return bad, "values", float(values[bad])
    pos = 0
    for b in chunk:
        length = table.block_length(b)
        slot = np.empty(length, dtype=np.float32)
        for s in range(num_slots):
            scratch.read_slot(b, s, slot)
            bad = first_non_finite(slot)
            if bad >= 0:
                return pos + bad, "optimizer state", float(slot[bad])
        pos += length
    return None


def blame(contributions: Sequence[tuple[str, float, np.ndarray]], offset: int,
          most: int = 3) -> str:
    """The participants whose deltas weigh most at ``offset``: ``contributions`` holds each
    counted participant's ``(name, factor in the mean, delta)``; at most ``most`` are named,
    largest first, as "'a' (delta 3e+38, weight 0.5), ..."."""
    terms = sorted(((abs(factor * float(delta[offset])), name, float(delta[offset]), factor)
                    for name, factor, delta in contributions), key=lambda t: (-t[0], t[1]))
    shown = [f"{name!r} (delta {d:.4g}, weight {f:.4g})" for _, name, d, f in terms[:most]]
    more = len(terms) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
