"""Bounds on federated input and the checks of a round's step (paramserver.fedbounds), on real
core tables: a server's round bookkeeping (paramserver.updates) and the scheduler's rounds
(paramserver.rounds), whose every closed round ends applied or abandoned."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver import _core, fedbounds
from paramserver.config import FederatedConfig
from paramserver.errors import NodeUnavailableError
from paramserver.fedbounds import MAX_NUM_EXAMPLES, blame, check_num_examples, trial_step
from paramserver.rounds import RoundCoordinator
from paramserver.updates import RoundUpdates
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import optimizer_to_spec
from tests.conftest import wait_for

BOUND = r"num_examples must be a finite number in \(0, 1e\+15\]"


@pytest.mark.parametrize("value", [1, 0.5, 5e-324, 12345.0, MAX_NUM_EXAMPLES])
def test_num_examples_within_the_bound_are_accepted(value: float) -> None:
    assert check_num_examples(value, "p") == float(value)


@pytest.mark.parametrize("value", [0, -1, -0.0, 1.7e308, MAX_NUM_EXAMPLES * (1 + 1e-15),
                                   math.inf, -math.inf, math.nan, None, "many"])
def test_num_examples_out_of_bounds_are_refused_naming_the_bound(value: Any) -> None:
    with pytest.raises(ValueError, match=rf"participant 'x': {BOUND}, got "):
        check_num_examples(value, "participant 'x'")


def test_the_bounded_weights_of_a_huge_round_sum_exactly_enough() -> None:
    """A million updates at the bound: the sum is finite and every factor is in (0, 1]."""
    weights = [MAX_NUM_EXAMPLES] * 1_000_000
    total = math.fsum(weights)
    assert math.isfinite(total) and 0 < MAX_NUM_EXAMPLES / total <= 1


def _table(optimizer: ps.Optimizer, values: np.ndarray, block: int = 4) -> _core.DenseTable:
    table = _core.DenseTable(values.size, block, optimizer.to_config())
    table.assign_many(np.arange(table.num_blocks, dtype=np.int64), values.astype(np.float32))
    return table


def _state(table: _core.DenseTable) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    blocks = np.arange(table.num_blocks, dtype=np.int64)
    values = np.empty(table.num_elements, dtype=np.float32)
    table.read_many(blocks, values)
    slots = []
    for b in blocks.tolist():
        for s in range(table.num_slots):
            out = np.empty(table.block_length(b), dtype=np.float32)
            table.read_slot(b, s, out)
            slots.append(out)
    return values, slots, [table.step(b) for b in blocks.tolist()]


def _same(a: tuple, b: tuple) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        np.testing.assert_array_equal(x, y)
    assert a[2] == b[2]


def test_trial_step_finds_values_that_would_overflow_and_changes_nothing(monkeypatch) -> None:
    """SGD on x = 3e38 at element 13 with grad -3e38: the values would be inf there. Tried in
    pieces of one block (the bound forced low), the offset is still 13; the table is as before."""
    monkeypatch.setattr(fedbounds, "_TRIAL_BYTES", 16)
    x = np.arange(18, dtype=np.float32)
    x[13] = 3e38
    table = _table(ps.SGD(lr=1.0), x)
    before = _state(table)
    grad = np.full(18, -1.0, dtype=np.float32)
    blocks = list(range(table.num_blocks))
    assert trial_step(table, ps.SGD(lr=1.0).to_config(), blocks, grad, 1) is None
    grad[13] = -3e38
    assert trial_step(table, ps.SGD(lr=1.0).to_config(), blocks, grad, 2) == (
        13, "values", math.inf)
    _same(_state(table), before)


def test_trial_step_finds_optimizer_state_that_would_overflow() -> None:
    """FedAdam with a finite gradient of 1e25: v = (1 - b2) g^2 overflows float32 while the
    values stay finite (m / (sqrt(inf) + tau) is 0): the state is what the check finds."""
    opt = ps.FedAdam(lr=0.1, betas=(0.9, 0.99), tau=1e-3)
    table = _table(opt, np.zeros(8, dtype=np.float32))
    before = _state(table)
    grad = np.zeros(8, dtype=np.float32)
    grad[6] = 1e25
    found = trial_step(table, opt.to_config(), [0, 1], grad, 1)
    assert found is not None and found[:2] == (6, "optimizer state") and math.isinf(found[2])
    _same(_state(table), before)


def test_trial_step_is_the_step_the_table_then_takes() -> None:
    """Adam (bias correction uses the step count) after 3 real steps: the tried step is checked
    on an exact copy, so applying it for real gives values that passed the check."""
    opt = ps.Adam(lr=0.1)
    rng = np.random.default_rng(0)
    table = _table(opt, rng.standard_normal(10))
    blocks = np.arange(table.num_blocks, dtype=np.int64)
    for _ in range(3):
        table.apply_many(blocks, rng.standard_normal(10).astype(np.float32))
    grad = rng.standard_normal(10).astype(np.float32)
    copy = _core.DenseTable(10, 4, opt.to_config())
    for b in blocks.tolist():
        values, slots = np.empty(table.block_length(b), np.float32), []
        table.read(b, values)
        for s in range(table.num_slots):
            slots.append(np.empty(table.block_length(b), np.float32))
            table.read_slot(b, s, slots[-1])
        copy.restore_block(b, values, slots, table.step(b))
    assert trial_step(table, opt.to_config(), blocks.tolist(), grad, 1) is None
    table.apply_many(blocks, grad)
    copy.apply_many(blocks, grad)
    _same(_state(table), _state(copy))


def test_blame_names_the_largest_contributions_first() -> None:
    deltas = [("a", 0.25, np.array([3e38, 1.0])), ("b", 0.5, np.array([1e38, 2.0])),
              ("c", 0.125, np.array([-4e38, 0.0])), ("d", 0.125, np.array([0.0, 0.0]))]
    assert blame(deltas, 0) == ("'a' (delta 3e+38, weight 0.25), 'b' (delta 1e+38, weight "
                                "0.5), 'c' (delta -4e+38, weight 0.125) and 1 more")


# -- a server's rounds (paramserver.updates) on real core tables ----------------------------------

@dataclass
class _Shard:
    spec: pb.TableSpec
    blocks: tuple[int, ...]
    table: _core.DenseTable
    updates: int = 0


def _server(values: np.ndarray, optimizer: ps.Optimizer = ps.SGD(lr=1.0)) -> tuple[
        RoundUpdates, _Shard]:
    table = _table(optimizer, values)
    shard = _Shard(pb.TableSpec(name="w", optimizer=optimizer_to_spec(optimizer)),
                   tuple(range(table.num_blocks)), table)
    rounds = RoundUpdates("server-0", lambda: {"w": shard}, 1)
    rounds.open(1, ["a", "b"])
    return rounds, shard


def _submit(rounds: RoundUpdates, shard: _Shard, who: str, data: np.ndarray, weight: float = 1,
            attempt: int = 0, is_delta: bool = True) -> None:
    blocks = np.array(shard.blocks, dtype=np.int64)
    rounds.submit(pb.FederatedUpdate(participant=who, round=1, num_examples=weight,
                                     is_delta=is_delta, part=0, parts=1, attempt=attempt),
                  [(shard, blocks, data.astype(np.float32), data.size)])


def _counted(*entries: tuple[str, float, int]) -> pb.RoundControlRequest:
    return pb.RoundControlRequest(round=1, counted=[
        pb.RoundCounted(participant=p, weight=w, scale=1.0, attempt=a) for p, w, a in entries])


def _values(shard: _Shard) -> np.ndarray:
    return _state(shard.table)[0]


def _run(fn) -> None:
    fn()


RNG = np.random.default_rng(0)


def test_a_server_refuses_num_examples_beyond_the_bound() -> None:
    rounds, shard = _server(np.zeros(8))
    with pytest.raises(ValueError, match=rf"participant 'a' for round 1 \(on server-0\): "
                                         rf"{BOUND}, got 1.7e\+308"):
        _submit(rounds, shard, "a", np.ones(8), weight=1.7e308)
    _submit(rounds, shard, "a", np.ones(8))
    with pytest.raises(ValueError, match=rf"the weight of participant 'a': {BOUND}"):
        rounds.commit(_counted(("a", 1.7e308, 0)), _run, RNG)


def test_a_new_attempt_replaces_the_held_one_and_a_withdrawal_drops_it() -> None:
    """Attempt 7 held whole; the same attempt again is refused ("already submitted"); attempt 8
    replaces it; withdrawing attempt 7 (no longer held) changes nothing; withdrawing 8 drops it.
    The commit applies exactly the attempt counted."""
    rounds, shard = _server(np.zeros(8))
    _submit(rounds, shard, "a", np.full(8, 100.0), attempt=7)
    with pytest.raises(ValueError, match="already submitted its update for round 1"):
        _submit(rounds, shard, "a", np.full(8, 100.0), attempt=7)
    _submit(rounds, shard, "a", np.full(8, 2.0), attempt=8)
    withdraw = pb.FederatedUpdate(participant="a", round=1, attempt=7, withdraw=True)
    rounds.submit(withdraw, [])
    assert rounds.prepare(_counted(("a", 1, 8)), RNG) == ""
    withdraw.attempt = 8
    rounds.submit(withdraw, [])
    assert "no complete update of participant 'a' is held here" in rounds.prepare(
        _counted(("a", 1, 8)), RNG)
    _submit(rounds, shard, "a", np.full(8, 3.0), attempt=9)
    assert "'a' reported attempt 8, this server holds attempt 9" in rounds.prepare(
        _counted(("a", 1, 8)), RNG)
    _submit(rounds, shard, "b", np.full(8, 5.0), attempt=1)
    assert rounds.prepare(_counted(("a", 1, 9), ("b", 3, 1)), RNG) == ""
    with pytest.raises(ValueError, match=r"it counts \['a'\], the round was prepared for "
                                         r"\['a', 'b'\]"):
        rounds.commit(_counted(("a", 1, 9)), _run, RNG)
    assert rounds.commit(_counted(("a", 1, 9), ("b", 3, 1)), _run, RNG) == 2
    np.testing.assert_array_equal(_values(shard), np.full(8, 4.5, np.float32))  # (3 + 15) / 4


def test_a_combined_update_that_is_not_finite_is_refused_and_nothing_changes() -> None:
    """New values (not deltas) of 3e38 against a model at -3e38: each delta is 6e38, finite in
    float64, but the combined float32 update is not. PREPARE says so (table, element, the
    participants), a COMMIT without PREPARE refuses it too, and the values are unchanged."""
    x = np.zeros(8, dtype=np.float32)
    x[5] = -3e38
    rounds, shard = _server(x)
    new = np.zeros(8)
    new[5] = 3e38
    _submit(rounds, shard, "a", new, weight=2, is_delta=False)
    _submit(rounds, shard, "b", new, weight=2, is_delta=False)
    reason = rounds.prepare(_counted(("a", 2, 0), ("b", 2, 0)), RNG)
    assert reason.startswith("round 1 on server-0: table 'w': the combined update is not "
                             "finite (inf at flat element 5); largest deltas there: 'a' (delta "
                             "6e+38, weight 0.5), 'b' (delta 6e+38, weight 0.5)")
    with pytest.raises(ValueError, match=r"the combined update is not finite \(inf at flat "
                                         r"element 5\)"):
        rounds.commit(_counted(("a", 2, 0), ("b", 2, 0)), _run, RNG)
    np.testing.assert_array_equal(_values(shard), x)
    assert shard.table.step(1) == 0


def test_a_step_that_would_not_be_finite_is_refused_before_any_block_changes() -> None:
    """x = 3e38 at element 6 (block 1 of 2); a delta of 3e38 there and 1 elsewhere: the step
    would overflow in block 1 only, and block 0 is unchanged too."""
    x = np.arange(8, dtype=np.float32)
    x[6] = 3e38
    rounds, shard = _server(x)
    delta = np.ones(8)
    delta[6] = 3e38
    _submit(rounds, shard, "a", delta)
    reason = rounds.prepare(_counted(("a", 1, 0)), RNG)
    assert "table 'w': the step would make its values not finite (inf at flat element 6)" \
        in reason
    np.testing.assert_array_equal(_values(shard), x)
    rounds.abandon(1)
    assert rounds.closed == 1 and rounds.round == 0


# -- the scheduler's rounds (paramserver.rounds): every closed round ends in one state --------

class _Servers:
    """The servers' side of the round controls, failing as told per round (no network: the
    coordinator's bookkeeping is what is tested)."""

    def __init__(self, failures: dict[int, Any]) -> None:
        self.failures = failures
        self.calls: list[tuple[str, int]] = []

    def __call__(self, method: str, request: pb.RoundControlRequest, what: str,
                 timeout: float) -> dict[int, pb.RoundControlReply]:
        action = pb.RoundControlRequest.Action.Name(request.action)
        self.calls.append((action, request.round))
        failure = self.failures.get(request.round)
        if failure is not None and failure[0] == action:
            if isinstance(failure[1], str):
                return {0: pb.RoundControlReply(), 1: pb.RoundControlReply(refused=failure[1])}
            raise failure[1]
        return {0: pb.RoundControlReply(), 1: pb.RoundControlReply()}


