"""Federated input is bounded, on a real scheduler and 2 real servers.

FedAvg (``ps.SGD(lr=1)``) with integer-valued deltas, so every expected model is exact:
- a round whose step would make the model not finite (deltas of 3e38) is abandoned on both
  servers with the reason and the participants named, the model is unchanged, and the next round
  is applied;
- num_examples beyond the bound is refused by the participant, the servers and the scheduler,
  naming the bound; a round whose combining fails (a participant reported an update the servers
  do not hold) ends abandoned, so rounds applied + abandoned = rounds closed;
- an update refused by one server only leaves nothing on the other, and the participant submits
  a corrected one in the same round.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import paramserver as ps
from paramserver.federated import Participant, selected
from paramserver.fedbounds import MAX_NUM_EXAMPLES
from paramserver.v1 import paramserver_pb2 as pb
from tests.conftest import wait_for
from tests.integration.conftest import PS

D, C = 12, 3          # w: 36 elements in 5 blocks of 8, spread over both servers; b: 3
BLOCK = 8
HUGE = np.float32(3e38)


def _cluster(cluster_factory):
    return cluster_factory(2, scheduler_args=("--federated", "--clients-per-round", "2",
                                              "--min-updates", "2", "--round-timeout", "60"))


def _declare(client: ps.Client) -> dict[str, np.ndarray]:
    """w and b with integer initial values (so FedAvg with integer deltas stays exact)."""
    init = {"w": np.arange(D * C, dtype=np.float32).reshape(D, C) - 10,
            "b": np.array([5, -7, 2], dtype=np.float32)}
    client.dense("w", (D, C), ps.SGD(lr=1.0), init=init["w"], block_size=BLOCK)
    client.dense("b", (C,), ps.SGD(lr=1.0), init=init["b"])
    return init


def _status(client: ps.Client) -> dict:
    return ps.federated.status(client)


def _closed(status: dict) -> int:
    """Rounds closed so far: the current round unless it is still open or closing."""
    return status["round"] - (status["state"] in ("open", "closing"))


def _fedavg(model: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]],
            weights: list[float]) -> dict[str, np.ndarray]:
    """The servers' FedAvg step: the float64 weighted mean, cast to float32, added in float32."""
    total = sum(weights)
    out = {}
    for k, v in model.items():
        mean = sum((w / total) * d[k].astype(np.float64) for w, d in zip(weights, deltas))
        out[k] = v + mean.astype(np.float32)
    return out


def _round(parts: list[Participant], deltas: list[dict[str, np.ndarray]],
           weights: list[float], r: int):
    """Both participants fetch round ``r`` and submit their deltas; the fetched models."""
    models = []
    for p, d, n in zip(parts, deltas, weights):
        model = p.fetch(timeout=20)
        assert model.round == r
        models.append(model)
        p.submit(d, num_examples=n, delta=True)
    return models


