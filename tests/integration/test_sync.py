"""Synchronous and bounded-staleness training (``--sync bsp`` / ``ssp:S``) on real clusters.

The BSP equivalence tests run W workers (threads, each with its own client, so the steps really
interleave) against one process on the concatenated batches with a mean loss, with torch.optim
as the optimizer oracle. The elastic tests (leave, join, death) use real worker processes.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

import paramserver as ps
from tests.conftest import wait_for

torch = pytest.importorskip("torch")

W = 3
STEPS = 50
BATCH = 16
D = 24          # features
DIM = 4         # embedding width
IDS = 40        # distinct embedding ids in the data


def _data(worker: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker ``worker``'s batch at ``step``: features, targets and embedding ids. Worker k draws
    ids from [8k, 8k + 20), so a row is pushed by one, two or no workers in a step."""
    rng = np.random.default_rng(1000 * worker + step)
    x = rng.standard_normal((BATCH, D))
    y = rng.standard_normal(BATCH)
    ids = rng.integers(8 * worker, 8 * worker + 20, BATCH)
    return x, y, ids


def _uses_embedding(worker: int, step: int) -> bool:
    """The last worker's samples have no ids; and in every 7th step no sample has any (then no
    worker pushes the embedding or ``u``, which take no step, as torch skips grad-less ones)."""
    return worker != W - 1 and step % 7 != 6


def _grads(params: dict[str, np.ndarray], rows: np.ndarray | None, x, y, ids, scale: float):
    """Gradients of ``scale * sum of squared errors`` of the model
    ``pred = x @ w + b + (e[ids] @ u if the batch has ids)``, in float64."""
    pred = x @ params["w"] + params["b"][0]
    if rows is not None:
        pred = pred + rows @ params["u"]
    err = 2.0 * scale * (pred - y)
    grads = {"w": x.T @ err, "b": np.array([err.sum()])}
    if rows is not None:
        grads["u"] = rows.T @ err
        grads["e"] = np.outer(err, params["u"])  # one row per sample (duplicates summed later)
    return grads


