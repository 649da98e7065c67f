"""The write gate of one server: which write messages may be applied now, and the server's half of
a checkpoint's consistent cut.

A checkpoint must reflect the same set of applied pushes on every server: a push that spans several
servers (or several messages to one server) is in every part of the checkpoint or in none. Every
write message carries an :class:`~paramserver.v1.paramserver_pb2.OpTag`: the client, the operation's
sequence number, the servers it writes to and how many messages each gets. The scheduler then runs
the cut in two phases (see :mod:`paramserver.coordinator`):

1. ``prepare``: every server closes its gate. From then on a write message is applied only if its
   operation was admitted here before the close; any other write is refused with ABORTED, without
   touching state or holding a thread, and the client retries it a few milliseconds later. Each
   server answers with the multi-server operations it admitted.
2. ``drain``: the scheduler sends every server the union of those operations. A server admits the
   ones that involve it (their refused messages are accepted when the client retries), waits until
   every message of every admitted operation has been applied here and nothing is in flight, and
   then the state is copied to memory and the gate reopens.

So an operation is in the cut on every server it touches if any server admitted it before closing,
and on none otherwise. Reads are never held. A gate that stays closed longer than the cut's lease
(the scheduler died mid-cut) reopens by itself.

Clients report, with every operation, the sequence number below which all their operations are
fully acknowledged (``OpTag.done_below``), so the gate only remembers operations still in flight.

A client that is gone cannot hold a cut. A client's id is ``NODE/INCARNATION`` (a worker's node id
and the incarnation the scheduler gave it); while some message of an admitted operation is
missing, the drain asks the scheduler, at most every :data:`ASK_EVERY` seconds, which of the
waiting clients are gone: deregistered, dead (no heartbeat within the job's heartbeat timeout) or
replaced by a newer incarnation of their rank (:func:`gone_clients`). The drain stops waiting for
the missing messages of a gone client: the cut holds exactly what arrived (a late message of that
operation is admitted while the drain still waits, and held until the gate reopens once the state
is being copied), and the server logs the operation as incomplete. Only a client killed in the
middle of a push to several servers leaves such an operation, and then the servers' live state
has it partially too: no cut could put it in every part or in none. (The launcher's final
checkpoint after Ctrl-C is taken while the workers still run, so none of them is stopped in the
middle of a push before it; see :mod:`paramserver.launch`.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from paramserver.errors import PSTimeoutError
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["ASK_EVERY", "WriteGate", "WritesHeld", "gone_clients", "op_key"]

log = logging.getLogger(__name__)

#: Operations not pruned by their client's ``done_below`` are forgotten after this many seconds:
#: a client's call has timed out long before, so no part of them can still arrive.
_HORIZON = 600.0
#: Seconds between two questions to the scheduler about the clients a drain waits for.
ASK_EVERY = 0.25
#: Gone clients a gate remembers (their operations are never waited for again).
_GONE_LIMIT = 4096


class WritesHeld(Exception):
    """A write refused because a checkpoint's cut holds writes; the client retries it (ABORTED)."""


def op_key(tag: pb.OpTag) -> tuple[str, int]:
    """The identity of a logical write operation."""
    return tag.client, tag.seq


def gone_clients(view: pb.ClusterView, clients: Iterable[str]) -> set[str]:
    """Of ``clients`` (ids ``NODE/INCARNATION``), those the scheduler's ``view`` says are gone:
    their node is unknown, deregistered, dead, or now holds another incarnation. An id without
    an incarnation is judged by its node alone."""
    nodes = {n.node_id: n for n in view.nodes}
    gone = set()
    for client in clients:
        node_id, _, incarnation = client.partition("/")
        node = nodes.get(node_id)
        if node is None or node.left or not node.alive or (
                incarnation and node.incarnation and node.incarnation != incarnation):
            gone.add(client)
    return gone


@dataclass
class _Op:
    tag: pb.OpTag
    parts_here: int       # messages of the operation bound for this server
    started: int = 0      # of those, admitted so far
    done: int = 0         # of those, finished (applied or rejected as invalid)
    seen: float = 0.0


