"""The scheduler's participant selection for federated rounds (paramserver.rounds): fair and
seeded. No sockets: the coordinator's selection does not touch the servers."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from paramserver.config import FederatedConfig
from paramserver.errors import RoundClosedError
from paramserver.rounds import RoundCoordinator
from paramserver.v1 import paramserver_pb2 as pb
from tests.conftest import wait_for


def _servers_unused(*args: object) -> dict:
    raise AssertionError("selection must not call the servers")


def _coordinator(seed: int, k: int, names: list[str]) -> RoundCoordinator:
    rounds = RoundCoordinator(FederatedConfig(clients_per_round=k, seed=seed), _servers_unused,
                              lambda host: host != "dead-host")
    rounds.join("worker-0", names)
    return rounds


def _draws(rounds: RoundCoordinator, n: int) -> list[list[str]]:
    out = []
    for _ in range(n):
        with rounds._cond:
            chosen = rounds._select(rounds._live())
            for name in chosen:
                rounds._participants[name].selections += 1
        out.append(chosen)
    return out


def test_selection_is_fair_and_seeded() -> None:
    names = [f"p{i:02d}" for i in range(10)]
    draws = _draws(_coordinator(7, 3, names), 20)
    counts = Counter(n for d in draws for n in d)
    # 60 selections over 10 participants: 6 each, never one more than another at any round
    assert counts == dict.fromkeys(names, 6)
    for r in range(1, 21):
        seen = Counter(n for d in draws[:r] for n in d)
        assert max(seen.get(n, 0) for n in names) - min(seen.get(n, 0) for n in names) <= 1
    assert draws == _draws(_coordinator(7, 3, names), 20)       # seeded: reproducible
    assert draws != _draws(_coordinator(8, 3, names), 20)       # and the seed matters


def test_participants_of_a_dead_host_are_not_selected() -> None:
    rounds = _coordinator(0, 4, ["a", "b"])
    rounds.join("dead-host", ["c", "d"])
    assert _draws(rounds, 1) == [["a", "b"]]


def test_reports_before_any_round_and_for_closed_rounds_are_refused() -> None:
    rounds = _coordinator(0, 2, ["a", "b"])
    with pytest.raises(ValueError, match="round 1 is not open"):
        rounds.report("worker-0", "a", 1, 10)
    with pytest.raises(ValueError, match="has not joined"):
        rounds.report("worker-0", "zed", 1, 10)
    with pytest.raises(ValueError, match="hosted by worker-0, not worker-9"):
        rounds.report("worker-9", "a", 1, 10)
    rounds.round, rounds.state = 5, "open"
    rounds._selected = ["a", "b"]
    with pytest.raises(RoundClosedError,
                       match="update for round 3 refused: round 3 closed, the job is at round 5"):
        rounds.report("worker-0", "a", 3, 10)
    assert rounds.report("worker-0", "a", 5, 10).received == 1
    with pytest.raises(ValueError, match="already reported"):
        rounds.report("worker-0", "a", 5, 10)


def test_selection_spreads_a_round_over_the_hosts() -> None:
    rounds = RoundCoordinator(FederatedConfig(clients_per_round=4, seed=3), _servers_unused,
                              lambda host: True)
    rounds.join("worker-0", [f"a{i}" for i in range(5)])
    rounds.join("worker-1", [f"b{i}" for i in range(5)])
    for chosen in _draws(rounds, 10):
        hosts = Counter(name[0] for name in chosen)
        assert hosts == {"a": 2, "b": 2}, chosen


def test_the_wait_for_more_participants_counts_from_min_updates_live() -> None:
    """K=3, min 2, round timeout 2 s: 'a' alone for longer than a round timeout does not start
    the clock; 'b' joining does, so 'c' joining half a second later is still in round 1 (the
    clock used to run from the start: the round opened with 'a' and 'b' the moment 'b' came)."""
    def servers(method: str, request: object, what: str, timeout: float) -> dict:
        return {0: pb.RoundControlReply()}

    rounds = RoundCoordinator(FederatedConfig(clients_per_round=3, min_updates=2,
                                              round_timeout=2.0), servers, lambda host: True)
    rounds.join("worker-0", ["a"])
    rounds.start()
    try:
        start = time.monotonic()
        wait_for(lambda: time.monotonic() - start > 2.5, 10, "a round timeout with 1 live")
        assert rounds.state == "waiting for participants"
        rounds.join("worker-0", ["b"])
        joined = time.monotonic()
        wait_for(lambda: rounds.state == "open" or time.monotonic() - joined > 0.5, 10,
                 "round 1 to open or half a second")
        rounds.join("worker-0", ["c"])
        wait_for(lambda: rounds.state == "open", 10, "round 1 to open")
        assert rounds._selected == ["a", "b", "c"]
    finally:
        rounds.close()
