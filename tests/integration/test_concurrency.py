"""Several worker processes at once: nothing lost, one initialization wins."""

from __future__ import annotations

import json

import numpy as np

import paramserver as ps
from tests.integration.conftest import run_workers

PUSHER = r"""
import numpy as np, paramserver as ps
with ps.connect() as c:
    opt = ps.SGD(lr=1.0)
    a = c.dense("a", shape=(700, 300), optimizer=opt, init=np.full((700, 300), 1000.0, np.float32),
                block_size=20000)
    b = c.dense("b", shape=(33,), optimizer=opt)
    c.barrier("start")
    rng = np.random.default_rng(c.rank)
    for step in range(25):
        # Integer gradients in [-8, 8]: every partial sum stays exact in float32.
        ga = rng.integers(-8, 9, size=(700, 300)).astype(np.float32)
        gb = rng.integers(-8, 9, size=33).astype(np.float32)
        if step % 2:
            c.push({"a": ga, "b": gb})
        else:
            c.push_pull({"a": ga, "b": gb})
    c.barrier("end")
"""


def test_concurrent_workers_lose_no_update(cluster_factory):
    workers = 3
    cluster = cluster_factory(num_servers=2, num_workers=workers)
    run_workers(cluster, PUSHER, workers)
    expected_a = np.full((700, 300), 1000.0)
    expected_b = np.zeros(33)
    for rank in range(workers):
        rng = np.random.default_rng(rank)
        for _ in range(25):
            expected_a -= rng.integers(-8, 9, size=(700, 300))
            expected_b -= rng.integers(-8, 9, size=33)
    with cluster.connect(rank=0) as client:
        client.dense("a", shape=(700, 300), optimizer=ps.SGD(lr=1.0), block_size=20000)
        client.dense("b", shape=(33,), optimizer=ps.SGD(lr=1.0))
        got = client.pull(["a", "b"])
        status = client.status()
    np.testing.assert_array_equal(got["a"], expected_a.astype(np.float32))
    np.testing.assert_array_equal(got["b"], expected_b.astype(np.float32))
    # Both servers hold part of "a" and every push reached them.
    table = next(t for t in status["tables"] if t["name"] == "a")
    assert all(n > 0 for n in table["blocks_per_server"])


DECLARER = r"""
import json, numpy as np, paramserver as ps
with ps.connect() as c:
    init = np.random.default_rng(1000 + c.rank).standard_normal((50, 40)).astype(np.float32)
    t = c.dense("shared", shape=(50, 40), optimizer=ps.Adam(), init=init, block_size=512)
    values = t.pull()
    owner = [r for r in range(c.num_workers)
             if np.array_equal(values, np.random.default_rng(1000 + r).standard_normal((50, 40)).astype(np.float32))]
    print(json.dumps({"rank": c.rank, "checksum": float(values.astype(np.float64).sum()), "owner": owner}))
"""


def test_concurrent_declarations_agree_on_one_initialization(cluster_factory):
    workers = 4
    cluster = cluster_factory(num_servers=2, num_workers=workers)
    results = [json.loads(out.strip().splitlines()[-1])
               for out in run_workers(cluster, DECLARER, workers)]
    assert len({r["checksum"] for r in results}) == 1
    owners = {tuple(r["owner"]) for r in results}
    assert len(owners) == 1 and len(next(iter(owners))) == 1  # exactly one worker's init won
