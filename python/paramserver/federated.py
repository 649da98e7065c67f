"""Participants of a federated job (see docs/federated.md).

A participant holds data that never leaves it: it fetches the global model, trains locally with
anything (numpy, torch), and submits its new values (or its delta) with the number of examples it
trained on. The servers apply each table's optimizer once per round to minus the example-weighted
mean of the deltas (FedAvg is ``ps.SGD(lr=1.0)``, FedAdam ``ps.FedAdam(...)``)::

    import paramserver as ps
    from paramserver.federated import Participant

    with ps.connect() as client:
        client.dense("w", shape=(784, 10), optimizer=ps.SGD(lr=1.0))      # FedAvg
        me = Participant(client, ["w"], name="hospital-3")
        while (model := me.fetch()) is not None:      # waits until selected; None: job finished
            new = train(model.values, my_data)         # {"w": array}, model.round, model.version
            me.submit(new, num_examples=len(my_data))

Participants are light identities: one process (one client) may host many, e.g. simulated ones,
and run them one after the other; :func:`selected` tells which of them the open round picked.
A participant is live while its host's client is (heartbeats): if the process dies mid-round,
its update is not counted, even if some of it reached the servers.

Only dense tables take part in federated rounds (an embedding table is refused by name).

An update is all or nothing across the servers: if one server refuses its part (e.g. a value it
finds not finite), the parts the others accepted are withdrawn, nothing is counted, and the
participant may submit a corrected update for the same round. ``num_examples`` is bounded
(:data:`paramserver.fedbounds.MAX_NUM_EXAMPLES`). A round whose combined step would not be
finite is abandoned; :attr:`GlobalModel.last_abandoned_reason` says why, naming participants.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.client import Client
from paramserver.errors import (
    InvalidRequestError,
    ParamServerError,
    PSTimeoutError,
    RoundClosedError,
)
from paramserver.fedbounds import check_num_examples
from paramserver.plan import DenseRef
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["Participant", "GlobalModel", "selected", "status", "wait_version"]

log = logging.getLogger(__name__)

#: Seconds one poll may wait on the scheduler (the client asks again until its own deadline).
_POLL = 1.0
#: Seconds before a round's deadline after which a fetched model is checked to be the round's.
_MARGIN = 0.5


@dataclass(frozen=True)
class GlobalModel:
    """The global model a participant trains from in one round.

    Attributes:
        round: the open round this participant is selected for; submit its update for it.
        version: the round whose update the model holds (0: the initial model; rounds that
            closed without enough updates leave it unchanged).
        values: ``{table: float32 array of the table's shape}``, the participant's own copies.
        deadline_in: seconds left of the round when it was fetched.
        last_abandoned_round: the job's last abandoned round (0: none so far).
        last_abandoned_reason: why it was abandoned, naming the participants it concerns
            (e.g. "round 2 abandoned (updates counted: 'a', 'b'): round 2 on server-0: table
            'w': the step would make its values not finite (inf at flat element 0); ...").
    """

    round: int
    version: int
    values: dict[str, np.ndarray]
    deadline_in: float
    last_abandoned_round: int = 0
    last_abandoned_reason: str = ""


class Participant:
    """A federated participant hosted by ``client`` (see the module docstring).

    Args:
        client: the hosting process's connection (:func:`paramserver.connect`); its liveness is
            the participant's.
        tables: the dense tables of the model (default: every ready table of the job, which
            must all be dense).
        name: the participant's identity, unique in the job (default: the client's node id); a
            name seen before rejoins (e.g. a simulated participant hosted again later).
        timeout: default seconds :meth:`fetch` waits to be selected (default: the client's
            timeout).

    Thread safety: one participant is used by one thread at a time.

    Raises:
        InvalidRequestError: the job is not federated, a table is unknown or not dense, or the
            name is taken by another live host.
    """

    def __init__(self, client: Client, tables: Sequence[str] | None = None, name: str | None = None,
                 *, timeout: float | None = None) -> None:
        self._client = client
        self.name = name if name is not None else client.node_id
        if tables is None:
            tables = sorted(client.tables())
        self.tables = list(tables)
        if not self.tables:
            raise InvalidRequestError(f"participant {self.name!r}: the model has no tables "
                                      f"(declare them with client.dense first)")
        refs = {}
        for table in self.tables:
            client.table(table)  # attaches the placement (TableNotFoundError if unknown)
            ref = client._ref(table)
            if not isinstance(ref, DenseRef):
                raise InvalidRequestError(f"participant {self.name!r}: table {table!r} is an "
                                          f"embedding table; federated rounds take dense tables")
            refs[table] = ref
        self._refs: dict[str, DenseRef] = refs
        self.timeout = timeout if timeout is not None else client.config.timeout
        self._round = 0
        self._submitted = 0
        # set by selected(): (the poll's reply, when the poll was sent)
        self._offered: tuple[pb.RoundPollReply, float] | None = None
        # set by selected(): the round's model, read once for the participants it named
        self._shared: dict[str, Any] | None = None
        self._call("FederatedJoin", pb.FederatedJoinRequest(
            node_id=client.node_id, participants=[self.name]), f"join as participant {self.name!r}")

    def _call(self, method: str, request: Any, what: str) -> Any:
        return self._client._membership.call(method, request, what=what)

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, tables={self.tables})"

    # -- rounds ----------------------------------------------------------------------------------

    def fetch(self, wait: bool = True, timeout: float | None = None) -> GlobalModel | None:
        """Wait until this participant is selected for an open round (at most ``timeout``
        seconds), then return the global model and the round. None when the job ran its last
        round. With ``wait=False`` the current model is returned at once, whether or not this
        participant is selected (``round`` is then 0 unless it is).

        Raises PSTimeoutError naming the round and the participant if it is not selected in
        time."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        offered, self._offered = self._offered, None
        while True:
            if offered is not None and wait:
                reply, asked = offered  # selected() said this participant is in the open round
                offered = None
            else:
                asked = time.monotonic()
                reply = self._poll(wait and timeout > 0, deadline)
            if reply.finished and not reply.selected:
                return None
            if not reply.selected and wait:
                if time.monotonic() >= deadline:
                    raise PSTimeoutError(
                        f"participant {self.name!r} was not selected for a round within "
                        f"{timeout:.1f} s (the job is at round {reply.round or '-'}, "
                        f"{reply.state}, model version {reply.version})")
                continue
            shared = self._shared if reply.selected else None
            self._shared = None
            if shared is not None and shared.get("round") == reply.round:
                values = {k: v.copy() for k, v in shared["values"].items()}
            else:
                values = self._client.pull(self.tables)
            # The values are the round's model if the round was open all along the read (a
            # round's update is applied only after it closes). While a selected participant has
            # not submitted and its host is alive, its round closes only at its deadline (the
            # scheduler's, which is no earlier than `asked + deadline_in` here): within it, no
            # need to ask. Otherwise, ask whether the round (or the version) is still the same.
            if not (reply.selected and time.monotonic() < asked + reply.deadline_in - _MARGIN):
                check = self._poll(False, deadline)
                if (check.round, check.version) != (reply.round, reply.version):
                    continue
            if shared is not None and shared.get("round") != reply.round:
                # the round's model, checked: the others selected() named need not read it
                shared.update(round=reply.round, values={k: v.copy() for k, v in values.items()})
            self._round = reply.round if reply.selected else 0
            if self._submitted and reply.last_abandoned_round == self._submitted:
                log.warning("participant %r: its update for round %d was not applied: %s",
                            self.name, self._submitted, reply.last_abandoned_reason)
                self._submitted = 0  # said once
            return GlobalModel(round=self._round, version=reply.version, values=values,
                               deadline_in=reply.deadline_in,
                               last_abandoned_round=reply.last_abandoned_round,
                               last_abandoned_reason=reply.last_abandoned_reason)

    def _poll(self, wait: bool, deadline: float) -> pb.RoundPollReply:
        left = max(0.0, deadline - time.monotonic())
        return self._call("FederatedPoll", pb.RoundPollRequest(
            node_id=self._client.node_id, participants=[self.name],
            wait=min(left, _POLL) if wait else 0.0), f"poll of participant {self.name!r}")

    def submit(self, update: Mapping[str, Any], num_examples: float, *, delta: bool = False,
               round: int | None = None) -> int:  # noqa: A002 (the protocol's word)
        """Send this participant's update for the round it fetched (or ``round``): every table's
        new values (``delta=False``: the servers take the delta against the round's model) or
        its delta, weighted by ``num_examples`` (in ``(0, MAX_NUM_EXAMPLES]``, see
        :mod:`paramserver.fedbounds`) in the round's mean. The update goes to every server, then
        is reported to the scheduler, which counts it. If a server refuses its part, the parts
        other servers accepted are withdrawn and nothing is counted: a corrected update may then
        be submitted for the same round.

        Returns the updates the round has received so far (this one included).

        Raises:
            InvalidRequestError: a table missing, unknown, or of the wrong shape; values not
                finite; num_examples out of bounds; no round fetched; the participant is not
                selected for the round; a server refused its part (nothing is counted).
            RoundClosedError: the round closed before the update arrived ("update for round 3
                refused: round 3 closed, the job is at round 5"); nothing is counted.
        """
        return self._submit_checked(*self._prepare(update, num_examples, delta, round))

    def submit_async(self, update: Mapping[str, Any], num_examples: float, *,
                     delta: bool = False, round: int | None = None  # noqa: A002
                     ) -> Future[int]:
        """:meth:`submit` in the background, e.g. while the next simulated participant of this
        process trains. The update is checked now (the same InvalidRequestError as
        :meth:`submit`); sending it runs on the client's background thread, in order with the
        client's other ``*_async`` calls. The arrays must not be modified until the future is
        done; its result is :meth:`submit`'s (or its RoundClosedError)."""
        prepared = self._prepare(update, num_examples, delta, round)
        return self._client._submit(self._submit_checked, *prepared)

    def _prepare(self, update: Mapping[str, Any], num_examples: float, delta: bool,
                 round_: int | None) -> tuple[dict[str, np.ndarray], int, float, bool, bool]:
        """Check an update before anything is sent; the arrays, round, weight, kind, and
        whether the round is the fetched one."""
        target = self._round if round_ is None else int(round_)
        if target <= 0:
            raise InvalidRequestError(f"participant {self.name!r}: fetch the model of a round "
                                      f"it is selected for before submitting")
        try:
            weight = check_num_examples(num_examples, f"participant {self.name!r}")
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        arrays = self._check(update, delta)
        if round_ is None:
            self._round = 0  # one update per fetched round
        return arrays, target, weight, delta, round_ is None

    def _submit_checked(self, arrays: dict[str, np.ndarray], round_: int, weight: float,
                        delta: bool, fetched: bool = False) -> int:
        label = f"federated update of participant {self.name!r} for round {round_}"
        try:
            attempt = self._send(arrays, round_, weight, delta, label)
        except RoundClosedError:
            raise
        except ParamServerError:
            if fetched and self._round == 0:
                self._round = round_  # nothing counted: a corrected update may follow
            raise
        reply = self._call("FederatedReport", pb.RoundReportRequest(
            node_id=self._client.node_id, participant=self.name, round=round_,
            num_examples=weight, attempt=attempt), label)
        self._submitted = round_
        return reply.received

    def _send(self, arrays: dict[str, np.ndarray], round_: int, weight: float, delta: bool,
              label: str) -> int:
        """The update to every server (all at once), before the report that makes it count, as
        one attempt; returns its id. If a server refuses its part, the attempt is withdrawn from
        every server and the refusal raised, saying so."""
        client = self._client
        attempt = secrets.randbits(64) or 1

        def send(rank: int, slices: list[list[pb.DenseSlice]]) -> None:
            for part, dense in enumerate(slices):
                client._pool.call(rank, "FederatedSubmit", pb.FederatedUpdate(
                    participant=self.name, round=round_, num_examples=weight, is_delta=delta,
                    part=part, parts=len(slices), dense=dense, attempt=attempt), label)

        try:
            client._pool.on_servers(self._messages(arrays), send)
        except ParamServerError as exc:
            self._withdraw(round_, attempt, label)
            if isinstance(exc, RoundClosedError):
                raise
            raise type(exc)(f"{exc}; nothing of this update counts (its parts were withdrawn "
                            f"from every server): a corrected update may be submitted for "
                            f"round {round_}") from exc
        return attempt

    def _withdraw(self, round_: int, attempt: int, label: str) -> None:
        """Drop ``attempt`` from every server (best effort: a part left on a server that cannot
        be reached is never counted, and a later attempt replaces it)."""
        client = self._client

        def withdraw(rank: int, _: None) -> None:
            try:
                client._pool.call(rank, "FederatedSubmit", pb.FederatedUpdate(
                    participant=self.name, round=round_, attempt=attempt, withdraw=True),
                    f"withdrawal of the {label}")
            except ParamServerError as exc:
                log.warning("participant %r: withdrawing its refused update from server-%d "
                            "failed: %s", self.name, rank, exc)

        client._pool.on_servers({server.rank: None for server in client._pool.all()}, withdraw)

    def _check(self, update: Mapping[str, Any], delta: bool) -> dict[str, np.ndarray]:
        """Every table of the model, as a finite float32 C array of its shape."""
        what = "delta" if delta else "new values"
        extra = sorted(set(update) - set(self.tables))
        missing = [t for t in self.tables if t not in update]
        if extra or missing:
            raise InvalidRequestError(
                f"participant {self.name!r}: an update carries every table of the model "
                f"({self.tables}); " + (f"missing {missing}" if missing else "")
                + ("; " if extra and missing else "") + (f"unknown {extra}" if extra else ""))
        out = {}
        for table in self.tables:
            ref = self._refs[table]
            array = np.ascontiguousarray(update[table], dtype=np.float32)
            if array.shape != ref.shape:
                raise InvalidRequestError(f"participant {self.name!r}: table {table!r} {what} "
                                          f"have shape {array.shape}, the table is {ref.shape}")
            flat = array.reshape(-1)
            bad = np.flatnonzero(~np.isfinite(flat))
            if bad.size:
                raise InvalidRequestError(f"participant {self.name!r}: table {table!r} {what} "
                                          f"are not finite ({flat[bad[0]]} at flat index "
                                          f"{bad[0]}); nothing was sent")
            out[table] = flat
        return out

    def _messages(self, arrays: dict[str, np.ndarray]) -> dict[int, list[list[pb.DenseSlice]]]:
        """Each server's blocks of every table, cut into messages of about message_bytes. Every
        server gets at least one message (maybe empty), so each one records the update."""
        limit = self._client.config.message_bytes
        out: dict[int, list[list[pb.DenseSlice]]] = {}
        for server in self._client._pool.all():
            rank = server.rank
            messages: list[dict[str, tuple[list[int], list[np.ndarray]]]] = []
            current: dict[str, tuple[list[int], list[np.ndarray]]] = {}
            size = 0
            for table, flat in arrays.items():
                ref = self._refs[table]
                blocks = ref.by_server.get(rank, [])
                spans = ref.ranges[rank][0] if blocks else []
                for block, (start, stop) in zip(blocks, spans):
                    nbytes = 4 * (stop - start)
                    if size and size + nbytes > limit:
                        messages.append(current)
                        current, size = {}, 0
                    entry = current.setdefault(table, ([], []))
                    entry[0].append(block)
                    entry[1].append(flat[start:stop])
                    size += nbytes
            messages.append(current)
            out[rank] = [[pb.DenseSlice(table=t, blocks=b, data=np.concatenate(c).tobytes())
                          for t, (b, c) in m.items()] for m in messages]
        return out


def selected(participants: Iterable[Participant], timeout: float | None = None
             ) -> list[Participant] | None:
    """Of ``participants`` (all hosted by one client), those selected for the open round that
    have not submitted yet; waits (at most ``timeout`` seconds, default the client's) until
    there is at least one. None when the job ran its last round. One call to the scheduler per
    second at most, whatever the number of participants.

    Raises PSTimeoutError if none is selected in time."""
    group = list(participants)
    if not group:
        raise InvalidRequestError("selected() needs at least one participant")
    client = group[0]._client
    if any(p._client is not client for p in group):
        raise InvalidRequestError("selected(): the participants must share one client")
    timeout = client.config.timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    by_name = {p.name: p for p in group}
    while True:
        left = max(0.0, deadline - time.monotonic())
        asked = time.monotonic()
        reply = client._membership.call("FederatedPoll", pb.RoundPollRequest(
            node_id=client.node_id, participants=list(by_name), wait=min(left, _POLL)),
            what="poll of the federated round")
        if reply.selected:
            chosen = [by_name[n] for n in reply.selected]
            shared: dict[str, Any] = {}  # the round's model, read by the first fetch()
            for p in chosen:  # their fetch() need not ask again, nor read the model again
                p._shared = shared
                p._offered = (pb.RoundPollReply(
                    round=reply.round, version=reply.version, selected=[p.name],
                    state=reply.state, deadline_in=reply.deadline_in,
                    last_abandoned_round=reply.last_abandoned_round,
                    last_abandoned_reason=reply.last_abandoned_reason), asked)
            return chosen
        if reply.finished:
            return None
        if time.monotonic() >= deadline:
            raise PSTimeoutError(f"none of the participants {sorted(by_name)[:10]} was selected "
                                 f"within {timeout:.1f} s (the job is {reply.state}, model "
                                 f"version {reply.version})")


def wait_version(client: Client, after: int, timeout: float | None = None) -> tuple[int, bool]:
    """Wait (at most ``timeout`` seconds, default the client's) until the global model's version
    passes ``after``, or the job finished; return ``(version, finished)``. For an evaluator
    following the rounds; one scheduler call per second at most while nothing changes.

    Raises PSTimeoutError if neither happens in time."""
    timeout = client.config.timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        reply = client._membership.call("FederatedPoll", pb.RoundPollRequest(
            node_id=client.node_id, wait=min(left, _POLL), version_after=after),
            what="wait for the next model version")
        if reply.version > after or reply.finished:
            return reply.version, reply.finished
        if time.monotonic() >= deadline:
            raise PSTimeoutError(f"the model stayed at version {reply.version} for "
                                 f"{timeout:.1f} s (the job is {reply.state})")


def status(client: Client) -> dict[str, Any]:
    """The job's rounds as the scheduler knows them, as in ``paramserver status --json``: round,
    state, model version, selected and received participants, participants seen and live,
    rounds applied and abandoned, ... InvalidRequestError if the job is not federated."""
    from paramserver.status import status_to_dict

    reply = client._membership.call("Status", pb.StatusRequest(), what="status")
    if not reply.HasField("federated"):
        raise InvalidRequestError("this job is not federated")
    return status_to_dict(reply)["federated"]