def test_every_closed_round_ends_applied_or_abandoned_whatever_fails() -> None:
    """Rounds 2-6 fail in each way combining can (a server refuses the step, PREPARE raises an
    arithmetic error, a server is down at PREPARE, the COMMIT fails, and the ABANDON call fails
    too); rounds 1 and 7 are applied. After each, applied + abandoned = rounds closed, and the
    reason of each abandoned round names it and its participants."""
    down = NodeUnavailableError("server-1 is not serving")
    servers = _Servers({
        2: ("PREPARE", "round 2 on server-1: table 'w': the step would make its values not "
                       "finite"),
        3: ("PREPARE", OverflowError("intermediate overflow in fsum")),
        4: ("PREPARE", down),
        5: ("COMMIT", down),
        6: ("PREPARE", ZeroDivisionError("float division by zero")),
    })
    original = servers.__call__

    def calls(method, request, what, timeout):  # round 6: telling the servers fails too
        if request.round == 6 and request.action == pb.RoundControlRequest.ABANDON:
            raise down
        return original(method, request, what, timeout)

    rounds = RoundCoordinator(FederatedConfig(clients_per_round=2, min_updates=2, rounds=7,
                                              round_timeout=30), calls, lambda host: True)
    rounds.join("worker-0", ["a", "b"])
    rounds.start()
    try:
        expect = {2: "the step would make its values not finite",
                  3: "combining the updates failed: intermediate overflow in fsum",
                  4: "combining the updates failed: server-1 is not serving",
                  5: "the commit failed (server-1 is not serving); servers that committed "
                     "before the failure applied the round",
                  6: "combining the updates failed: float division by zero"}
        for r in range(1, 8):
            wait_for(lambda: rounds.state == "open" and rounds.round == r, 10, f"round {r}")
            for name in ("a", "b"):
                rounds.report("worker-0", name, r, 1.0, attempt=r)
            wait_for(lambda: rounds.rounds_applied + rounds.rounds_abandoned >= r, 10,
                     f"round {r} to close")
            assert rounds.rounds_applied + rounds.rounds_abandoned == r
            if r in expect:
                assert rounds.last_abandoned_round == r
                assert rounds.last_abandoned_reason.startswith(
                    f"round {r} abandoned (updates counted: 'a', 'b'): ")
                assert expect[r] in rounds.last_abandoned_reason
        assert (rounds.rounds_applied, rounds.rounds_abandoned, rounds.version) == (2, 5, 7)
        assert rounds.state == "finished"
        status = rounds.status()
        assert (status.last_abandoned_round, status.rounds_abandoned) == (6, 5)
        poll = rounds.poll("worker-0", ["a"], 0)
        assert poll.last_abandoned_round == 6 and "division by zero" in poll.last_abandoned_reason
    finally:
        rounds.close()
    commits = [r for action, r in servers.calls if action == "COMMIT"]
    assert commits == [1, 5, 7]  # never a commit after a refused or failed PREPARE


def test_a_report_beyond_the_bound_is_refused_and_not_counted() -> None:
    rounds = RoundCoordinator(FederatedConfig(clients_per_round=1), _Servers({}),
                              lambda host: True)
    rounds.join("worker-0", ["a"])
    rounds.round, rounds.state, rounds._selected = 1, "open", ["a"]
    with pytest.raises(ValueError, match=rf"report of participant 'a': {BOUND}"):
        rounds.report("worker-0", "a", 1, 1.7e308)
    assert rounds.report("worker-0", "a", 1, MAX_NUM_EXAMPLES, attempt=3).received == 1
    assert rounds._attempts == {"a": 3}