def test_a_round_whose_step_is_not_finite_is_abandoned_and_the_job_goes_on(
        cluster_factory) -> None:
    """Rounds of 'a' (weight 1) and 'b' (weight 3) with deltas 1 and 3, and 3e38 at w's flat
    element 0 (one server's block): round 1 makes that element 3e38 (finite: applied); round 2
    would make it inf: abandoned on both servers, naming table, element, 'a' and 'b', in the
    status (JSON and text), the participants' next fetch and the scheduler's log; the model is exactly round 1's
    on both servers. Round 3 (no 3e38) is applied exactly, and applied + abandoned = 3."""
    c = _cluster(cluster_factory)
    with c.connect() as client:
        init = _declare(client)
        parts = [Participant(client, ["w", "b"], name=n) for n in ("a", "b")]
        weights = [1.0, 3.0]

        def deltas(value_at_0: np.float32) -> list[dict[str, np.ndarray]]:
            out = []
            for step in (1, 3):
                d = {"w": np.full((D, C), step, np.float32), "b": np.full(C, step, np.float32)}
                d["w"][0, 0] = value_at_0
                out.append(d)
            return out

        _round(parts, deltas(HUGE), weights, 1)
        wait_for(lambda: _status(client)["version"] >= 1, 20, "round 1 to be applied")
        after1 = _fedavg(init, deltas(HUGE), weights)
        assert np.isfinite(after1["w"]).all() and after1["w"][0, 0] > 1e38
        got = client.pull(["w", "b"])
        for k in ("w", "b"):
            np.testing.assert_array_equal(got[k], after1[k])

        _round(parts, deltas(HUGE), weights, 2)  # 3e38 + 3e38: inf
        wait_for(lambda: _status(client)["rounds_abandoned"] >= 1, 20, "round 2 to be abandoned")
        status = _status(client)
        assert (status["rounds_applied"], status["rounds_abandoned"], status["version"]) == (
            1, 1, 1)
        assert status["last_abandoned_round"] == 2
        reason = status["last_abandoned_reason"]
        assert reason.startswith("round 2 abandoned (updates counted: 'a', 'b'): ")
        assert "table 'w': the step would make its values not finite (inf at flat element 0)" \
            in reason
        assert "largest deltas there: 'b' (delta 3e+38, weight 0.75), 'a' (delta 3e+38, " \
               "weight 0.25)" in reason
        got = client.pull(["w", "b"])
        for k in ("w", "b"):  # neither server applied anything of round 2
            np.testing.assert_array_equal(got[k], after1[k])
        out = subprocess.run(PS + ["status", "--scheduler", c.scheduler], capture_output=True,
                             text=True, timeout=30)
        assert f"LAST ABANDONED: {reason}" in out.stdout, out.stdout + out.stderr

        models = _round(parts, deltas(np.float32(0)), weights, 3)
        for model in models:  # the participants' poll says why round 2 changed nothing
            assert (model.version, model.last_abandoned_round) == (1, 2)
            assert model.last_abandoned_reason == reason
        wait_for(lambda: _status(client)["version"] >= 3, 20, "round 3 to be applied")
        after3 = _fedavg(after1, deltas(np.float32(0)), weights)
        got = client.pull(["w", "b"])
        for k in ("w", "b"):
            np.testing.assert_array_equal(got[k], after3[k])
        np.testing.assert_array_equal(got["b"], init["b"] + np.float32(5.0))  # 2.5 twice
        status = _status(client)
        assert status["rounds_applied"] + status["rounds_abandoned"] == _closed(status) == 3
    assert reason in (c.log_dir / "scheduler.log").read_text()


