"""Bad input gets a clear error and loses nothing; dead and unreachable nodes are named."""

from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest

import paramserver as ps
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from tests.conftest import wait_for


@pytest.fixture
def table(cluster):
    with cluster.connect() as client:
        t = client.dense("w", shape=(10, 10), optimizer=ps.SGD(lr=1.0),
                         init=np.ones((10, 10), np.float32), block_size=30)
        yield client, t


def test_bad_gradients_raise_and_change_nothing(table):
    client, t = table
    ones = np.ones((10, 10), np.float32)
    with pytest.raises(ps.InvalidRequestError, match=r"'w': expected a gradient of shape \(10, 10\), got \(10, 9\)"):
        t.push(np.zeros((10, 9), np.float32))
    with pytest.raises(ps.InvalidRequestError, match="'w': expected a gradient of dtype float32, got float64"):
        t.push(np.zeros((10, 10)))
    bad = np.zeros((10, 10), np.float32)
    bad[7, 3] = np.nan
    with pytest.raises(ps.InvalidRequestError, match="'w': gradient is not finite"):
        client.push({"w": bad})
    bad[7, 3] = np.inf
    with pytest.raises(ps.InvalidRequestError, match="not finite"):
        t.push_pull(bad)
    with pytest.raises(ps.InvalidRequestError, match="expected a gradient as a numpy float32 array"):
        t.push([[0.0] * 10] * 10)
    with pytest.raises(ps.TableNotFoundError, match="'nope' is not declared"):
        client.push({"nope": ones, "w": ones})  # one bad table: nothing is pushed
    with pytest.raises(ps.TableNotFoundError):
        client.pull(["nope"])
    np.testing.assert_array_equal(t.pull(), ones)


def test_bad_declarations_are_rejected(cluster):
    with cluster.connect() as client:
        with pytest.raises(ps.InvalidRequestError, match="shape must be positive"):
            client.dense("x", shape=(3, 0), optimizer=ps.SGD())
        with pytest.raises(ps.InvalidRequestError, match="optimizer must be a paramserver"):
            client.dense("x", shape=(3,), optimizer="adam")
        with pytest.raises(ps.InvalidRequestError, match=r"init has shape \(4,\), the table \(3,\)"):
            client.dense("x", shape=(3,), optimizer=ps.SGD(), init=np.zeros(4))
        with pytest.raises(ps.InvalidRequestError, match="init contains NaN"):
            client.dense("x", shape=(2,), optimizer=ps.SGD(), init=np.array([1.0, np.nan]))
        # None of the failed declarations created the table: a fresh one works.
        x = client.dense("x", shape=(3,), optimizer=ps.SGD(), init=np.ones(3))
        np.testing.assert_array_equal(x.pull(), np.ones(3, np.float32))