def _reference(init: dict[str, np.ndarray], emb0: np.ndarray, combine_sum: bool = False):
    """One process on the concatenated batches, mean loss, torch optimizers; the trajectory of
    ``w`` and the final parameters."""
    w = torch.tensor(init["w"], requires_grad=True)
    b = torch.tensor(init["b"], requires_grad=True)
    u = torch.tensor(init["u"], requires_grad=True)
    e = torch.tensor(emb0, requires_grad=True)
    opt_w = torch.optim.SGD([w], lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt_b = torch.optim.SGD([b], lr=0.01, momentum=0.5)
    opt_u = torch.optim.Adam([u], lr=0.01)
    opt_e = torch.optim.Adagrad([e], lr=0.1)
    history = []
    for step in range(STEPS):
        params = {"w": w.detach().double().numpy(), "b": b.detach().double().numpy(),
                  "u": u.detach().double().numpy()}
        table = e.detach().double().numpy()
        total = {"w": 0.0, "b": 0.0, "u": None, "e": None}
        e_grad = np.zeros_like(table)
        for k in range(W):
            x, y, ids = _data(k, step)
            rows = table[ids] if _uses_embedding(k, step) else None
            # The mean loss over all W * BATCH samples (sum: each worker's batch mean, summed).
            scale = 1.0 / BATCH if combine_sum else 1.0 / (BATCH * W)
            g = _grads(params, rows, x, y, ids, scale)
            total["w"] = total["w"] + g["w"]
            total["b"] = total["b"] + g["b"]
            if rows is not None:
                total["u"] = g["u"] if total["u"] is None else total["u"] + g["u"]
                # Embedding rows always combine as the mean over the workers.
                np.add.at(e_grad, ids, g["e"] / W if combine_sum else g["e"])
                total["e"] = True
        for opt in (opt_w, opt_b, opt_u, opt_e):
            opt.zero_grad(set_to_none=True)
        w.grad = torch.tensor(total["w"], dtype=torch.float32)
        b.grad = torch.tensor(total["b"], dtype=torch.float32)
        if total["u"] is not None:
            u.grad = torch.tensor(total["u"], dtype=torch.float32)
            touched = np.flatnonzero(np.abs(e_grad).sum(axis=1) > 0)
            with torch.sparse.check_sparse_tensor_invariants(enable=True):
                e.grad = torch.sparse_coo_tensor(
                    touched[None, :], torch.tensor(e_grad[touched], dtype=torch.float32),
                    e.shape)
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            for opt in (opt_w, opt_b, opt_u, opt_e):
                opt.step()
        history.append(w.detach().numpy().copy())
    return history, {"w": w.detach().numpy(), "b": b.detach().numpy(),
                     "u": u.detach().numpy(), "e": e.detach().numpy()}


def _train(client: ps.Client, rank: int, init: dict[str, np.ndarray], combine: str,
           history: list, errors: list) -> dict[str, np.ndarray]:
    """One worker: pull, compute its batch's gradient (of its share of the mean loss), push."""
    try:
        w = client.dense("w", (D,), ps.SGD(lr=0.01, momentum=0.9, nesterov=True,
                                           weight_decay=0.01), init["w"], combine=combine)
        client.dense("b", (1,), ps.SGD(lr=0.01, momentum=0.5), init["b"], combine=combine)
        client.dense("u", (DIM,), ps.Adam(lr=0.01), init["u"], combine=combine)
        client.embedding("e", DIM, ps.Adagrad(lr=0.1), ps.init.normal(0.0, 0.5), seed=7)
        client.barrier("tables")
        for step in range(STEPS):
            x, y, ids = _data(rank, step)
            use = _uses_embedding(rank, step)
            want = {"w": None, "b": None, "u": None}
            if use:
                want["e"] = ids.astype(np.int64)
            got = client.pull(want)
            params = {k: got[k].astype(np.float64) for k in ("w", "b", "u")}
            rows = got["e"].astype(np.float64) if use else None
            # mean: the servers divide the sum by W; sum: each worker pushes its batch mean.
            g = _grads(params, rows, x, y, ids, 1.0 / BATCH)
            push = {"w": g["w"].astype(np.float32), "b": g["b"].astype(np.float32)}
            if use:
                push["u"] = g["u"].astype(np.float32)
                push["e"] = (ids.astype(np.int64), g["e"].astype(np.float32))
            if step == STEPS - 1:
                after = client.push_pull(push)  # the values after the last step
                history.append(after["w"].copy())
            else:
                client.push(push)
                history.append(w.pull())
        return after
    except BaseException as exc:
        errors.append(exc)
        raise


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"w": (0.1 * rng.standard_normal(D)).astype(np.float32),
            "b": np.zeros(1, np.float32), "u": (0.5 * rng.standard_normal(DIM)).astype(np.float32)}


def _run_bsp(cluster, combine: str, message_bytes: int | None):
    init = _initial()
    histories: list[list] = [[] for _ in range(W)]
    errors: list[BaseException] = []
    results: dict[int, dict] = {}
    clients = [cluster.connect(rank=k, num_workers=W, timeout=60, message_bytes=message_bytes)
               for k in range(W)]
    try:
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(
            k, _train(clients[k], k, init, combine, histories[k], errors))) for k in range(W)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        emb = clients[0].table("e").pull(np.arange(IDS, dtype=np.int64), create=False)
        results[-1] = {"u": clients[0].table("u").pull()}
        # Heartbeats carry the servers' step counts to the scheduler.
        status = wait_for(lambda: (lambda st: st if all(
            srv.get("sync", {}).get("step") == STEPS for srv in st["servers"]) else None)(
                clients[0].status()), 10, f"every server at step {STEPS} in the status")
    finally:
        for c in clients:
            c.close()
    return init, histories, results, emb, status