def test_num_examples_is_bounded_and_every_round_ends_applied_or_abandoned(
        cluster_factory) -> None:
    """num_examples of 1.7e308 (and 0, -1, nan, inf) is refused by the participant; sent past
    its check, by the server; reported past it, by the scheduler: each names the bound. Then
    'b' reports an update no server holds: combining round 1 fails, the round is abandoned
    naming 'b', the model is unchanged; round 2 is applied exactly; applied + abandoned =
    rounds closed after each round."""
    c = _cluster(cluster_factory)
    with c.connect() as client:
        init = _declare(client)
        parts = [Participant(client, ["w", "b"], name=n) for n in ("a", "b")]
        a, b = parts
        model = a.fetch(timeout=20)
        ones = {k: np.ones_like(v) for k, v in model.values.items()}
        bound = rf"num_examples must be a finite number in \(0, {MAX_NUM_EXAMPLES:g}\]".replace(
            "+", r"\+")
        for bad in (1.7e308, MAX_NUM_EXAMPLES * 2, 0, -1, float("nan"), float("inf")):
            with pytest.raises(ps.InvalidRequestError, match=bound):
                a.submit(ones, num_examples=bad, delta=True, round=1)
        arrays = a._check(ones, True)
        with pytest.raises(ps.InvalidRequestError, match=rf"on server-\d[^)]*\): {bound}, got 1.7e\+308"):
            a._send(arrays, 1, 1.7e308, True, "update past the participant's check")
        with pytest.raises(ps.InvalidRequestError, match=rf"report of participant 'a': {bound}"):
            a._call("FederatedReport", pb.RoundReportRequest(
                node_id=client.node_id, participant="a", round=1, num_examples=1.7e308),
                "report past the participant's check")
        status = _status(client)
        assert status["received"] == [] and status["rounds_abandoned"] == 0

        # Round 1: 'a' submits; 'b' reports without sending anything to the servers.
        a.submit(ones, num_examples=1, delta=True)
        assert b.fetch(timeout=20).round == 1
        b._call("FederatedReport", pb.RoundReportRequest(
            node_id=client.node_id, participant="b", round=1, num_examples=1), "bare report")
        wait_for(lambda: _status(client)["rounds_abandoned"] >= 1, 20, "round 1 to be abandoned")
        status = _status(client)
        assert status["rounds_applied"] + status["rounds_abandoned"] == _closed(status) == 1
        assert status["version"] == 0
        assert "no complete update of participant 'b' is held here" in \
            status["last_abandoned_reason"]
        got = client.pull(["w", "b"])
        for k in ("w", "b"):
            np.testing.assert_array_equal(got[k], init[k])

        twos = {k: 2 * v for k, v in ones.items()}
        _round(parts, [ones, twos], [1.0, 3.0], 2)
        wait_for(lambda: _status(client)["version"] >= 2, 20, "round 2 to be applied")
        got = client.pull(["w", "b"])
        for k in ("w", "b"):  # (1 * 1 + 3 * 2) / 4 = 1.75
            np.testing.assert_array_equal(got[k], init[k] + np.float32(1.75))
        status = _status(client)
        assert status["rounds_applied"] + status["rounds_abandoned"] == _closed(status) == 2


def test_an_update_one_server_refuses_leaves_nothing_and_can_be_corrected(
        cluster_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """'a' sends (past its own check) an update with NaN in a block of w held by server-1 only:
    server-1 refuses it, server-0 accepted its part, which is withdrawn. 'a' then submits a
    corrected update for the same round (no "already submitted"), and the round applies
    exactly the corrected update with 'b''s: (1 * 4 + 3 * 8) / 4 = 7 everywhere."""
    c = _cluster(cluster_factory)
    with c.connect() as client:
        init = _declare(client)
        a, b = parts = [Participant(client, ["w", "b"], name=n) for n in ("a", "b")]
        assert len(selected(parts, timeout=20)) == 2
        model = a.fetch(timeout=20)
        ref = client._ref("w")
        block = ref.by_server[1][0]  # a block of w held by server-1 only
        assert block not in ref.by_server.get(0, [])
        bad = {"w": np.full((D, C), 4, np.float32), "b": np.full(C, 4, np.float32)}
        bad["w"].reshape(-1)[block * BLOCK] = np.nan
        unchecked = {k: np.ascontiguousarray(v, np.float32).reshape(-1) for k, v in bad.items()}
        with monkeypatch.context() as m:  # a participant that does not check its own values
            m.setattr(a, "_check", lambda update, delta: unchecked)
            with pytest.raises(ps.InvalidRequestError) as refused:
                a.submit(bad, num_examples=1, delta=True)
        message = str(refused.value)
        assert "server-1" in message and "not finite" in message
        assert "nothing of this update counts (its parts were withdrawn from every server)" \
            in message
        assert _status(client)["received"] == []

        good = {k: np.full_like(v, 4) for k, v in model.values.items()}
        assert a.submit(good, num_examples=1, delta=True) == 1  # the same round, corrected
        assert b.fetch(timeout=20).round == 1
        b.submit({k: np.full_like(v, 8) for k, v in model.values.items()}, num_examples=3,
                 delta=True)
        wait_for(lambda: _status(client)["version"] >= 1, 20, "round 1 to be applied")
        got = client.pull(["w", "b"])
        for k in ("w", "b"):
            np.testing.assert_array_equal(got[k], init[k] + np.float32(7.0))
        status = _status(client)
        assert (status["rounds_applied"], status["rounds_abandoned"]) == (1, 0)