def test_malformed_requests_to_a_server_are_rejected_and_state_is_unchanged(cluster, table):
    client, t = table
    address = cluster.server_addresses[0]
    mine = t._ref.by_server[0][0]  # a block of "w" that server 0 holds
    v = client.dense("v", shape=(300,), optimizer=ps.SGD(lr=1.0), block_size=30)
    vmine = v._ref.by_server[0][0]  # and one of "v"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)

        def rejected(request: pb.DataRequest, code: grpc.StatusCode, match: str) -> None:
            with pytest.raises(grpc.RpcError) as info:
                stub.Exchange(request, timeout=10)
            assert info.value.code() == code, info.value.details()
            assert match in info.value.details()

        rejected(pb.DataRequest(op=pb.PUSH, dense=[pb.DenseSlice(table="zz", blocks=[0])]),
                 grpc.StatusCode.NOT_FOUND, "no dense table 'zz' on server-0")
        rejected(pb.DataRequest(op=pb.PUSH, dense=[pb.DenseSlice(table="w", blocks=[99],
                                                                 data=b"\0" * 120)]),
                 grpc.StatusCode.OUT_OF_RANGE, "block 99 is not held by server-0")
        # A good slice followed by a bad one: the whole request is rejected before applying.
        good = pb.DenseSlice(table="w", blocks=[mine], data=np.ones(30, np.float32).tobytes())
        rejected(pb.DataRequest(op=pb.PUSH, dense=[good, pb.DenseSlice(
            table="v", blocks=[vmine], data=b"\0" * 7)]),
            grpc.StatusCode.INVALID_ARGUMENT, "whole number of float32")
        rejected(pb.DataRequest(op=pb.PUSH, dense=[good, pb.DenseSlice(
            table="v", blocks=[vmine], data=np.ones(29, np.float32).tobytes())]),
            grpc.StatusCode.INVALID_ARGUMENT, "hold 30 elements, the request carries 29")
        rejected(pb.DataRequest(op=pb.PULL, dense=[pb.DenseSlice(table="w", blocks=[mine],
                                                                 data=b"\0\0\0\0")]),
                 grpc.StatusCode.INVALID_ARGUMENT, "a pull carries no data")
        rejected(pb.DataRequest(op=7), grpc.StatusCode.INVALID_ARGUMENT, "unknown op 7")
        create = pb.CreateTableRequest(spec=pb.TableSpec(name="w", shape=[3], block_size=3,
                                                         optimizer=pb.OptimizerSpec(lr=1)),
                                       blocks=[0])
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateTable(create, timeout=10)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        bad_opt = pb.CreateTableRequest(spec=pb.TableSpec(
            name="q", shape=[3], block_size=3, optimizer=pb.OptimizerSpec(lr=-1)), blocks=[0])
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateTable(bad_opt, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "learning rate" in info.value.details()
    np.testing.assert_array_equal(t.pull(), np.ones((10, 10), np.float32))
    t.push(np.ones((10, 10), np.float32))  # still serving
    np.testing.assert_array_equal(t.pull(), np.zeros((10, 10), np.float32))


def test_unreachable_scheduler_fails_within_the_timeout_naming_it():
    # A hang would trip the per-test timeout; the message says which address and how long.
    with pytest.raises(ps.NodeUnavailableError,
                       match=r"scheduler at 127\.0\.0\.1:1 unreachable: could not register within "
                             r"1\.5 s"):
        ps.connect("127.0.0.1:1", timeout=1.5)


def test_no_scheduler_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("PARAMSERVER_SCHEDULER", raising=False)
    with pytest.raises(ps.ParamServerError, match="PARAMSERVER_SCHEDULER"):
        ps.connect()


def test_dead_server_is_named_in_errors_and_status(cluster):
    with cluster.connect(timeout=3.0) as client:
        t = client.dense("w", shape=(100,), optimizer=ps.SGD(lr=1.0), block_size=10)
        t.push(np.ones(100, np.float32))
        os.killpg(cluster.servers[1].pid, signal.SIGKILL)
        cluster.servers[1].wait(10)
        address = cluster.server_addresses[1]
        with pytest.raises(ps.NodeUnavailableError, match=f"server-1 at {address}") as info:
            t.push(np.ones(100, np.float32))
        assert "push of ['w']" in str(info.value)

        def server1_dead():
            nodes = client.status()["nodes"]
            return next(n for n in nodes if n["node_id"] == "server-1")["alive"] is False

        wait_for(server1_dead, 15, "the scheduler to mark server-1 dead")
        with pytest.raises(ps.NodeUnavailableError, match=r"server-1 is dead \(missed heartbeats\)"):
            t.pull()


def test_barrier_times_out_naming_the_missing_worker(cluster_factory):
    cluster = cluster_factory(num_servers=1, num_workers=2)
    with cluster.connect(rank=0) as client:
        with pytest.raises(ps.PSTimeoutError,
                           match=r"barrier 'b' timed out after 1\.0 s: 1 of 2 workers arrived; "
                                 r"waiting for worker-1"):
            client.barrier("b", timeout=1.0)


def test_barrier_fails_fast_when_a_worker_died(cluster_factory):
    cluster = cluster_factory(num_servers=1, num_workers=2)
    with cluster.connect(rank=0) as client:
        other = cluster.connect(rank=1)
        try:
            other._membership._stop.set()  # the worker goes silent: no more heartbeats
            # NodeUnavailableError naming the dead worker, not the PSTimeoutError that the 60 s
            # timeout would give: the barrier failed because of the death.
            with pytest.raises(ps.NodeUnavailableError, match="worker-1 at .* is dead"):
                client.barrier("b", timeout=60.0)
        finally:
            other.close()


def test_a_closed_client_says_so(cluster):
    client = cluster.connect(num_workers=1)
    t = client.dense("w", shape=(2,), optimizer=ps.SGD(lr=1.0))
    pending = t.push_async(np.ones(2, np.float32))
    client.close()
    assert pending.result() is None  # queued before close: still applied
    for call in (client.barrier, client.status, t.pull, lambda: t.push(np.ones(2, np.float32)),
                 lambda: client.dense("v", (2,), ps.SGD()), t.pull_async):
        with pytest.raises(ps.ParamServerError, match="is closed"):
            call()
    with cluster.connect() as other:
        np.testing.assert_array_equal(other.dense("w", (2,), ps.SGD(lr=1.0)).pull(), [-1, -1])


def test_a_barrier_without_a_job_size_fails_clearly(cluster):
    # The cluster's scheduler has no --num-workers, and this worker gives none: before, the
    # barrier returned at once, waiting for nobody.
    with cluster.connect(num_workers=0) as client:
        with pytest.raises(ps.ParamServerError, match="barrier 'b' needs the job size"):
            client.barrier("b", timeout=1.0)
