"""Push and pull across 2 real servers: exact values against numpy references."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps


def test_dense_tables_spread_over_both_servers_and_follow_sgd_exactly(cluster):
    rng = np.random.default_rng(0)
    init = rng.standard_normal((300, 70)).astype(np.float32)
    with cluster.connect() as client:
        w = client.dense("w", shape=(300, 70), optimizer=ps.SGD(lr=0.5), init=init,
                         block_size=1000)  # 21 blocks over 2 servers
        b = client.dense("b", shape=(70,), optimizer=ps.SGD(lr=0.5))
        assert w.num_blocks == 21
        np.testing.assert_array_equal(w.pull(), init)
        np.testing.assert_array_equal(b.pull(), np.zeros(70, np.float32))
        expected_w, expected_b = init.copy(), np.zeros(70, np.float32)
        for _ in range(3):
            gw = rng.standard_normal((300, 70)).astype(np.float32)
            gb = rng.standard_normal(70).astype(np.float32)
            client.push({"w": gw, "b": gb})
            expected_w = expected_w + np.float32(-0.5) * gw
            expected_b = expected_b + np.float32(-0.5) * gb
        got = client.pull(["w", "b"])
        np.testing.assert_array_equal(got["w"], expected_w)
        np.testing.assert_array_equal(got["b"], expected_b)
        status = client.status()
        table = next(t for t in status["tables"] if t["name"] == "w")
        assert sum(table["blocks_per_server"]) == 21
        assert min(table["blocks_per_server"]) >= 10  # balanced, not piled on one server


def test_push_pull_returns_values_after_the_push_in_one_call(cluster):
    with cluster.connect() as client:
        client.dense("a", shape=(5, 4), optimizer=ps.SGD(lr=1.0), init=np.ones((5, 4), np.float32))
        client.dense("c", shape=(3,), optimizer=ps.Adam(lr=0.1))
        out = client.push_pull({"a": np.full((5, 4), 2.0, np.float32),
                                "c": np.ones(3, np.float32)})
        np.testing.assert_array_equal(out["a"], np.full((5, 4), -1.0, np.float32))
        # Adam's first step moves each element by lr against the gradient's sign.
        np.testing.assert_allclose(out["c"], np.full(3, -0.1, np.float32), rtol=1e-6)
        np.testing.assert_array_equal(client.pull(["a"])["a"], out["a"])


def test_async_push_and_pull_apply_in_order(cluster):
    with cluster.connect() as client:
        t = client.dense("t", shape=(1000,), optimizer=ps.SGD(lr=1.0), block_size=300)
        futures = [t.push_async(np.full(1000, float(i), np.float32)) for i in range(1, 11)]
        pulled = t.pull_async()
        for f in futures:
            assert f.result(timeout=30) is None
        np.testing.assert_array_equal(pulled.result(timeout=30), np.full(1000, -55.0, np.float32))
        got = client.pull_async(["t"]).result(timeout=30)
        np.testing.assert_array_equal(got["t"], np.full(1000, -55.0, np.float32))


def test_large_tensor_is_streamed_in_chunks_and_arrives_exact(cluster):
    n = 5_000_000  # 20 MB: several ~4 MB messages per server
    rng = np.random.default_rng(1)
    init = rng.standard_normal(n).astype(np.float32)
    grad = rng.standard_normal(n).astype(np.float32)
    with cluster.connect() as client:
        big = client.dense("big", shape=(n,), optimizer=ps.SGD(lr=0.25), init=init)
        np.testing.assert_array_equal(big.pull(), init)
        after = big.push_pull(grad)
        np.testing.assert_array_equal(after, init + np.float32(-0.25) * grad)


def test_init_callable_and_attach_to_existing_table(cluster):
    with cluster.connect() as first:
        first.dense("m", shape=(4, 4), optimizer=ps.Adagrad(lr=0.1),
                    init=lambda shape: np.arange(16, dtype=np.float64).reshape(shape))
        with cluster.connect() as second:
            # Same spec: attach, and a different init is ignored (the table exists).
            m = second.dense("m", shape=(4, 4), optimizer=ps.Adagrad(lr=0.1),
                             init=np.zeros((4, 4), np.float32))
            np.testing.assert_array_equal(m.pull(), np.arange(16, dtype=np.float32).reshape(4, 4))
            with pytest.raises(ps.TableMismatchError, match=r"'m' exists as dense \(4, 4\)"):
                second.dense("m", shape=(4, 4), optimizer=ps.Adagrad(lr=0.2))
            with pytest.raises(ps.TableMismatchError, match="declared again as dense"):
                second.dense("m", shape=(16,), optimizer=ps.Adagrad(lr=0.1))


def test_worker_ranks_are_distinct_and_requested_ranks_honoured(cluster):
    with cluster.connect(rank=1) as a, cluster.connect() as b, cluster.connect() as c:
        assert a.rank == 1
        assert sorted([a.rank, b.rank, c.rank]) == [0, 1, 2]
        with pytest.raises(ps.TableMismatchError, match="rank 1 is held by live node"):
            cluster.connect(rank=1)


@pytest.mark.parametrize("message_bytes", [None, 4096])
def test_push_with_pull_reads_the_values_after_the_push(cluster, message_bytes):
    """push(grads, pull=...) returns every pulled table after the push, into given arrays too:
    in one round trip when each server gets one message, and (4 KiB messages: every table spans
    several) in two, since a server orders reads after writes only within a message."""
    with cluster.connect(message_bytes=message_bytes) as client:
        names = {"a": 10_000, "b": 3, "c": 5_000}
        for name, n in names.items():
            client.dense(name, (n,), ps.SGD(lr=1.0), np.full(n, 10.0, np.float32))
        emb = client.embedding("e", 8, ps.SGD(lr=1.0))
        ids = np.arange(500, dtype=np.int64)
        out = {"a": np.zeros(10_000, np.float32)}

        def pull_requests() -> int:  # asked of every server now
            from paramserver.v1 import paramserver_pb2 as pb
            return sum(client._pool.call(r, "Stats", pb.StatsRequest(), "stats").pull_requests
                       for r in range(client.num_servers))

        before = pull_requests()
        for step in range(1, 16):  # each step is a chance to read before its write landed
            got = client.push({"a": np.ones(10_000, np.float32), "b": np.ones(3, np.float32),
                               "e": (ids, np.ones((500, 8), np.float32))},
                              pull={"a": None, "b": None, "c": None, "e": ids}, out=out)
            assert got["a"] is out["a"]
            np.testing.assert_array_equal(out["a"], 10.0 - step)
            np.testing.assert_array_equal(got["b"], 10.0 - step)
            np.testing.assert_array_equal(got["c"], 10.0)
            np.testing.assert_array_equal(got["e"], -float(step))
        # One round: the reads travel in the push's messages (no pull request); two rounds: the
        # reads are pull requests of their own, after every write was acknowledged.
        reads_alone = pull_requests() - before
        assert reads_alone == 0 if message_bytes is None else reads_alone >= 15
        np.testing.assert_array_equal(emb.pull(ids), -15.0)