class WriteGate:
    """Admission of write messages at one server. Thread safe.

    ``rank`` must be set (once the server has registered) before tagged writes arrive.
    ``ask_gone`` (set once the server has registered): given client ids, returns those the
    scheduler says are gone; a drain stops waiting for their missing messages. Without it, a
    drain waits for every message (up to its timeout).
    """

    def __init__(self, node: str) -> None:
        self.ask_gone: Callable[[set[str]], set[str]] | None = None
        self._gone: dict[str, None] = {}      # clients known gone, oldest first
        self.node = node
        self.rank = 0
        self._cond = threading.Condition()
        self._ops: dict[tuple[str, int], _Op] = {}
        self._done_below: dict[str, int] = {}
        self._inflight = 0
        self._cut: int | None = None          # the cut holding writes, if any
        self._lease_end = 0.0
        self._allowed: set[tuple[str, int]] = set()
        self._closed_at = 0.0
        #: What the last drain left incomplete (operations of gone clients), for the log.
        self.incomplete: list[str] = []

    # -- data path -------------------------------------------------------------------------------

    def enter(self, tag: pb.OpTag | None) -> tuple[str, int] | None:
        """Admit one write message or raise :class:`WritesHeld`. Returns the handle for
        :meth:`leave` (call it whatever the message's outcome)."""
        now = time.monotonic()
        with self._cond:
            if self._cut is not None and now > self._lease_end:
                self._reopen_locked()
            key = None
            if tag is not None and tag.client:
                self._prune_locked(tag, now)
                parts = self.parts_here(tag)
                if len(tag.servers) > 1 or parts > 1:
                    key = op_key(tag)
            if self._cut is not None and (key is None or key not in self._allowed):
                raise WritesHeld(f"{self.node} holds writes for checkpoint cut {self._cut}")
            if key is not None:
                op = self._ops.get(key)
                if op is None:
                    op = self._ops[key] = _Op(tag, self.parts_here(tag), seen=now)
                op.started += 1
            self._inflight += 1
            return key if key is not None else ("", -1)

    def leave(self, handle: tuple[str, int] | None) -> None:
        """One admitted message finished (applied, or refused as invalid without changes)."""
        with self._cond:
            self._inflight -= 1
            if handle is not None and handle[0]:
                op = self._ops.get(handle)
                if op is not None:
                    op.done += 1
            self._cond.notify_all()

    def parts_here(self, tag: pb.OpTag) -> int:
        """Messages of the operation ``tag`` bound for this server."""
        for server, parts in zip(tag.servers, tag.parts):
            if server == self.rank:
                return parts
        return 1

    def _prune_locked(self, tag: pb.OpTag, now: float) -> None:
        below = tag.done_below
        if below > self._done_below.get(tag.client, 0):
            self._done_below[tag.client] = below
            stale = [k for k, op in self._ops.items() if k[0] == tag.client and k[1] < below
                     and op.done >= op.started]
            for k in stale:
                del self._ops[k]
        if len(self._ops) > 4096:
            old = [k for k, op in self._ops.items() if now - op.seen > _HORIZON
                   and op.done >= op.started]
            for k in old:
                del self._ops[k]

    # -- cut protocol ----------------------------------------------------------------------------

    def prepare(self, cut: int, lease: float) -> list[pb.OpTag]:
        """Close the gate for ``cut`` (replacing any unfinished cut) and return the multi-server
        operations admitted here, which must be in the cut on every server they touch."""
        with self._cond:
            self._cut = cut
            self._closed_at = time.monotonic()
            self._lease_end = self._closed_at + lease
            # Operations with a message already admitted here keep being admitted.
            self._allowed = set(self._ops)
            return [op.tag for op in self._ops.values() if len(op.tag.servers) > 1]

    def drain(self, cut: int, ops: list[pb.OpTag], timeout: float) -> float:
        """Admit ``ops`` that involve this server, then wait until every message of every admitted
        operation has been applied here and no write is in flight. Returns with the gate still
        closed (copy the state, then :meth:`reopen`); the seconds the gate has been closed.

        Messages of a client that is gone (see the module doc) are not waited for; the
        operations left incomplete that way are in :attr:`incomplete` afterwards, and forgotten.

        Raises PSTimeoutError naming an operation whose messages did not all arrive in
        ``timeout`` seconds (its client is stuck, or died and is not yet known dead); the gate is
        then reopened.
        """
        deadline = time.monotonic() + timeout
        next_ask = time.monotonic()
        with self._cond:
            self._check_cut_locked(cut)
            self.incomplete = []
            for tag in ops:
                # An operation below its client's done_below finished everywhere (its entry here
                # may already be pruned): nothing to wait for.
                if self.rank in tag.servers and tag.seq >= self._done_below.get(tag.client, 0):
                    key = op_key(tag)
                    self._allowed.add(key)
                    if key not in self._ops:
                        self._ops[key] = _Op(tag, self.parts_here(tag), seen=time.monotonic())
        while True:
            with self._cond:
                self._check_cut_locked(cut)
                missing = [(k, op) for k in self._allowed
                           if (op := self._ops.get(k)) is not None and op.done < op.parts_here
                           and k[0] not in self._gone]
                if not missing and self._inflight == 0:
                    self._forget_gone_locked()
                    return time.monotonic() - self._closed_at
                now = time.monotonic()
                if now >= deadline:
                    self._reopen_locked()
                    if missing:
                        (client, seq), op = missing[0]
                        raise PSTimeoutError(
                            f"{self.node}: checkpoint cut {cut} waited {timeout:.1f} s for "
                            f"operation {seq} of client {client}: {op.done} of its "
                            f"{op.parts_here} messages here arrived ({len(missing)} operations "
                            f"incomplete; its client is not known to be gone)")
                    raise PSTimeoutError(f"{self.node}: checkpoint cut {cut} waited {timeout:.1f}"
                                         f" s for {self._inflight} writes in flight")
                ask = missing and self.ask_gone is not None and now >= next_ask
                if not ask:
                    self._cond.wait(min(deadline - now, 0.05))
                    continue
                clients = {k[0] for k, _ in missing}
            # Outside the lock: writes keep being admitted while the scheduler answers.
            next_ask = time.monotonic() + ASK_EVERY
            try:
                gone = self.ask_gone(clients) if self.ask_gone is not None else set()
            except Exception as exc:  # the scheduler is unreachable: keep waiting
                log.warning("%s: cannot ask the scheduler whether clients %s are gone: %s",
                            self.node, sorted(clients)[:5], exc)
                continue
            with self._cond:
                for client in gone:
                    self._gone[client] = None
                while len(self._gone) > _GONE_LIMIT:
                    del self._gone[next(iter(self._gone))]

    def _forget_gone_locked(self) -> None:
        """After a drain: record the incomplete operations of gone clients and forget every
        operation of theirs (they will never finish, and must not hold the next cut)."""
        for key in [k for k in self._ops if k[0] in self._gone]:
            op = self._ops.pop(key)
            # A late message of it must not be applied while the state is being copied.
            self._allowed.discard(key)
            if op.done < op.parts_here:
                self.incomplete.append(
                    f"operation {key[1]} of client {key[0]} (gone): {op.done} of its "
                    f"{op.parts_here} messages to {self.node} arrived")
        if self.incomplete:
            log.warning("checkpoint cut %s holds incomplete operations of clients that are gone "
                        "(killed in the middle of a push): %s", self._cut,
                        "; ".join(self.incomplete[:10]))

    def reopen(self, cut: int) -> float:
        """Let writes in again after ``cut`` (no-op if that cut is no longer the current one);
        returns the seconds the gate was closed."""
        with self._cond:
            held = time.monotonic() - self._closed_at
            if self._cut == cut:
                self._reopen_locked()
            return held

    def holding(self) -> int | None:
        """The cut currently holding writes, if any."""
        with self._cond:
            return self._cut

    def _check_cut_locked(self, cut: int) -> None:
        if self._cut != cut:
            raise PSTimeoutError(f"{self.node}: checkpoint cut {cut} is no longer open (its lease "
                                 f"expired or a newer cut replaced it)")

    def _reopen_locked(self) -> None:
        self._cut = None
        self._allowed = set()
        self._cond.notify_all()