def _initial_rows() -> np.ndarray:
    """The embedding rows' initial values, from a local table with the same initializer."""
    from paramserver import _core
    table = _core.EmbeddingTable(DIM, ps.Adagrad(lr=0.1).to_config(),
                                 ps.init.normal(0.0, 0.5).to_config(), 7)
    return table.lookup(np.arange(IDS, dtype=np.uint64), None, 1)


@pytest.mark.parametrize("combine,message_bytes", [("mean", None), ("sum", 48)])
def test_bsp_equals_one_process_on_the_concatenated_batch(cluster_factory, combine,
                                                          message_bytes):
    """3 workers x 50 steps of BSP (SGD with Nesterov momentum and weight decay, SGD with
    momentum, Adam, and an Adagrad embedding whose rows only some workers push) equal one process
    on the concatenated batches with a mean loss (torch.optim), within float32 summation error;
    every worker sees the same values after every step. With 48-byte messages every step reaches
    each server in several messages (contributions, then a wait, then the read)."""
    cluster = cluster_factory(2, W, scheduler_args=("--sync", "bsp"))
    init, histories, results, emb, status = _run_bsp(cluster, combine, message_bytes)
    history, final = _reference(init, _initial_rows(),
                                combine_sum=combine == "sum")
    for k in range(W):
        for step in range(STEPS):
            np.testing.assert_allclose(histories[k][step], history[step], rtol=1e-5, atol=1e-6,
                                       err_msg=f"worker {k} step {step + 1}")
        for name in set(results[k]) & {"w", "b", "u"}:  # what its last push_pull pushed
            np.testing.assert_allclose(results[k][name], final[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"worker {k} {name}")
    np.testing.assert_allclose(results[-1]["u"], final["u"], rtol=1e-5, atol=1e-6)
    used = sorted({int(i) for k in range(W) for s in range(STEPS) if _uses_embedding(k, s)
                   for i in _data(k, s)[2]})
    np.testing.assert_allclose(emb[used], final["e"][used], rtol=1e-5, atol=1e-6)
    assert status["sync"]["model"] == "bsp"
    assert all(s["sync"]["members"] == W for s in status["servers"]), status["servers"]


# -- elastic workers: real processes -----------------------------------------------------------

#: A worker process: pushes ``grad`` (all ones times its value) for ``steps`` steps, reporting the
#: value after each step, then leaves (close) -- or, with ``die_after``, SIGKILLs itself after
#: that many steps. With ``hold``: ``(file, i)`` waits before step i+1 until ``file`` exists (at
#: most 60 s); ``(file, None)`` creates ``file`` just before its first step.
_WORKER = """
import json, os, signal, sys, time
import numpy as np
import paramserver as ps
steps, grad, die_after, pause = {steps}, {grad}, {die_after}, {pause}
hold_file, hold_at = {hold}
client = ps.connect(timeout=30)
w = client.dense("w", (4,), ps.SGD(lr=1.0))
client.barrier("start") if {barrier} else None
try:
    for i in range(steps):
        if die_after is not None and i == die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if hold_file and hold_at is None and i == 0:
            open(hold_file, "w").close()
        if hold_file and hold_at == i:
            deadline = time.monotonic() + 60
            while not os.path.exists(hold_file):
                if time.monotonic() > deadline:
                    raise ps.PSTimeoutError(f"waited 60 s before step {{i + 1}} for {{hold_file}}")
                time.sleep(0.01)
        value = w.push_pull(np.full(4, grad, np.float32))
        print(json.dumps({{"clock": client.clock, "value": float(value[0])}}), flush=True)
        time.sleep(pause)
except ps.ParamServerError as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}), flush=True)
    sys.exit(3)
finally:
    client.close()
"""


def _worker(cluster, rank: int, num_workers: int, steps: int, grad: float,
            die_after: int | None = None, pause: float = 0.0, barrier: bool = True,
            hold: tuple[str, int | None] = ("", None)):
    from tests.integration.conftest import spawn_worker
    code = _WORKER.format(steps=steps, grad=grad, die_after=die_after, pause=pause,
                          barrier=barrier, hold=tuple(hold))
    return spawn_worker(cluster, code, rank, num_workers)


def _lines(proc, timeout: float = 90) -> tuple[int, list[dict]]:
    import json
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_bsp_workers_that_run_out_of_data_leave_and_the_rest_go_on(cluster_factory):
    """Uneven data: 3 workers with 10, 6 and 3 steps. Each leaves with close(); the steps after
    its last one combine the others only (mean over who is left), without a timeout."""
    cluster = cluster_factory(2, 3, scheduler_args=("--sync", "bsp"))
    procs = [_worker(cluster, k, 3, steps, float(k + 1)) for k, steps in enumerate((10, 6, 3))]
    results = [_lines(p) for p in procs]
    for code, _ in results:
        assert code == 0, results
    # Steps 1-3: mean of 1, 2, 3; steps 4-6: mean of 1, 2; steps 7-10: worker 0 alone.
    expected = np.cumsum([-2.0] * 3 + [-1.5] * 3 + [-1.0] * 4)
    assert [r["value"] for r in results[0][1]] == pytest.approx(expected.tolist())
    assert [r["clock"] for r in results[0][1]] == list(range(1, 11))
    assert [r["value"] for r in results[2][1]] == pytest.approx(expected[:3].tolist())


def test_bsp_dead_worker_fails_the_step_naming_it(cluster_factory):
    """A worker SIGKILLed between steps: the other's next step fails (after the heartbeat
    timeout) with StepFailedError naming the dead worker, instead of hanging."""
    cluster = cluster_factory(2, 2, scheduler_args=("--sync", "bsp"))
    survivor = _worker(cluster, 0, 2, 10, 1.0)
    victim = _worker(cluster, 1, 2, 10, 2.0, die_after=3)
    code, lines = _lines(survivor)
    victim.communicate(timeout=30)
    assert victim.returncode == -9
    assert code == 3, lines
    assert [r["value"] for r in lines[:3]] == pytest.approx([-1.5, -3.0, -4.5])
    error = lines[-1]
    assert error["error"] == "StepFailedError", error
    assert "worker-1" in error["message"] and "died" in error["message"], error
    assert "--on-worker-failure" in error["message"]


def test_bsp_dead_worker_with_shrink_the_others_go_on(cluster_factory):
    """--on-worker-failure shrink: after the dead worker is detected, the steps combine the
    survivor alone; the scheduler's log says so."""
    cluster = cluster_factory(2, 2, scheduler_args=("--sync", "bsp", "--on-worker-failure",
                                                    "shrink"))
    survivor = _worker(cluster, 0, 2, 8, 1.0)
    victim = _worker(cluster, 1, 2, 8, 2.0, die_after=3)
    code, lines = _lines(survivor)
    victim.communicate(timeout=30)
    assert code == 0, lines
    expected = np.cumsum([-1.5] * 3 + [-1.0] * 5)
    assert [r["value"] for r in lines] == pytest.approx(expected.tolist())
    log = (cluster.log_dir / "scheduler.log").read_text()
    assert "worker-1" in log and "goes on without it" in log, log


def test_bsp_new_worker_enters_at_the_next_step(cluster_factory, tmp_path):
    """A worker connecting to a running BSP job (the rank another worker freed) joins at a step
    no server has started: from that step on every step combines it, before it none does."""
    cluster = cluster_factory(2, 2, scheduler_args=("--sync", "bsp"))
    # Worker 0 takes steps 3 and 4 alone, then waits for the joiner to be about to step (no
    # fixed sleep: a loaded machine starts the joiner slower than worker 0 takes its 40 steps).
    joining = str(tmp_path / "joining")
    steady = _worker(cluster, 0, 2, 40, 1.0, pause=0.05, hold=(joining, 4))
    early = _worker(cluster, 1, 2, 2, 2.0)
    code, early_lines = _lines(early)
    assert code == 0, early_lines
    joiner = _worker(cluster, 1, 2, 5, 3.0, barrier=False, hold=(joining, None))
    code, joined = _lines(joiner)
    assert code == 0, joined
    code, lines = _lines(steady)
    assert code == 0, lines
    first = joined[0]["clock"]
    assert first > 3, joined  # it joined the running job, not its start
    deltas = np.diff([0.0] + [r["value"] for r in lines])
    expected = [-1.5] * 2 + [-1.0] * (first - 3) + [-2.0] * 5 + [-1.0] * (40 - first - 4)
    assert deltas.tolist() == pytest.approx(expected)
    # The joiner saw the values of the steps it took part in.
    assert [r["value"] for r in joined] == pytest.approx(
        [lines[first - 1 + i]["value"] for i in range(5)])


@pytest.mark.parametrize("staleness", [0, 2])
def test_ssp_fast_worker_blocks_and_staleness_stays_bounded(cluster_factory, staleness):
    """SSP(S) with a slow worker: each read of the fast worker at clock c sees every push of the
    slow worker up to clock c - S at least (read from the values: the two push 1 and 100), and
    the staleness the servers report never exceeds S."""
    cluster = cluster_factory(2, 2, scheduler_args=("--sync", f"ssp:{staleness}"))
    fast = _worker(cluster, 0, 2, 12, 1.0)
    slow = _worker(cluster, 1, 2, 12, 100.0, pause=0.15)
    (code0, lines), (code1, _) = _lines(fast), _lines(slow)
    assert code0 == 0 and code1 == 0, lines
    lagging = 0
    for r in lines:
        clock, value = r["clock"], r["value"]
        slow_pushes = (-value - clock) / 100.0  # every push of the fast one is applied
        assert slow_pushes == pytest.approx(round(slow_pushes))
        assert slow_pushes >= clock - staleness, (clock, slow_pushes)
        lagging += slow_pushes < clock
    with cluster.connect() as client:
        status = client.status()
    stats = [s["sync"] for s in status["servers"]]
    assert all(s["max_staleness"] <= staleness for s in stats), stats
    if staleness:
        assert lagging > 0  # the slow worker really was behind when the fast one read
    assert sum(s["reads_waited"] for s in stats) > 0  # the fast worker blocked


def test_32_workers_waiting_in_a_bsp_step_hold_no_threads(cluster_factory):
    """31 of 32 workers wait in step 1 for the last one. The servers hold at most half their
    handler threads for waiting calls (the rest poll), so meanwhile heartbeats stay on time and
    a 33rd worker reading another table with a 5 s timeout is served (were the 8 server threads
    held by waiting calls, its read would queue until the step completes, past its timeout).
    The last push, and the 33rd worker leaving without pushing, complete the step for the 32,
    with the mean of their gradients."""
    n = 32
    cluster = cluster_factory(1, n + 1, scheduler_args=("--sync", "bsp"),
                              server_args=("--threads", "8"))
    clients = [cluster.connect(rank=k, num_workers=n + 1, timeout=60) for k in range(n)]
    try:
        tables = [c.dense("w", (8,), ps.SGD(lr=1.0)) for c in clients]
        clients[0].dense("other", (8,), ps.SGD(lr=1.0), np.full(8, 5.0, np.float32))
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def step(k: int) -> None:
            try:
                results[k] = tables[k].push_pull(np.full(8, float(k), np.float32))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=step, args=(k,)) for k in range(n - 1)]
        for t in threads:
            t.start()
        with cluster.connect(rank=n, num_workers=n + 1, timeout=5.0) as reader:
            wait_for(lambda: clients[0].status()["servers"][0].get("sync", {}).get(
                "waiting_for", "").endswith(f"worker-{n - 1}, worker-{n}"), 20,
                "31 contributions to step 1")
            for _ in range(5):  # several heartbeat periods while 31 workers wait
                time.sleep(0.4)
                assert reader.table("other").pull().tolist() == [5.0] * 8
                status = reader.status()
                late = [node["node_id"] for node in status["nodes"]
                        if node["role"] == "worker" and not node["alive"]]
                assert not late, late
            assert not results  # nobody got past step 1 yet
            step_thread = threading.Thread(target=step, args=(n - 1,))
            step_thread.start()
            threads.append(step_thread)
            wait_for(lambda: clients[0].status()["servers"][0].get("sync", {}).get(
                "waiting_for", "").endswith(f"needs worker-{n}"), 20, "32 contributions")
            assert not results  # the step still waits for the reader, which now leaves
        for t in threads:
            t.join(60)
        assert not errors, errors
        mean = sum(range(n)) / n
        for k in range(n):
            assert results[k].tolist() == pytest.approx([-mean] * 8)
    finally:
        for c in clients:
            c.close()


