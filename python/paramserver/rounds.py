"""The rounds of a federated job, owned by the scheduler (see docs/federated.md).

Participants are light identities (a name) hosted by worker processes; a participant is live while
its host is (heartbeats), so a SIGKILLed host's participants are neither selected nor counted. One
round at a time:

1. **Open** round ``r``: once ``clients_per_round`` (K) participants are live (and at least
   ``min_participants``; after a round timeout with at least ``min_updates`` live, those will
   do), select K of them: the live participants selected
   least often so far, spread over their hosts, ties broken by a generator seeded with the
   job's seed (fair and reproducible). Every server is told (``RoundControl OPEN``) and accepts
   updates for round ``r`` from those participants only.
2. A selected participant fetches the global model, trains, sends its update to the servers and
   then *reports* it here with its ``num_examples``. Reports for closed rounds are refused with
   :class:`~paramserver.errors.RoundClosedError` naming both rounds.
3. **Close** when every selected participant reported (K updates), when the ones that did not can
   no longer (their hosts died), or at the round timeout. With at least ``min_updates`` reports
   the servers apply the round (``COMMIT``, with the counted participants and their weights; with
   DP-FedAvg first ``NORMS``, to clip each update by its norm over all servers); with fewer the
   round is abandoned and the model stays as it was. The model's version is the last applied
   round; then round ``r + 1`` opens, until ``rounds`` rounds ran.

Every round that closes ends either applied or abandoned, whatever goes wrong while combining:
before the commit, every server checks the round's step (``PREPARE``: the combined update, the
new values and the optimizer state must be finite, see :mod:`paramserver.fedbounds`); a round
one server refuses, or whose combining fails in any way, is abandoned on every server with the
reason (naming the participants it concerns) in the status, the participants' polls and the log.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paramserver.config import FederatedConfig
from paramserver.errors import ParamServerError, RoundClosedError
from paramserver.fedbounds import check_num_examples
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["RoundCoordinator"]

log = logging.getLogger(__name__)

#: Longest a poll waits on the scheduler before answering (the participant asks again).
_POLL_WAIT = 1.0
#: Seconds a round control call to the servers may take.
_CONTROL_TIMEOUT = 60.0
#: Seconds between attempts to open a round the servers refused (a server down).
_RETRY = 1.0


@dataclass
class _Participant:
    name: str
    host: str                  # node id of the hosting worker
    selections: int = 0        # rounds it was selected for
    counted: int = 0           # rounds its update was counted in


class RoundCoordinator:
    """The scheduler's rounds of a federated job. Thread safe; :meth:`start` runs the rounds on
    a background thread.

    Args:
        config: the job's rounds.
        call_servers: ``call_servers(method, request, what, timeout)`` calls every server of the
            job and returns ``{rank: reply}``; raises ParamServerError if one is down or fails.
        host_alive: whether the worker ``node_id`` is alive (heartbeats, not left).
    """

    def __init__(self, config: FederatedConfig,
                 call_servers: Callable[[str, Any, str, float], dict[int, Any]],
                 host_alive: Callable[[str], bool]) -> None:
        self.config = config
        self._call_servers = call_servers
        self._host_alive = host_alive
        self._cond = threading.Condition()
        self._participants: dict[str, _Participant] = {}
        self._rng = random.Random(config.seed)
        self.round = 0                    # the current (or last) round
        self.state = "waiting for participants"
        self.version = 0
        self._selected: list[str] = []
        self._received: dict[str, float] = {}   # participant -> num_examples, current round
        self._attempts: dict[str, int] = {}     # participant -> the attempt it reported
        self._deadline = 0.0
        self.rounds_applied = 0
        self.rounds_abandoned = 0
        self.last_counted = 0
        self.last_error = ""
        self.last_abandoned_round = 0
        self.last_abandoned_reason = ""
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- participants ----------------------------------------------------------------------------

    def join(self, host: str, names: list[str]) -> pb.FederatedStatus:
        """Participants ``names`` join (or rejoin) the job, hosted by worker ``host``; they can be
        selected from the next round that opens. ValueError for an empty or bad name, or one
        hosted by another live worker."""
        if not names:
            raise ValueError("a join names at least one participant")
        with self._cond:
            for name in names:
                if not name or len(name) > 256:
                    raise ValueError(f"a participant needs a name of 1 to 256 characters, got "
                                     f"{name[:40]!r}")
                known = self._participants.get(name)
                if known is not None and known.host != host and self._host_alive(known.host):
                    raise ValueError(f"participant {name!r} is hosted by live {known.host}; "
                                     f"{host} cannot host it too")
            for name in names:
                known = self._participants.get(name)
                if known is None:
                    self._participants[name] = _Participant(name, host)
                else:
                    known.host = host
            self._cond.notify_all()
        return self.status()

    def _check_hosted(self, host: str, name: str) -> _Participant:
        participant = self._participants.get(name)
        if participant is None:
            raise ValueError(f"participant {name!r} has not joined this federated job")
        if participant.host != host:
            raise ValueError(f"participant {name!r} is hosted by {participant.host}, not {host}")
        return participant

    def _live(self) -> list[_Participant]:
        """Participants whose host is alive, by name (caller holds the lock)."""
        return [p for _, p in sorted(self._participants.items()) if self._host_alive(p.host)]

    def poll(self, host: str, names: list[str], wait: float,
             version_after: int = 0) -> pb.RoundPollReply:
        """The open round, and which of ``names`` are selected for it and have not reported yet.
        With ``wait`` > 0, waits (at most about a second here) until one of them is, or the job
        finished; with no names, until the model's version passes ``version_after``."""
        deadline = time.monotonic() + min(max(wait, 0.0), _POLL_WAIT)
        with self._cond:
            for name in names:
                self._check_hosted(host, name)
            while True:
                is_open = self.state == "open"
                selected = [n for n in names if is_open and n in self._selected
                            and n not in self._received]
                finished = self.state == "finished"
                left = deadline - time.monotonic()
                newer = not names and self.version > version_after
                if selected or finished or newer or left <= 0:
                    return pb.RoundPollReply(
                        round=self.round if is_open else 0, version=self.version,
                        selected=selected, finished=finished, state=self.state,
                        deadline_in=max(0.0, self._deadline - time.monotonic()) if is_open
                        else 0.0, last_abandoned_round=self.last_abandoned_round,
                        last_abandoned_reason=self.last_abandoned_reason)
                self._cond.wait(min(left, 0.25))

    def report(self, host: str, name: str, round_: int, num_examples: float,
               attempt: int = 0) -> pb.RoundReportReply:
        """Participant ``name``'s update for ``round_`` (its submit ``attempt``) is on every
        server: count it. RoundClosedError for a closed round; ValueError for a round not open
        yet, a participant not selected for it, a second report, or a num_examples out of
        bounds (:data:`paramserver.fedbounds.MAX_NUM_EXAMPLES`)."""
        with self._cond:
            self._check_hosted(host, name)
            num_examples = check_num_examples(num_examples, f"report of participant {name!r}")
            is_open = self.state == "open"
            if round_ < 1:
                raise ValueError(f"update for round {round_} refused: rounds start at 1")
            if round_ < self.round or (round_ == self.round and not is_open):
                if self.state == "finished":
                    at = f"finished after round {self.round}"
                else:
                    at = f"at round {self.round if is_open else self.round + 1}"
                raise RoundClosedError(f"update for round {round_} refused: round {round_} "
                                       f"closed, the job is {at}")
            if round_ != self.round or not is_open:
                raise ValueError(f"update for round {round_} refused: round {round_} is not "
                                 f"open (the job is at round {self.round}, {self.state})")
            if name not in self._selected:
                raise ValueError(f"update for round {round_} refused: participant {name!r} is "
                                 f"not selected for round {round_}")
            if name in self._received:
                raise ValueError(f"participant {name!r} already reported its update for round "
                                 f"{round_}")
            self._received[name] = num_examples
            self._attempts[name] = attempt
            self._cond.notify_all()
            return pb.RoundReportReply(received=len(self._received), expected=len(self._selected))

    # -- the rounds ------------------------------------------------------------------------------

    def start(self) -> RoundCoordinator:
        """Run the rounds on a background thread."""
        self._thread = threading.Thread(target=self._run, name="ps-rounds", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop running rounds (the round in progress is left as it is)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=_CONTROL_TIMEOUT)

    def _run(self) -> None:
        while True:
            try:
                if not self._one_round():
                    return
            except Exception as exc:  # keep the job alive; the error is in status
                log.exception("federated round %d", self.round)
                with self._cond:
                    self.last_error = f"round {self.round}: {exc}"
                    self._cond.wait(_RETRY)

    def _one_round(self) -> bool:
        """Open, run and close one round; False once the job is finished or stopped."""
        config = self.config
        with self._cond:
            if self._stop or self.state == "finished":
                return False
            round_ = self.round + 1
            self.state = "waiting for participants"
            waiting_since = time.monotonic()
            while True:
                live = self._live()
                if len(live) < config.min_updates:  # the wait counts from enough participants
                    waiting_since = time.monotonic()
                waited = time.monotonic() - waiting_since
                if len(live) >= max(config.clients_per_round, config.min_participants) or (
                        waited >= config.round_timeout and len(live) >= config.min_updates):
                    break
                if self._stop:
                    return False
                self._cond.wait(0.25)
            selected = self._select(live)
        request = pb.RoundControlRequest(action=pb.RoundControlRequest.OPEN, round=round_,
                                         selected=selected)
        try:
            self._call_servers("FederatedRound", request, f"open federated round {round_}",
                               _CONTROL_TIMEOUT)
        except ParamServerError as exc:
            with self._cond:
                self.last_error = f"opening round {round_}: {exc}"
                self._cond.wait(_RETRY)
            return True  # selection counts are kept: the same participants are likely again
        with self._cond:
            for name in selected:
                self._participants[name].selections += 1
            self.round = round_
            self._selected = selected
            self._received = {}
            self._attempts = {}
            self.state = "open"
            self._deadline = time.monotonic() + config.round_timeout
            self._cond.notify_all()
            log.info("federated round %d open: %s", round_, ", ".join(selected))
            while not self._stop:
                now = time.monotonic()
                pending = [n for n in selected if n not in self._received]
                if not pending or now >= self._deadline:
                    break
                if not any(self._host_alive(self._participants[n].host) for n in pending):
                    break  # none of the missing updates can come any more
                self._cond.wait(min(self._deadline - now, 0.25))
            if self._stop:
                return False
            self.state = "closing"
            counted = dict(self._received)
            attempts = dict(self._attempts)
            self._cond.notify_all()
        if len(counted) < config.min_updates:
            self._abandon(round_, f"{len(counted)} of {len(selected)} updates arrived, "
                                  f"{config.min_updates} needed", sorted(counted))
            return True
        names = sorted(counted)
        try:
            refused = self._combine(round_, names, counted, attempts)
        except Exception as exc:  # whatever fails, the round ends abandoned, with the reason
            log.exception("federated round %d: combining the updates failed", round_)
            refused = f"combining the updates failed: {exc}"
        if refused:
            self._abandon(round_, refused, names)
            return True
        with self._cond:
            self.version = round_
            self.rounds_applied += 1
            self.last_counted = len(names)
            for name in names:
                self._participants[name].counted += 1
            log.info("federated round %d applied: %d updates (%s)", round_, len(names),
                     ", ".join(names))
            self._finish_round(round_)
        return True

    def _combine(self, round_: int, names: list[str], counted: dict[str, float],
                 attempts: dict[str, int]) -> str:
        """Apply round ``round_`` with the updates of ``names`` on every server: clipping factors
        (DP-FedAvg), then PREPARE (every server checks its step), then COMMIT. "" once applied;
        otherwise why the round cannot be applied (nothing was). Raises if a call fails."""
        config = self.config
        weights = {n: counted[n] for n in names}
        scales = dict.fromkeys(names, 1.0)
        noise_std = 0.0
        if config.dp_clip > 0:
            replies = self._call_servers("FederatedRound", pb.RoundControlRequest(
                action=pb.RoundControlRequest.NORMS, round=round_, selected=names),
                f"norms of federated round {round_}", _CONTROL_TIMEOUT)
            for i, name in enumerate(names):
                norm = math.sqrt(math.fsum(r.squared_norms[i] for r in replies.values()))
                if not math.isfinite(norm):
                    return f"the update of participant {name!r} has norm {norm}"
                scales[name] = min(1.0, config.dp_clip / norm) if norm > 0 else 1.0
                weights[name] = 1.0  # DP-FedAvg: every counted update weighs the same
            noise_std = config.dp_noise * config.dp_clip / len(names)
        counted_pb = [pb.RoundCounted(participant=n, weight=weights[n], scale=scales[n],
                                      attempt=attempts.get(n, 0)) for n in names]
        replies = self._call_servers("FederatedRound", pb.RoundControlRequest(
            action=pb.RoundControlRequest.PREPARE, round=round_, noise_std=noise_std,
            counted=counted_pb), f"prepare federated round {round_}", _CONTROL_TIMEOUT)
        refused = [replies[rank].refused for rank in sorted(replies) if replies[rank].refused]
        if refused:  # the first few servers' reasons (a status stays small)
            more = f"; and {len(refused) - 3} more servers" if len(refused) > 3 else ""
            return "; ".join(refused[:3]) + more
        commit = pb.RoundControlRequest(action=pb.RoundControlRequest.COMMIT, round=round_,
                                        noise_std=noise_std, counted=counted_pb)
        try:
            self._call_servers("FederatedRound", commit, f"commit federated round {round_}",
                               _CONTROL_TIMEOUT)
        except ParamServerError as exc:
            # Every server checked the step; one failed to apply it (it died or is unreachable):
            # the others may have applied it. Not recovered (docs/federated.md).
            return (f"the commit failed ({exc}); servers that committed before the failure "
                    f"applied the round, so the servers' models may disagree")
        return ""

    def _abandon(self, round_: int, reason: str, names: list[str]) -> None:
        """Round ``round_`` ends abandoned: every server drops its updates (a server that cannot
        be told drops them when the next round opens), and the reason is kept for the status,
        the polls and the log."""
        try:
            self._call_servers("FederatedRound", pb.RoundControlRequest(
                action=pb.RoundControlRequest.ABANDON, round=round_),
                f"abandon federated round {round_}", _CONTROL_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 (the round is abandoned all the same)
            log.warning("federated round %d: telling the servers it is abandoned failed: %s",
                        round_, exc)
        counted = ", ".join(repr(n) for n in names) if names else "none"
        with self._cond:
            self.rounds_abandoned += 1
            self.last_abandoned_round = round_
            self.last_abandoned_reason = (f"round {round_} abandoned (updates counted: "
                                          f"{counted}): {reason}")
            log.warning("federated %s", self.last_abandoned_reason)
            self._finish_round(round_)

    def _finish_round(self, round_: int) -> None:
        """After round ``round_`` closed (caller holds the lock)."""
        self.last_error = ""
        if self.config.rounds and round_ >= self.config.rounds:
            self.state = "finished"
        else:
            self.state = "waiting for participants"
        self._cond.notify_all()

    def _select(self, live: list[_Participant]) -> list[str]:
        """K of the live participants: the least often selected first; among those selected
        equally often, spread over the hosts (a host trains its participants one after the
        other), then in the order of the seeded generator (caller holds the lock)."""
        order = list(live)
        self._rng.shuffle(order)
        order.sort(key=lambda p: p.selections)  # stable: the shuffle breaks ties
        chosen: list[_Participant] = []
        per_host: dict[str, int] = {}
        while order and len(chosen) < self.config.clients_per_round:
            tier = [p for p in order if p.selections == order[0].selections]
            pick = min(tier, key=lambda p: per_host.get(p.host, 0))  # first of the least busy
            chosen.append(pick)
            per_host[pick.host] = per_host.get(pick.host, 0) + 1
            order.remove(pick)
        return sorted(p.name for p in chosen)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> pb.FederatedStatus:
        """The rounds now, for ``paramserver status``."""
        with self._cond:
            is_open = self.state == "open"
            return pb.FederatedStatus(
                round=self.round, state=self.state, version=self.version,
                selected=self._selected if self.state in ("open", "closing") else [],
                received=sorted(self._received) if self.state in ("open", "closing") else [],
                participants=len(self._participants), live=len(self._live()),
                clients_per_round=self.config.clients_per_round,
                min_updates=self.config.min_updates, round_timeout=self.config.round_timeout,
                deadline_in=max(0.0, self._deadline - time.monotonic()) if is_open else 0.0,
                rounds_applied=self.rounds_applied, rounds_abandoned=self.rounds_abandoned,
                last_counted=self.last_counted, max_rounds=self.config.rounds,
                dp_clip=self.config.dp_clip, dp_noise=self.config.dp_noise,
                last_error=self.last_error, last_abandoned_round=self.last_abandoned_round,
                last_abandoned_reason=self.last_abandoned_reason)
