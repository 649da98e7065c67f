"""Synchronous and bounded-staleness training (``--sync bsp`` / ``ssp:S``) on real clusters.

The BSP equivalence tests run W workers (threads, each with its own client, so the steps really
interleave) against one process on the concatenated batches with a mean loss, with torch.optim
as the optimizer oracle. The elastic tests (leave, join, death) use real worker processes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import paramserver as ps
from tests.conftest import wait_for
from tests.integration.conftest import kill

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


def _run_bsp(cluster, combine: str):
    init = _initial()
    histories: list[list] = [[] for _ in range(W)]
    errors: list[BaseException] = []
    results: dict[int, dict] = {}
    clients = [cluster.connect(rank=k, num_workers=W, timeout=60) for k in range(W)]
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


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_bsp_equals_one_process_on_the_concatenated_batch(cluster_factory, combine):
    """3 workers x 50 steps of BSP (SGD with Nesterov momentum and weight decay, SGD with
    momentum, Adam, and an Adagrad embedding whose rows only some workers push) equal one process
    on the concatenated batches with a mean loss (torch.optim), within float32 summation error;
    every worker sees the same values after every step."""
    cluster = cluster_factory(2, W, scheduler_args=("--sync", "bsp"))
    init, histories, results, emb, status = _run_bsp(cluster, combine)
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
