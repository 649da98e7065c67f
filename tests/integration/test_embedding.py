"""Embedding tables through real servers: routing, dedup, determinism, exactness, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver.v1 import paramserver_pb2 as pb
from tests.conftest import wait_for
from tests.integration.conftest import run_workers

U64_MAX = np.uint64(2**64 - 1)


def _server_stats(client):
    """Every server's statistics, asked now, by rank."""
    pool = client._pool
    stats = pool.on_servers({s.rank: None for s in pool.all()},
                            lambda rank, _: (rank, pool.call(rank, "Stats", pb.StatsRequest(),
                                                             "stats")))
    stats = list(stats.values())
    return [s for _, s in sorted(stats, key=lambda x: x[0])]


def test_rows_are_created_deterministically_and_spread_over_servers(cluster):
    init = ps.init.normal(0.0, 0.5)
    with cluster.connect() as client:
        emb = client.embedding("user", dim=8, optimizer=ps.SGD(lr=1.0), init=init, seed=7)
        ids = np.arange(1000, dtype=np.int64).reshape(10, 100)
        rows = emb.pull(ids)
        assert rows.shape == (10, 100, 8) and rows.dtype == np.float32
        # The same rows as the initializer computes locally, whatever server holds them.
        np.testing.assert_array_equal(rows.reshape(1000, 8), init((1000, 8), seed=7))
        np.testing.assert_array_equal(emb.pull(ids[::-1]), rows[::-1])  # order of request
        assert emb.num_rows() == 1000
        # Sequential ids spread evenly by hash.
        by_server = client._table_stats("user", "rows")
        assert sum(by_server.values()) == 1000 and min(by_server.values()) > 400

        def status_rows():  # server statistics reach the scheduler with heartbeats
            table = next(t for t in client.status()["tables"] if t["name"] == "user")
            return table["rows_per_server"] == [by_server[0], by_server[1]] and table

        table = wait_for(status_rows, 15, "status to show the rows of 'user' per server")
        assert table["dim"] == 8 and table["optimizer"]["name"] == "SGD"
        # SGD without momentum keeps no state: 8 floats (32 bytes) per row, plus the map.
        assert all(b >= 32 * n for b, n in zip(table["bytes_per_server"], table["rows_per_server"]))
        other = client.embedding("item", dim=8, optimizer=ps.SGD(lr=1.0), init=init, seed=8)
        assert not np.array_equal(other.pull(np.arange(10)), rows.reshape(1000, 8)[:10])


def test_duplicate_ids_are_summed_and_the_whole_id_range_works(cluster):
    with cluster.connect() as client:
        emb = client.embedding("e", dim=4, optimizer=ps.SGD(lr=1.0))  # zeros
        ids = np.array([0, 5, U64_MAX, 5, 2**63, 5], dtype=np.uint64)
        grads = np.arange(24, dtype=np.float32).reshape(6, 4)
        emb.push(ids, grads)
        got = emb.pull(np.array([0, 5, U64_MAX, 2**63, 12345], dtype=np.uint64))
        np.testing.assert_array_equal(got[0], -grads[0])
        np.testing.assert_array_equal(got[1], -(grads[1] + grads[3] + grads[5]))
        np.testing.assert_array_equal(got[2], -grads[2])
        np.testing.assert_array_equal(got[3], -grads[4])
        np.testing.assert_array_equal(got[4], np.zeros(4, np.float32))  # created on pull
        # int64 ids are the uint64 of the same bits: -1 is 2**64 - 1.
        np.testing.assert_array_equal(emb.pull(np.array([-1], dtype=np.int64))[0], -grads[2])
        assert emb.num_rows() == 5


def test_adagrad_per_row_matches_a_numpy_reference(cluster):
    rng = np.random.default_rng(3)
    lr, eps, dim = 0.1, 1e-10, 6
    with cluster.connect() as client:
        emb = client.embedding("a", dim=dim, optimizer=ps.Adagrad(lr=lr, eps=eps))
        values: dict[int, np.ndarray] = {}
        sums: dict[int, np.ndarray] = {}
        for _ in range(20):
            ids = rng.integers(0, 50, size=64).astype(np.int64)
            grads = rng.standard_normal((64, dim)).astype(np.float32)
            emb.push(ids, grads)
            for i in np.unique(ids):
                g = grads[ids == i].sum(axis=0, dtype=np.float32)
                v = values.setdefault(int(i), np.zeros(dim, np.float32))
                s = sums.setdefault(int(i), np.zeros(dim, np.float32))
                s += g * g
                v -= np.float32(lr) * (g / (np.sqrt(s) + np.float32(eps)))
        keys = np.array(sorted(values), dtype=np.int64)
        np.testing.assert_allclose(emb.pull(keys), np.stack([values[k] for k in keys]),
                                   rtol=1e-5, atol=1e-6)


