"""The step group of a synchronous job, kept by the scheduler: which workers each step waits for.

The servers count the steps (:mod:`paramserver.steps`); the scheduler decides who takes part and
tells every server, so all servers combine the same workers in every step:

- The job's ``num_workers`` workers are members from step 1 (a step waits for a worker that has
  not started yet).
- Any other worker, or a worker that left or was removed and comes back, joins before its first
  push. The scheduler asks every server for the first step it has not started (and to hold that
  step and later ones for a moment), takes the largest answer as the worker's first step, and
  tells every server. No server has combined that step without it, so none combines it with it
  missing.
- A worker that runs out of data leaves after its last step (``client.close()``): later steps no
  longer wait for it.
- A worker that dies (its heartbeats stop, or a new incarnation takes its rank) either fails the
  job's steps (``--on-worker-failure fail``: every waiting worker gets an error naming it) or is
  removed (``shrink``: its unfinished contribution is dropped and the steps go on without it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paramserver.sync import Consistency
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["SyncGroup"]

log = logging.getLogger(__name__)

#: Seconds the servers hold steps for a joining worker before the hold lapses by itself.
_JOIN_LEASE = 30.0


@dataclass
class _Record:
    rank: int
    first: int
    last: int = 0                 # its last step (left or removed); 0 while a member
    state: str = "member"
    incarnation: str = ""         # the worker incarnation that joined ("" : not yet seen)


class SyncGroup:
    """The step group of one synchronous job. Thread safe.

    Args:
        consistency: the job's model (bsp or ssp).
        on_worker_failure: ``"fail"`` or ``"shrink"``.
        num_workers: the job's workers, members from step 1.
        call_servers: ``call_servers(method, request, what, timeout)`` calls every live server at
            once and returns their replies by rank; it raises (naming the server) if one fails.
    """

    def __init__(self, consistency: Consistency, on_worker_failure: str, num_workers: int,
                 call_servers: Callable[[str, Any, str, float], dict[int, Any]],
                 on_change: Callable[[], None] = lambda: None) -> None:
        """``on_change`` is called after every change of the group (the scheduler saves its
        state, so a restarted scheduler knows the group)."""
        self.consistency = consistency
        self.on_worker_failure = on_worker_failure
        self._call = call_servers
        self._on_change = on_change
        self._lock = threading.Lock()      # the records
        self._change = threading.Lock()    # one change of the group at a time
        self._members = {r: _Record(r, 1) for r in range(num_workers)}

    def members(self) -> list[pb.SyncMember]:
        """The group as the servers must know it (registration of a server)."""
        with self._lock:
            return [pb.SyncMember(rank=r.rank, first_step=r.first, last_step=r.last,
                                  state=r.state) for r in sorted(self._members.values(),
                                                                 key=lambda r: r.rank)]

    def to_state(self) -> list[dict[str, Any]]:
        """The group as JSON-ready data (the scheduler's state file)."""
        with self._lock:
            return [{"rank": r.rank, "first": r.first, "last": r.last, "state": r.state,
                     "incarnation": r.incarnation} for r in self._members.values()]

    def load_state(self, records: list[dict[str, Any]]) -> None:
        """The group saved by a predecessor scheduler (``--recover``)."""
        with self._lock:
            self._members = {int(r["rank"]): _Record(int(r["rank"]), int(r["first"]),
                                                     int(r["last"]), str(r["state"]),
                                                     str(r["incarnation"])) for r in records}

    def _tell(self, action: int, worker: int, step: int = 0, reason: str = "",
              timeout: float = 10.0) -> dict[int, Any]:
        name = pb.SyncMembersRequest.Action.Name(action).lower()
        return self._call("SyncMembers", pb.SyncMembersRequest(
            action=action, worker=worker, step=step, reason=reason, lease=_JOIN_LEASE),
            f"step group: {name} worker-{worker}", timeout)

    def join(self, rank: int, incarnation: str, timeout: float) -> int:
        """Make worker ``rank`` (this incarnation) a member; returns its first step."""
        with self._change:
            first = 0
            with self._lock:
                record = self._members.get(rank)
                if record is not None and record.state == "member" and \
                        record.incarnation in ("", incarnation):
                    first, changed = record.first, record.incarnation != incarnation
                    record.incarnation = incarnation
            if first:
                if changed:
                    self._on_change()
                return first
            if record is not None and record.state == "member":
                # An older incarnation of the rank is still a member: it is dead (its rank was
                # taken over). Its unfinished contribution goes; the new one joins afresh.
                self._remove(record, f"replaced by a new incarnation of worker-{rank}")
            replies = self._tell(pb.SyncMembersRequest.PROPOSE, rank, timeout=timeout)
            first = max(reply.step for reply in replies.values())
            try:
                self._tell(pb.SyncMembersRequest.COMMIT, rank, first, timeout=timeout)
            except Exception:
                try:
                    self._tell(pb.SyncMembersRequest.ABORT, rank, timeout=5.0)
                except Exception as exc:  # the holds lapse by their lease anyway
                    log.warning("aborting the join of worker-%d: %s", rank, exc)
                raise
            with self._lock:
                self._members[rank] = _Record(rank, first, incarnation=incarnation)
            self._on_change()
            log.info("worker-%d joined the step group at step %d", rank, first)
            return first

    def leave(self, rank: int, incarnation: str, last_step: int) -> None:
        """Worker ``rank`` ran out of data: its last step is ``last_step``."""
        with self._change:
            with self._lock:
                record = self._members.get(rank)
                if record is None or record.state != "member" or (
                        record.incarnation and incarnation != record.incarnation):
                    return
            self._tell(pb.SyncMembersRequest.LEAVE, rank, last_step)
            with self._lock:
                record.last, record.state = max(last_step, record.first - 1), "left"
            self._on_change()
            log.info("worker-%d left the step group after step %d", rank, last_step)

    def check(self, workers: dict[int, tuple[str, bool, bool, str]]) -> None:
        """Act on dead members. ``workers``: rank -> (incarnation, alive, left, description)
        of the worker nodes the scheduler knows."""
        with self._lock:
            members = [r for r in self._members.values() if r.state == "member"]
        for record in members:
            node = workers.get(record.rank)
            if node is None:
                continue  # not started yet: the steps wait for it
            incarnation, alive, left, description = node
            if record.incarnation and incarnation != record.incarnation:
                self._died(record, f"worker-{record.rank} was replaced by a new incarnation")
            elif left:
                # Deregistered without leaving the group (it never pushed, or an old client).
                with self._change:
                    self._remove(record, f"{description} left the job")
            elif not alive:
                self._died(record, f"{description} died")

    def _died(self, record: _Record, what: str) -> None:
        with self._change:
            if record.state != "member":
                return
            if self.on_worker_failure == "shrink":
                self._remove(record, what)
                log.warning("%s; the step group goes on without it (--on-worker-failure "
                            "shrink)", what)
                return
            reason = (f"{what}: the steps of this job fail (--on-worker-failure fail; "
                      f"use shrink to go on without it)")
            try:
                self._tell(pb.SyncMembersRequest.FAIL, record.rank, reason=reason)
            except Exception as exc:
                log.error("failing the steps after %s: %s", what, exc)
                return
            with self._lock:
                record.state = f"failed: {what}"
            self._on_change()
            log.error("%s; the job's steps fail (--on-worker-failure fail)", what)

    def _remove(self, record: _Record, what: str) -> None:
        """Caller holds ``_change``."""
        try:
            self._tell(pb.SyncMembersRequest.REMOVE, record.rank, reason=what)
        except Exception as exc:
            log.error("removing worker-%d from the step group: %s", record.rank, exc)
            return
        with self._lock:
            record.state = f"removed: {what}"
            record.last = max(record.last, record.first - 1)
        self._on_change()