def test_mismatched_models_and_tables_are_refused(cluster_factory):
    """A worker written for another model, a second declaration with another combine, and a
    synchronous scheduler without a job size each get an error saying what differs."""
    cluster = cluster_factory(1, 2, scheduler_args=("--sync", "ssp:3"))
    with pytest.raises(ps.TableMismatchError, match=r"expects a bsp job.*is ssp:3"):
        cluster.connect(sync="bsp")
    with pytest.raises(ps.InvalidRequestError, match="ssp:S"):
        cluster.connect(sync="ssp:x")
    with cluster.connect(sync="ssp:3") as client:
        assert str(client.sync) == "ssp:3" and client.sync.staleness == 3
        client.dense("w", (4,), ps.SGD(lr=1.0))
        with pytest.raises(ps.TableMismatchError, match="combine=sum"):
            client.dense("w", (4,), ps.SGD(lr=1.0), combine="sum")
        with pytest.raises(ps.InvalidRequestError, match="combine"):
            client.dense("v", (4,), ps.SGD(lr=1.0), combine="max")
    with pytest.raises(ValueError, match="needs its number of workers"):
        ps.SchedulerConfig(num_servers=1, sync="bsp")
    with pytest.raises(ValueError, match="ssp:S"):
        ps.SchedulerConfig(num_servers=1, num_workers=2, sync="bulk")


