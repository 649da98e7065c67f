"""A server's share of a federated job's rounds: the participants' updates of the open round and
the one optimizer step a round ends with (see docs/federated.md and :mod:`paramserver.rounds`).

The scheduler opens round ``r`` here with the participants selected for it (``OPEN``). A selected
participant sends every server the blocks it holds of every dense table, in one or more messages:
its new values (the delta is taken here, against this server's values, which no one changes
while the round is open) or its delta. Each participant's delta is kept in float64, per table,
over the blocks this server holds. When the scheduler closes the round it sends ``COMMIT`` with
the participants it counted (their weights and DP clipping factors); this server then applies
each table's optimizer once, on the pseudo-gradient

    g = -(sum_i w_i s_i delta_i) / (sum_i w_i)   (+ Gaussian noise with DP-FedAvg)

and forgets the round. A participant that was selected but is not counted (it vanished, or its
report came too late) contributes nothing, even if some of its messages arrived. ``NORMS`` gives
the scheduler each participant's squared L2 norm over the blocks held here, so DP clipping uses
the norm of the whole update across every server, enforced by the servers and the scheduler
rather than trusted to the participant.

Before the COMMIT, ``PREPARE`` combines the updates and checks the step on a copy
(:mod:`paramserver.fedbounds`): the pseudo-gradient, the new values and the new optimizer state
must be finite, or the reply says why not (naming the table, the element and the participants
whose deltas weigh most there) and the scheduler abandons the round on every server. The COMMIT
that follows applies exactly the step that was checked.

Each submit of a participant carries an ``attempt`` id: the messages of a new attempt replace
what this server held of an earlier one, and ``withdraw`` drops an attempt, so an update that
another server refused leaves nothing here and does not lock the participant out of the round.
The scheduler's commit names the attempt each counted participant reported; only that one is
applied.

Thread safe: one lock guards the round's bookkeeping; a COMMIT holds it while it applies, so no
update of the round can arrive meanwhile.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.errors import RoundClosedError
from paramserver.fedbounds import blame, check_num_examples, trial_step
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import first_non_finite, optimizer_from_spec

__all__ = ["RoundUpdates"]


@dataclass
class _TableDelta:
    """One participant's delta of one table on this server (float64, the held blocks in
    ascending order), and the blocks it covered so far."""

    delta: np.ndarray
    covered: set[int] = field(default_factory=set)


@dataclass
class _Update:
    weight: float
    is_delta: bool
    parts: int
    attempt: int
    got: set[int] = field(default_factory=set)
    tables: dict[str, _TableDelta] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.got) == self.parts


@dataclass
class _Staged:
    """A round's step, combined and checked by PREPARE: ``(table, shard, blocks, grad)`` per
    dense table, for the counted ``(participant, attempt)`` pairs."""

    round: int
    counted: tuple[tuple[str, int], ...]
    steps: list[tuple[str, Any, np.ndarray, np.ndarray]]


def _layout(shard: Any) -> tuple[np.ndarray, dict[int, tuple[int, int]], int]:
    """The blocks a dense shard holds (ascending), each block's (offset, length) in their
    concatenation, and the total length."""
    blocks = np.array(sorted(shard.blocks), dtype=np.int64)
    offsets: dict[int, tuple[int, int]] = {}
    pos = 0
    for b in blocks.tolist():
        length = shard.table.block_length(b)
        offsets[b] = (pos, length)
        pos += length
    return blocks, offsets, pos


class RoundUpdates:
    """The federated rounds as one server sees them. Thread safe.

    Args:
        node: this server's name, for messages.
        dense_shards: returns the dense shards held now, ``{name: shard}`` (shard has ``spec``,
            ``blocks``, ``table`` (a core DenseTable) and an ``updates`` counter).
        apply_threads: threads the core uses to apply a round.
    """

    def __init__(self, node: str, dense_shards: Callable[[], dict[str, Any]],
                 apply_threads: int) -> None:
        self.node = node
        self._dense_shards = dense_shards
        self._apply_threads = apply_threads
        self._lock = threading.Lock()
        self.round = 0              # the open round here (0: none)
        self.closed = 0             # every round up to this one is closed here
        self.version = 0            # the last round applied here
        self._selected: set[str] = set()
        self._updates: dict[str, _Update] = {}
        self._staged: _Staged | None = None
        self._layouts: dict[str, tuple[Any, np.ndarray, dict[int, tuple[int, int]], int]] = {}
        self._optimizers: dict[str, tuple[Any, Any]] = {}

    # -- updates ---------------------------------------------------------------------------------

    def _check_round(self, what: str, round_: int) -> None:
        """Raise unless ``round_`` is open here (caller holds the lock)."""
        if round_ <= self.closed:
            at = self.round if self.round else self.closed + 1
            raise RoundClosedError(f"{what} for round {round_} refused: round {round_} closed, "
                                   f"the job is at round {at} (on {self.node})")
        if round_ != self.round:
            raise ValueError(f"{what} for round {round_} refused: that round is not open on "
                             f"{self.node} (open: {self.round or 'none'})")

    def _layout_of(self, shard: Any) -> tuple[np.ndarray, dict[int, tuple[int, int]], int]:
        """The layout of a shard, computed once per shard object (caller holds the lock)."""
        name = shard.spec.name
        cached = self._layouts.get(name)
        if cached is None or cached[0] is not shard:
            cached = (shard, *_layout(shard))
            self._layouts[name] = cached
        return cached[1], cached[2], cached[3]

    def submit(self, request: pb.FederatedUpdate, dense: list[tuple[Any, np.ndarray, np.ndarray,
                                                                     int]]) -> None:
        """Record one message of a participant's update. ``dense`` is the message's slices as the
        server validated them: ``(shard, blocks, data, length)`` with ``data`` float32 and finite.
        A message of a new ``attempt`` replaces what was held of the participant's earlier one;
        ``withdraw`` drops the attempt named (if held; nothing else happens).
        Raises (nothing recorded) RoundClosedError for a closed round, ValueError for a round
        not open here, a participant not selected for it, a weight out of bounds, a message count
        that does not fit, a block sent twice; when the last message of an update leaves a held
        block of some table uncovered, the whole update is dropped and ValueError names the
        table."""
        participant = request.participant
        who = f"participant {participant!r}"
        with self._lock:
            if request.withdraw:
                if dense:
                    raise ValueError(f"withdrawal of {who}'s update carries data")
                held = self._updates.get(participant)
                if (request.round == self.round and held is not None
                        and held.attempt == request.attempt):
                    del self._updates[participant]
                return
            self._check_round(f"update of {who}", request.round)
            if participant not in self._selected:
                raise ValueError(f"update for round {request.round} refused: {who} is not "
                                 f"selected for round {request.round} (on {self.node})")
            weight = check_num_examples(request.num_examples, f"update of {who} for round "
                                                              f"{request.round} (on {self.node})")
            if request.parts < 1 or request.part >= request.parts:
                raise ValueError(f"update of {who}: message {request.part} of "
                                 f"{request.parts} is out of range")
            update = self._updates.get(participant)
            if update is not None and update.attempt != request.attempt:
                update = None  # a new attempt: replaces the held one once this message is good
            if update is None:
                update = _Update(weight, request.is_delta, request.parts, request.attempt)
            elif update.complete:
                raise ValueError(f"{who} already submitted its update for round "
                                 f"{request.round} (on {self.node})")
            elif (update.weight, update.is_delta, update.parts) != (
                    weight, request.is_delta, request.parts) or request.part in update.got:
                raise ValueError(f"update of {who}: message {request.part} of {request.parts} "
                                 f"(num_examples {weight}) does not fit the messages before it "
                                 f"({update.parts} messages, num_examples {update.weight}), "
                                 f"or came twice")
            # Check every slice before touching the update.
            pieces = []
            for shard, blocks, data, _ in dense:
                name = shard.spec.name
                held, offsets, total = self._layout_of(shard)
                entry = update.tables.get(name)
                seen = entry.covered if entry is not None else set()
                again = [b for b in blocks.tolist() if b in seen]
                if again:
                    raise ValueError(f"update of {who}: table {name!r} block {again[0]} was "
                                     f"sent in an earlier message of this update")
                pieces.append((shard, name, blocks, data, offsets, total))
            for shard, name, blocks, data, offsets, total in pieces:
                entry = update.tables.get(name)
                if entry is None:
                    entry = update.tables[name] = _TableDelta(np.zeros(total, dtype=np.float64))
                pos = 0
                current = None
                if not update.is_delta:
                    current = np.empty(data.size, dtype=np.float32)
                    shard.table.read_many(blocks, current, self._apply_threads)
                for b in blocks.tolist():
                    start, length = offsets[b]
                    target = entry.delta[start:start + length]
                    np.copyto(target, data[pos:pos + length])
                    if current is not None:
                        np.subtract(target, current[pos:pos + length], out=target)
                    pos += length
                    entry.covered.add(b)
            self._updates[participant] = update
            update.got.add(request.part)
            if update.complete:
                missing = self._uncovered(update)
                if missing:
                    del self._updates[participant]
                    raise ValueError(f"update of {who} for round {request.round} refused: it "
                                     f"does not cover {missing} held by {self.node} (an update "
                                     f"carries every table of the model, whole)")

    def _uncovered(self, update: _Update) -> str:
        """The first table (and block) held here that ``update`` left out ("" : none)."""
        for name, shard in sorted(self._dense_shards().items()):
            entry = update.tables.get(name)
            held = set(shard.blocks)
            if entry is None:
                return f"table {name!r}"
            left = held - entry.covered
            if left:
                return f"table {name!r} block {min(left)}"
        return ""

    # -- the scheduler's control -----------------------------------------------------------------

    def open(self, round_: int, selected: list[str]) -> None:
        """Round ``round_`` opens for ``selected``; every older round is closed here."""
        with self._lock:
            if round_ <= self.closed:
                raise ValueError(f"{self.node}: cannot open round {round_}, rounds up to "
                                 f"{self.closed} are closed here")
            self.round = round_
            self.closed = round_ - 1
            self._selected = set(selected)
            self._updates.clear()
            self._staged = None

    def norms(self, round_: int, participants: list[str]) -> list[float]:
        """Squared L2 norm of each listed participant's delta over the blocks held here."""
        with self._lock:
            self._check_round("norms", round_)
            out = []
            for participant in participants:
                update = self._updates.get(participant)
                if update is None or not update.complete:
                    raise ValueError(f"{self.node} holds no complete update of participant "
                                     f"{participant!r} for round {round_}")
                out.append(float(sum(np.dot(t.delta, t.delta) for t in update.tables.values())))
            return out

    def _optimizer_of(self, shard: Any) -> Any:
        """The core OptimizerConfig of a shard's table, built once per shard object."""
        name = shard.spec.name
        cached = self._optimizers.get(name)
        if cached is None or cached[0] is not shard:
            cached = (shard, optimizer_from_spec(shard.spec.optimizer).to_config())
            self._optimizers[name] = cached
        return cached[1]

    def _stage(self, request: pb.RoundControlRequest, rng: np.random.Generator) -> _Staged:
        """Combine the counted updates into each dense table's step and check it on a copy
        (caller holds the lock); ValueError saying why the round cannot be applied here."""
        round_ = request.round
        counted = list(request.counted)
        where = f"round {round_} on {self.node}"
        if not counted:
            raise ValueError(f"{where}: no participant counted")
        for c in counted:
            who = f"participant {c.participant!r}"
            update = self._updates.get(c.participant)
            if update is None or not update.complete:
                raise ValueError(f"{where}: no complete update of {who} is held here (it "
                                 f"reported an update this server does not have)")
            if update.attempt != c.attempt:
                raise ValueError(f"{where}: {who} reported attempt {c.attempt}, this server "
                                 f"holds attempt {update.attempt} (it sent another update "
                                 f"after reporting one)")
            missing = self._uncovered(update)
            if missing:
                raise ValueError(f"{where}: the update of {who} does not cover {missing} (a "
                                 f"table declared during the round?)")
            check_num_examples(c.weight, f"{where}: the weight of {who}")
            if not (math.isfinite(c.scale) and 0 <= c.scale <= 1):
                raise ValueError(f"{where}: {who} has clipping factor {c.scale}, not in [0, 1]")
        total = math.fsum(c.weight for c in counted)  # bounded weights: no overflow
        factors = [c.weight * c.scale / total for c in counted]
        steps = []
        for name, shard in sorted(self._dense_shards().items()):
            blocks, offsets, length = self._layout_of(shard)
            mean = np.zeros(length, dtype=np.float64)
            parts = []
            for c, factor in zip(counted, factors):
                delta = self._updates[c.participant].tables[name].delta
                mean += factor * delta
                parts.append((c.participant, factor, delta))
            if request.noise_std > 0:
                mean += rng.normal(0.0, request.noise_std, size=length)
            with np.errstate(over="ignore"):
                grad = np.negative(mean).astype(np.float32)
            bad = first_non_finite(grad)
            what = ""
            if bad >= 0:
                what = f"the combined update is not finite ({-float(grad[bad]):g}"
            else:
                found = trial_step(shard.table, self._optimizer_of(shard), blocks, grad,
                                   self._apply_threads)
                if found is not None:
                    bad = found[0]
                    what = f"the step would make its {found[1]} not finite ({found[2]:g}"
            if bad >= 0:
                element = self._element(shard, offsets, bad)
                raise ValueError(f"{where}: table {name!r}: {what} at flat element {element}); "
                                 f"largest deltas there: {blame(parts, bad)}")
            steps.append((name, shard, blocks, grad))
        return _Staged(round_, tuple((c.participant, c.attempt) for c in counted), steps)

    @staticmethod
    def _element(shard: Any, offsets: dict[int, tuple[int, int]], offset: int) -> int:
        """The table's flat element at ``offset`` in the concatenation of the held blocks."""
        for block, (start, length) in offsets.items():
            if start <= offset < start + length:
                return int(shard.table.block_offset(block)) + offset - start
        return -1

    def prepare(self, request: pb.RoundControlRequest, rng: np.random.Generator) -> str:
        """Combine and check the round's step (kept for the COMMIT that follows); "" if it can be
        applied, else why not (the round is then to be abandoned; nothing changed)."""
        with self._lock:
            self._check_round("prepare", request.round)
            self._staged = None
            try:
                self._staged = self._stage(request, rng)
            except (ValueError, ArithmeticError) as exc:
                return str(exc)
            return ""

    def commit(self, request: pb.RoundControlRequest,
               apply: Callable[[Callable[[], None]], None],
               rng: np.random.Generator) -> int:
        """Close the round: apply every dense table's optimizer once on minus the weighted mean of
        the counted participants' deltas (plus DP noise), as PREPARE checked it (without
        PREPARE: combined and checked now). ``apply(fn)`` runs ``fn`` as a write. Returns the
        blocks stepped. Raises (nothing applied) ValueError if a counted participant has no
        complete update here, the counted ones are not those prepared, or the step would not be
        finite."""
        round_ = request.round
        with self._lock:
            self._check_round("commit", round_)
            staged = self._staged
            counted = tuple((c.participant, c.attempt) for c in request.counted)
            if staged is None or staged.round != round_:
                staged = self._stage(request, rng)
            elif counted and counted != staged.counted:
                raise ValueError(f"commit of round {round_} on {self.node}: it counts "
                                 f"{[c[0] for c in counted]}, the round was prepared for "
                                 f"{[c[0] for c in staged.counted]}")
            steps = 0

            def run() -> None:
                nonlocal steps
                for _, shard, blocks, grad in staged.steps:
                    shard.table.apply_many(blocks, grad, self._apply_threads)
                    shard.updates += len(blocks)
                    steps += len(blocks)

            apply(run)
            self.version = round_
            self.closed = round_
            self.round = 0
            self._selected = set()
            self._updates.clear()
            self._staged = None
            return steps

    def abandon(self, round_: int) -> None:
        """The round closed without an update: drop what arrived for it."""
        with self._lock:
            self.closed = max(self.closed, round_)
            if self.round <= round_:
                self.round = 0
                self._selected = set()
                self._updates.clear()
                self._staged = None

    def control(self, request: pb.RoundControlRequest,
                apply: Callable[[Callable[[], None]], None],
                rng: np.random.Generator) -> pb.RoundControlReply:
        """Serve one of the scheduler's round controls (see RoundControlRequest)."""
        action = request.action
        if action == pb.RoundControlRequest.OPEN:
            self.open(request.round, list(request.selected))
            return pb.RoundControlReply()
        if action == pb.RoundControlRequest.NORMS:
            return pb.RoundControlReply(squared_norms=self.norms(request.round,
                                                                 list(request.selected)))
        if action == pb.RoundControlRequest.PREPARE:
            return pb.RoundControlReply(refused=self.prepare(request, rng))
        if action == pb.RoundControlRequest.COMMIT:
            return pb.RoundControlReply(updates=self.commit(request, apply, rng))
        if action == pb.RoundControlRequest.ABANDON:
            self.abandon(request.round)
            return pb.RoundControlReply()
        raise ValueError(f"unknown round control {action}")
