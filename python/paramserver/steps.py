"""The steps of a synchronous job on one server: who a step waits for, the workers' contributions,
and reads that wait for a step (see :mod:`paramserver.sync` for the models).

Every worker's push of a synchronous job is one step (its clock) and sends every server one
contribution, empty when it has nothing for that server, in one or more messages. The server:

- **BSP**: keeps each contribution's validated data (views into the received messages) until all
  its messages are here, then adds it into the step's sums: one float32 buffer per dense table,
  reused from step to step, and the embedding rows of each worker. Once every member of the step
  has contributed, the step is applied: one optimizer step per dense table that any worker pushed
  (with the mean or the sum of the gradients) and per embedding row that any worker pushed (the
  sum of its gradients divided by the number of workers). Reads wait while a step is applied, so
  a read sees every step whole.
- **SSP(S)**: applies each contribution as it arrives, and counts every worker's clock here; a
  read at clock ``c`` waits until every member has reached ``c - S``.

A read (or a BSP push that waits for its step) never holds a handler thread for long: it waits at
most ``StepTag.wait`` seconds, and not at all when half the server's threads already wait; then it
answers *pending* with what the step waits for, and the worker asks again.

The members of the step group come from the scheduler (:mod:`paramserver.syncgroup`): the job's
workers from step 1, a worker joining at a step no server has started, a worker leaving after its
last step, a dead worker removed (or the steps failed, with ``--on-worker-failure fail``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.errors import StepFailedError
from paramserver.sync import Consistency
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["StepEngine", "Contribution"]

#: A BSP worker may contribute to the step after the open one (a worker that joined while a step
#: was open), no further: a worker's push waits for its step.
_AHEAD = 2


@dataclass
class Contribution:
    """One message's validated share of a worker's step: dense ``(shard, blocks, data)`` and
    embedding ``(shard, ids, rows)`` (``data`` and ``rows`` are views into the message)."""

    dense: list[tuple[Any, np.ndarray, np.ndarray]] = field(default_factory=list)
    sparse: list[tuple[Any, np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class _Member:
    rank: int
    first: int                      # its first step
    last: int | None = None         # its last step, once it left (or was removed)
    clock: int = 0                  # the last step whose contribution is complete here
    pending: dict[int, dict[int, Contribution]] = field(default_factory=dict)  # step -> parts
    parts: dict[int, int] = field(default_factory=dict)  # step -> messages expected here
    applied: dict[int, int] = field(default_factory=dict)  # ssp: step -> messages applied here

    def in_step(self, step: int) -> bool:
        return self.first <= step and (self.last is None or step <= self.last)


class _DenseSum:
    """The sum of the workers' gradients of one dense table in one step: a buffer over the blocks
    this server holds, in ascending block order."""

    def __init__(self, shard: Any) -> None:
        self.shard = shard
        self.blocks = np.array(sorted(shard.blocks), dtype=np.int64)
        self.offsets: dict[int, tuple[int, int]] = {}
        pos = 0
        for b in self.blocks.tolist():
            length = shard.table.block_length(b)
            self.offsets[b] = (pos, length)
            pos += length
        self.buffer = np.empty(pos, dtype=np.float32)
        self.fresh = dict.fromkeys(self.offsets, True)  # block not written in this step yet
        self.pushed = False

    def add(self, blocks: np.ndarray, data: np.ndarray) -> None:
        pos = 0
        for b in blocks.tolist():
            start, length = self.offsets[b]
            target = self.buffer[start:start + length]
            if self.fresh[b]:
                np.copyto(target, data[pos:pos + length])
                self.fresh[b] = False
            else:
                np.add(target, data[pos:pos + length], out=target)
            pos += length
        self.pushed = True

    def reset(self) -> None:
        self.fresh = dict.fromkeys(self.offsets, True)
        self.pushed = False


class _Step:
    """One open BSP step: who contributed, and the sums so far."""

    def __init__(self) -> None:
        self.lock = threading.Lock()            # adds into the sums
        self.contributed: set[int] = set()      # workers whose contribution is summed
        self.adding = 0                         # contributions being added right now
        self.dense: dict[str, _DenseSum] = {}
        # table -> (shard, worker -> its (ids, rows), one per message)
        self.sparse: dict[str, tuple[Any, dict[int, list[tuple[np.ndarray, np.ndarray]]]]] = {}


class StepEngine:
    """The step state of one server of a synchronous job. Thread safe.

    Args:
        consistency: the job's model (bsp or ssp).
        node: this server's name, for messages.
        max_waiters: handler threads that may wait for a step at once (the rest answer pending).
        apply_threads: threads the core uses to apply a step.
    """

    def __init__(self, consistency: Consistency, node: str, max_waiters: int,
                 apply_threads: int) -> None:
        self.consistency = consistency
        self.node = node
        self._max_waiters = max(1, max_waiters)
        self._apply_threads = apply_threads
        self._cond = threading.Condition()
        self._members: dict[int, _Member] = {}
        self._holds: dict[int, tuple[int, float]] = {}   # joining worker -> (first held, lease end)
        self.completed = 0                                # bsp: the last step applied here
        self._steps: dict[int, _Step] = {}
        self._spare: dict[str, list[_DenseSum]] = {}      # dense sums to reuse
        self._applying = False
        self._readers = 0
        self._waiters = 0
        self.failed = ""
        self._adopt = False
        self.max_staleness = 0
        self.reads_waited = 0
        self.wait_seconds = 0.0

    # -- the step group --------------------------------------------------------------------------

    def set_members(self, members: list[pb.SyncMember], restarted: bool) -> None:
        """The group as the scheduler knows it (at registration). A restarted server does not know
        which step the job is at: it takes it from the first contribution that arrives."""
        with self._cond:
            self._members = {m.rank: _Member(m.rank, m.first_step, m.last_step or None,
                                             clock=m.first_step - 1)
                             for m in members if not m.last_step or m.last_step >= m.first_step}
            self._adopt = restarted
            self._cond.notify_all()

    def change(self, request: pb.SyncMembersRequest,
               apply: Callable[[Callable[[], None]], None]) -> int:
        """Apply one of the scheduler's changes to the group; returns PROPOSE's first step.
        ``apply(fn)`` runs ``fn`` (a step made complete by the change) as a write."""
        action, worker = request.action, request.worker
        with self._cond:
            if action == pb.SyncMembersRequest.PROPOSE:
                first = self._next_free_step()
                self._holds[worker] = (first, time.monotonic() + max(request.lease, 1.0))
                return first
            if action == pb.SyncMembersRequest.ABORT:
                self._holds.pop(worker, None)
            elif action == pb.SyncMembersRequest.COMMIT:
                hold = self._holds.pop(worker, None)
                # Without a hold (it lapsed, or this server restarted) later steps may have
                # started here: the join must still be at a step none has.
                started = hold[0] if hold is not None else self._next_free_step()
                if request.step < started:
                    raise ValueError(f"{self.node}: worker-{worker} cannot join at step "
                                     f"{request.step}; steps up to {started - 1} started here")
                old = self._members.get(worker)
                if old is not None and old.last is None:
                    raise ValueError(f"{self.node}: worker-{worker} is already a member of the "
                                     f"step group (since step {old.first})")
                self._members[worker] = _Member(worker, request.step, clock=request.step - 1)
            elif action == pb.SyncMembersRequest.LEAVE:
                member = self._members.get(worker)
                if member is not None:
                    member.last = max(member.first - 1, int(request.step))
                    for step in [s for s in member.pending if s > member.last]:
                        del member.pending[step]
            elif action == pb.SyncMembersRequest.REMOVE:
                member = self._members.get(worker)
                if member is not None:
                    # Its unfinished contributions are dropped; the steps it completed here stay.
                    member.pending.clear()
                    member.parts.clear()
                    member.applied.clear()
                    member.last = max(member.first - 1, member.clock)
                self._holds.pop(worker, None)
            elif action == pb.SyncMembersRequest.FAIL:
                self.failed = request.reason or f"worker-{worker} died"
            else:
                raise ValueError(f"unknown step group change {action}")
            self._cond.notify_all()
        if self.consistency.mode == "bsp":
            self.advance(apply)
        return 0

    def _next_free_step(self) -> int:
        """The first step no contribution has reached here (caller holds the lock)."""
        if self.consistency.mode == "bsp":
            started = max([self.completed] + [s for s, st in self._steps.items()
                                              if st.contributed or st.adding])
            started = max([started] + [s for m in self._members.values() for s in m.pending])
            return started + 1
        return max([0] + [m.clock for m in self._members.values()]
                   + [s for m in self._members.values() for s in m.pending]) + 1

    # -- contributions ---------------------------------------------------------------------------

    def _check_failed(self) -> None:
        if self.failed:
            raise StepFailedError(f"{self.node}: {self.failed}")

    def _member(self, worker: int, step: int) -> _Member:
        member = self._members.get(worker)
        if member is None:
            raise ValueError(f"worker-{worker} is not in the step group of this synchronous job "
                             f"on {self.node} (a worker joins before its first push)")
        if not member.in_step(step):
            last = "" if member.last is None else f" to {member.last}"
            raise ValueError(f"worker-{worker} pushed step {step}, but takes part in steps "
                             f"{member.first}{last} (on {self.node})")
        return member

    def contribute(self, worker: int, step: int, part: int, parts: int,
                   contribution: Contribution) -> Contribution | None:
        """Record one message of ``worker``'s contribution to ``step``. BSP: returns the whole
        contribution (its messages merged) once every message is here, else None. SSP: returns
        None; the caller applies the message, then calls :meth:`applied`. Raises ValueError for
        a step this worker cannot contribute to now (nothing recorded)."""
        with self._cond:
            self._check_failed()
            if self._adopt and step >= 1:
                self._adopt_step(step)
            member = self._member(worker, step)
            if step <= member.clock:
                raise ValueError(f"worker-{worker} already contributed to step {step} on "
                                 f"{self.node}")
            if self.consistency.mode == "bsp" and not self.completed < step <= \
                    self.completed + _AHEAD:
                raise ValueError(f"worker-{worker} pushed step {step} while {self.node} is at "
                                 f"step {self.completed} (a BSP worker pushes one step at a time)")
            expected = member.parts.setdefault(step, parts)
            got = member.pending.setdefault(step, {})
            if expected != parts or part >= parts or part in got:
                raise ValueError(f"worker-{worker} step {step}: message {part} of {parts} does "
                                 f"not fit the {expected} messages announced, or came twice")
            got[part] = contribution
            if self.consistency.mode != "bsp" or len(got) < expected:
                return None
            del member.pending[step], member.parts[step]
            whole = Contribution()
            for i in sorted(got):
                whole.dense += got[i].dense
                whole.sparse += got[i].sparse
            self._steps.setdefault(step, _Step()).adding += 1
            return whole

    def applied(self, worker: int, step: int) -> None:
        """SSP: one message of ``worker``'s step was applied here; once all are, its clock here
        reaches ``step``."""
        with self._cond:
            member = self._members.get(worker)
            if member is None or step not in member.parts:
                return  # removed meanwhile
            count = member.applied.get(step, 0) + 1
            if count < member.parts[step]:
                member.applied[step] = count
                return
            member.applied.pop(step, None)
            member.pending.pop(step, None)
            del member.parts[step]
            member.clock = max(member.clock, step)
            self._cond.notify_all()

    def _adopt_step(self, step: int) -> None:
        """A restarted server's first contribution tells it the job's step (caller holds the
        lock)."""
        self._adopt = False
        self.completed = max(self.completed, step - 1)
        for member in self._members.values():
            member.clock = max(member.clock, min(step - 1, member.last or step - 1))

    def add(self, worker: int, step: int, whole: Contribution,
            apply: Callable[[Callable[[], None]], None]) -> None:
        """BSP: add a complete contribution into its step's sums; apply the step if that
        completes it (``apply(fn)`` runs ``fn`` as a write)."""
        with self._cond:
            current = self._steps[step]
        try:
            with current.lock:
                for shard, blocks, data in whole.dense:
                    name = shard.spec.name
                    total = current.dense.get(name)
                    if total is None:
                        total = current.dense[name] = self._take_sum(shard)
                    total.add(blocks, data)
                for shard, ids, rows in whole.sparse:
                    entry = current.sparse.setdefault(shard.spec.name, (shard, {}))
                    entry[1].setdefault(worker, []).append((ids, rows))  # one per message
        finally:
            with self._cond:
                current.adding -= 1
                current.contributed.add(worker)
                self._members[worker].clock = max(self._members[worker].clock, step)
                self._cond.notify_all()
        self.advance(apply)

    # -- applying BSP steps ----------------------------------------------------------------------

    def _complete(self, step: int) -> bool:
        """Every member of ``step`` has contributed and no join holds it (caller holds the
        lock)."""
        current = self._steps.get(step)
        if current is not None and current.adding:
            return False
        now = time.monotonic()
        for worker, (first, lease_end) in list(self._holds.items()):
            if now > lease_end:
                del self._holds[worker]  # the joining worker never committed
            elif step >= first:
                return False
        contributed = current.contributed if current is not None else set()
        members = [m for m in self._members.values() if m.in_step(step)]
        return all(m.rank in contributed for m in members) and bool(contributed)

    def advance(self, apply: Callable[[Callable[[], None]], None]) -> None:
        """Apply every step that is complete, in order (BSP)."""
        while True:
            with self._cond:
                step = self.completed + 1
                if self._applying or self.failed or not self._complete(step):
                    return
                self._applying = True
                while self._readers:
                    self._cond.wait()
                current = self._steps.pop(step)
            try:
                apply(lambda: self._apply_step(current))
            finally:
                with self._cond:
                    self.completed = step
                    self._applying = False
                    self._cond.notify_all()

    def _apply_step(self, current: _Step) -> None:
        workers = len(current.contributed)
        for name, total in current.dense.items():
            table = total.shard.table
            if total.pushed:
                for b, is_fresh in total.fresh.items():  # blocks no worker sent: no gradient
                    if is_fresh:
                        start, length = total.offsets[b]
                        total.buffer[start:start + length] = 0.0
                if total.shard.spec.combine == pb.TableSpec.MEAN and workers > 1:
                    np.divide(total.buffer, np.float32(workers), out=total.buffer)
                table.apply_many(total.blocks, total.buffer, self._apply_threads)
                total.shard.updates += len(total.blocks)
            total.reset()
            with self._cond:
                self._spare.setdefault(name, []).append(total)
        for shard, by_worker in current.sparse.values():
            # Rank order: the sums do not depend on the order contributions arrived in.
            parts = [piece for w in sorted(by_worker) for piece in by_worker[w]]
            ids = np.concatenate([p[0] for p in parts])
            rows = np.concatenate([p[1] for p in parts])  # a new array: divided in place
            if workers > 1:
                np.divide(rows, np.float32(workers), out=rows)
            shard.table.push(ids, rows,
                             self._apply_threads)
            shard.updates += int(np.unique(ids).size)

    def _take_sum(self, shard: Any) -> _DenseSum:
        """A reusable sum buffer of ``shard``'s table, or a new one. A spare of a table since
        replaced (restored, or dropped and declared again) belongs to the old shard: dropped."""
        with self._cond:
            spare = [t for t in self._spare.get(shard.spec.name, ()) if t.shard is shard]
            total = spare.pop() if spare else None
            self._spare[shard.spec.name] = spare
        return total if total is not None else _DenseSum(shard)

    # -- reads -----------------------------------------------------------------------------------

    def _stragglers(self, reader: int, read_step: int) -> list[str]:
        """What a read at ``read_step`` still waits for ([] : it can be served). Caller holds
        the lock."""
        if self.consistency.mode == "bsp":
            if self.completed >= read_step and not self._applying:
                return []
            if self.completed >= read_step:
                return [f"step {self.completed + 1} being applied"]
            step = self.completed + 1
            current = self._steps.get(step)
            done = current.contributed if current is not None else set()
            missing = []
            for m in sorted(self._members.values(), key=lambda m: m.rank):
                if m.in_step(step) and m.rank not in done:
                    got = m.pending.get(step)
                    missing.append(f"worker-{m.rank}" + (
                        f" ({len(got)} of {m.parts[step]} messages)" if got else ""))
            holds = [f"worker-{w} joining" for w, (first, _) in self._holds.items()
                     if first <= step]
            return [f"step {step} needs " + ", ".join(missing + holds or ["its sums"])]
        need = read_step - self.consistency.staleness
        late = [m for m in self._members.values()
                if m.clock < min(need, m.last if m.last is not None else need)]
        if not late:
            return []
        return [f"clock {need} (reader worker-{reader} at {read_step}, staleness "
                f"{self.consistency.staleness}) needs " + ", ".join(
                    f"worker-{m.rank} (at {m.clock})" for m in sorted(late, key=lambda m: m.rank))]

    @contextmanager
    def read(self, reader: int, read_step: int, wait: float) -> Iterator[str]:
        """Wait (at most ``wait`` seconds) until a read at ``read_step`` can be served. Yields ""
        while the read may run (BSP: no step is applied meanwhile), or a description of what it
        waits for when it must answer pending instead."""
        start = time.monotonic()
        waited = False
        pending = ""
        bsp = self.consistency.mode == "bsp"
        with self._cond:
            while True:
                self._check_failed()
                missing = self._stragglers(reader, read_step)
                if not missing:
                    break
                left = wait - (time.monotonic() - start)
                if left <= 0 or self._waiters >= self._max_waiters:
                    pending = "; ".join(missing)
                    break
                waited = True
                self._waiters += 1
                try:
                    self._cond.wait(min(left, 1.0))
                finally:
                    self._waiters -= 1
            if waited:
                self.reads_waited += 1
                self.wait_seconds += time.monotonic() - start
            if pending:
                bsp = False  # nothing is read
            elif self.consistency.mode == "ssp" and read_step:
                active = [m.clock for m in self._members.values()
                          if m.last is None or m.clock < m.last]
                if active:
                    self.max_staleness = max(self.max_staleness, read_step - min(active))
            if bsp:
                self._readers += 1
        try:
            yield pending
        finally:
            if bsp:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    # -- status ----------------------------------------------------------------------------------

    def stats(self) -> pb.SyncStats:
        """This server's view of the steps, for heartbeats and ``paramserver status``."""
        with self._cond:
            if self.consistency.mode == "bsp":
                step = self.completed
            else:
                clocks = [m.clock for m in self._members.values()
                          if m.last is None or m.clock < m.last]
                step = min(clocks) if clocks else 0
            upcoming = step + 1
            members = sum(1 for m in self._members.values() if m.in_step(upcoming))
            started = upcoming in self._steps or any(upcoming in m.pending
                                                     for m in self._members.values())
            missing = (self._stragglers(-1, upcoming)
                       if self.consistency.mode == "bsp" and started else [])
            return pb.SyncStats(step=step, members=members, max_staleness=self.max_staleness,
                                reads_waited=self.reads_waited, wait_seconds=self.wait_seconds,
                                failed=self.failed, waiting_for="; ".join(missing))