def test_launch_with_shrink_keeps_the_job_running_when_a_worker_fails(tmp_path):
    """paramserver launch --sync bsp --on-worker-failure shrink: worker 1 crashes (exit 5, no
    clean leave) after 3 steps; the launcher says the others go on, worker 0 finishes its 12
    steps alone after the scheduler removed worker 1, and the job exits 0."""
    from tests.integration.conftest import PS, run_example
    script = tmp_path / "train.py"
    script.write_text(
        "import os, numpy as np, paramserver as ps\n"
        "client = ps.connect(timeout=30)\n"
        "w = client.dense('w', (4,), ps.SGD(lr=1.0))\n"
        "client.barrier('start')\n"
        "for i in range(12):\n"
        "    if client.rank == 1 and i == 3:\n"
        "        os._exit(5)\n"
        "    value = w.push_pull(np.full(4, client.rank + 1.0, np.float32))\n"
        "print('FINAL', client.rank, float(value[0]), flush=True)\n"
        "client.close()\n")
    proc = run_example(PS + ["launch", "--num-servers", "2", "--num-workers", "2", "--sync",
                             "bsp", "--on-worker-failure", "shrink", "--heartbeat-interval",
                             "0.2", "--heartbeat-timeout", "1.5", "--", sys.executable,
                             str(script)], 120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "worker 1 failed with exit code 5; the other workers go on without it" in output
    # Steps 1-3: mean of 1 and 2; steps 4-12: worker 0 alone.
    final = float(output.split("FINAL 0 ", 1)[1].split()[0])
    assert final == pytest.approx(-(3 * 1.5 + 9 * 1.0))


def test_a_restarted_scheduler_keeps_the_step_group(cluster_factory, tmp_path):
    """The step group is part of the scheduler's saved state: after the scheduler is killed and
    restarted with --recover, a worker that had left is still known as left, and a new worker on
    its rank joins at a later step (not at step 1, which the servers would refuse)."""
    from tests.integration.conftest import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, kill, start_node
    args = ("--sync", "bsp", "--checkpoint-dir", str(tmp_path / "ckpt"))
    cluster = cluster_factory(2, 2, scheduler_args=args)
    port = cluster.scheduler.rsplit(":", 1)[1]
    steady = cluster.connect(rank=0, num_workers=2)
    try:
        w0 = steady.dense("w", (4,), ps.SGD(lr=1.0))
        with cluster.connect(rank=1, num_workers=2) as early:
            w1 = early.table("w")
            threads = [threading.Thread(target=lambda t=t, g=g: [t.push(np.full(4, g, np.float32))
                                                                 for _ in range(2)])
                       for t, g in ((w0, 1.0), (w1, 3.0))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert w0.pull()[0] == pytest.approx(-4.0)  # 2 steps of mean(1, 3)
        kill(cluster.scheduler_proc)
        proc, _ = start_node(["scheduler", "--port", port, "--num-servers", "2",
                              "--num-workers", "2", "--heartbeat-interval",
                              str(HEARTBEAT_INTERVAL), "--heartbeat-timeout",
                              str(HEARTBEAT_TIMEOUT), "--recover", *args],
                             tmp_path / "s2.json", tmp_path / "s2.log")
        cluster.scheduler_proc = proc
        members = wait_for(lambda: (lambda m: m if m else None)(
            {m["rank"]: m for m in steady.status()["sync"]["members"]}), 20, "the step group")
        assert members[1]["state"] == "left" and members[1]["last_step"] == 2, members
        w0.push(np.full(4, 1.0, np.float32))  # step 3: worker 0 alone
        with cluster.connect(rank=1, num_workers=2) as late:
            joined = threading.Thread(target=lambda: late.table("w").push(
                np.full(4, 5.0, np.float32)))
            joined.start()
            # Its clock starts just below its first step: after the 3 steps the servers did.
            assert wait_for(lambda: late.clock or None, 20, "the late worker to join") == 3
            w0.push(np.full(4, 1.0, np.float32))  # step 4: mean(1, 5)
            joined.join(30)
        assert w0.pull()[0] == pytest.approx(-4.0 - 1.0 - 3.0)
    finally:
        steady.close()


def test_status_text_shows_the_steps(cluster_factory):
    """paramserver status (text) of a BSP job: the step group and each server's step, and what
    an open step waits for."""
    import subprocess

    from tests.integration.conftest import PS
    cluster = cluster_factory(2, 2, scheduler_args=("--sync", "bsp"))
    with cluster.connect(rank=0, num_workers=2) as client:
        w = client.dense("w", (4,), ps.SGD(lr=1.0))
        pushing = threading.Thread(target=lambda: w.push(np.ones(4, np.float32)))
        pushing.start()  # step 1 waits for worker-1

        def shown() -> str | None:
            text = subprocess.run(PS + ["status", "--scheduler", cluster.scheduler],
                                  capture_output=True, text=True, timeout=30).stdout
            return text if "waiting: step 1 needs worker-1" in text else None

        text = wait_for(shown, 20, "the open step in the status")
        assert "STEPS (bsp, on worker failure: fail)" in text
        assert "worker-0     steps 1-" in text and "step 0, 2 workers" in text
        with cluster.connect(rank=1, num_workers=2) as other:
            other.table("w").push(np.ones(4, np.float32))
        pushing.join(30)