def test_one_call_mixes_dense_and_embedding_tables(cluster):
    with cluster.connect() as client:
        w = client.dense("w", shape=(3, 2), optimizer=ps.SGD(lr=1.0), init=np.ones((3, 2)))
        client.embedding("u", dim=2, optimizer=ps.SGD(lr=1.0))
        client.embedding("v", dim=3, optimizer=ps.SGD(lr=0.5))
        before = [s.push_requests for s in _server_stats(client)]
        out = client.push_pull({
            "w": np.ones((3, 2), np.float32),
            "u": (np.array([[1, 2], [2, 3]], dtype=np.int64), np.ones((2, 2, 2), np.float32)),
            "v": (np.array([9], dtype=np.uint64), np.full((1, 3), 4.0, np.float32)),
        })
        np.testing.assert_array_equal(out["w"], np.zeros((3, 2), np.float32))
        np.testing.assert_array_equal(out["u"][:, :, 0], [[-1, -2], [-2, -1]])
        np.testing.assert_array_equal(out["v"], [[-2, -2, -2]])
        # Three tables, one request per server.
        assert [s.push_requests for s in _server_stats(client)] == [n + 1 for n in before]
        pulled = client.pull({"w": None, "u": np.array([2], dtype=np.int64)})
        np.testing.assert_array_equal(pulled["u"], [[-2, -2]])
        np.testing.assert_array_equal(pulled["w"], w.pull())


def test_bad_embedding_input_raises_and_changes_nothing(cluster):
    with cluster.connect() as client:
        emb = client.embedding("e", dim=4, optimizer=ps.SGD(lr=1.0))
        ids = np.array([1, 2, 3], dtype=np.int64)
        before = emb.pull(ids)
        with pytest.raises(ps.InvalidRequestError, match=r"'e': expected gradients of shape \(3, 4\), got \(3, 5\)"):
            emb.push(ids, np.ones((3, 5), np.float32))
        with pytest.raises(ps.InvalidRequestError, match=r"shape \(3, 4\), got \(2, 4\)"):
            emb.push(ids, np.ones((2, 4), np.float32))
        with pytest.raises(ps.InvalidRequestError, match="ids must be int64 or uint64, got float64"):
            emb.pull(np.array([1.0, 2.0]))
        with pytest.raises(ps.InvalidRequestError, match="ids must be int64 or uint64, got int32"):
            emb.push(np.array([1, 2, 3], dtype=np.int32), np.ones((3, 4), np.float32))
        bad = np.ones((3, 4), np.float32)
        bad[1, 2] = np.nan
        with pytest.raises(ps.InvalidRequestError, match="not finite"):
            emb.push(ids, bad)
        with pytest.raises(ps.InvalidRequestError, match=r"takes \(ids, grads\)"):
            client.push({"e": ids})
        np.testing.assert_array_equal(emb.pull(ids), before)
        assert emb.num_rows() == 3
        with pytest.raises(ps.TableMismatchError, match="'e' exists as embedding dim=4"):
            client.embedding("e", dim=8, optimizer=ps.SGD(lr=1.0))
        with pytest.raises(ps.TableMismatchError):
            client.embedding("e", dim=4, optimizer=ps.SGD(lr=1.0), seed=1)
        with pytest.raises(ps.InvalidRequestError, match="init must be a paramserver.init"):
            client.embedding("f", dim=4, optimizer=ps.SGD(), init=np.zeros(4))


PUSHER = r"""
import numpy as np, paramserver as ps
with ps.connect() as c:
    emb = c.embedding("shared", dim=16, optimizer=ps.SGD(lr=1.0))  # zeros: sums stay exact
    c.barrier("start")
    rng = np.random.default_rng(c.rank)
    for _ in range(30):
        ids = rng.integers(0, 300, size=256).astype(np.int64)      # overlapping across workers
        grads = rng.integers(-4, 5, size=(256, 16)).astype(np.float32)
        emb.push(ids, grads)
    c.barrier("end")
"""


def test_concurrent_workers_pushing_overlapping_ids_lose_nothing(cluster_factory):
    workers = 3
    cluster = cluster_factory(num_servers=2, num_workers=workers)
    run_workers(cluster, PUSHER, workers)
    expected = np.zeros((300, 16))
    for rank in range(workers):
        rng = np.random.default_rng(rank)
        for _ in range(30):
            ids = rng.integers(0, 300, size=256)
            grads = rng.integers(-4, 5, size=(256, 16))
            np.add.at(expected, ids, -grads)
    with cluster.connect(rank=0) as client:
        emb = client.embedding("shared", dim=16, optimizer=ps.SGD(lr=1.0))
        got = emb.pull(np.arange(300, dtype=np.int64))
    np.testing.assert_array_equal(got, expected.astype(np.float32))
