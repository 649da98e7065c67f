"""No request makes a server allocate far more than it carries, and a refused request changes
nothing: repeated blocks and tables, reply size, memory budget, CreateTable validation, bounded
error messages."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

import paramserver as ps
from paramserver import rpc
from paramserver.config import MAX_DIM
from paramserver.partition import server_of_ids
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import DenseItem, SparseItem, iter_requests
from tests.integration.conftest import Cluster, kill, start_node


def _message(op: int, items: list) -> bytes:
    count, messages = iter_requests(op, items, 1 << 30, "test")
    assert count == 1
    return next(messages)


def _refused(channel: grpc.Channel, message: bytes) -> grpc.RpcError:
    exchange = channel.unary_unary("/paramserver.v1.ParameterServer/Exchange")
    with pytest.raises(grpc.RpcError) as info:
        exchange(message, timeout=30)
    return info.value


@pytest.fixture
def dense(cluster):
    with cluster.connect() as client:
        t = client.dense("w", shape=(300,), optimizer=ps.SGD(lr=1.0), block_size=30,
                         init=np.ones(300, np.float32))
        yield cluster, client, t


def test_a_block_or_a_table_listed_twice_is_refused(dense):
    cluster, client, t = dense
    mine = t._ref.by_server[0][0]
    ones = np.ones(30, np.float32)
    with grpc.insecure_channel(cluster.server_addresses[0]) as channel:
        # The 5 KB pull that once made a server allocate gigabytes.
        error = _refused(channel, _message(pb.PULL, [DenseItem("w", [mine] * 5000, [30] * 5000,
                                                               [])]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"block {mine} is listed more than once" in error.details()
        # A push with a repeated block would have applied two steps.
        error = _refused(channel, _message(pb.PUSH, [DenseItem("w", [mine, mine], [30, 30],
                                                               [ones, ones])]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = _refused(channel, _message(pb.PUSH, [DenseItem("w", [mine], [30], [ones]),
                                                     DenseItem("w", [mine], [30], [ones])]))
        assert "table 'w' appears more than once in one message" in error.details()
    np.testing.assert_array_equal(t.pull(), np.ones(300, np.float32))


def test_assign_checks_finiteness(dense):
    cluster, client, t = dense
    mine = t._ref.by_server[0][0]
    bad = np.ones(30, np.float32)
    bad[4] = np.inf
    with grpc.insecure_channel(cluster.server_addresses[0]) as channel:
        error = _refused(channel, _message(pb.ASSIGN, [DenseItem("w", [mine], [30], [bad])]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "values to assign are not finite (inf at element 4" in error.details()
    np.testing.assert_array_equal(t.pull(), np.ones(300, np.float32))


def test_a_reply_that_cannot_be_sent_is_refused_before_creating_rows(cluster):
    with cluster.connect() as client:
        emb = client.embedding("e", dim=1024, optimizer=ps.SGD())
        ids = np.arange(40_000, dtype=np.uint64)
        ids = ids[server_of_ids(ids, 2) == 0][:16_384]  # 64 MiB of rows for a 128 KiB request
        with grpc.insecure_channel(cluster.server_addresses[0]) as channel:
            error = _refused(channel, _message(pb.PULL, [SparseItem("e", ids, 1024)]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the" in error.details() and "'e'" in error.details()
        assert emb.num_rows() == 0


def test_error_messages_stay_small_whatever_the_request_lists(cluster):
    with cluster.connect() as client:
        t = client.dense("many", shape=(20_000,), optimizer=ps.SGD(), block_size=1)
        mine = list(t._ref.by_server[0])
        assert len(mine) > 5000
        with grpc.insecure_channel(cluster.server_addresses[0]) as channel:
            # Every held block, with one float missing: the message must not list them all.
            wrong = np.ones(len(mine) - 1, np.float32)
            error = _refused(channel, _message(pb.PUSH, [DenseItem("many", mine, [1] * len(mine),
                                                                   [wrong])]))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"({len(mine)} in all) hold {len(mine)} elements" in error.details()
            assert len(error.details()) < 500
            # An absurd table name is cut too.
            error = _refused(channel, _message(pb.PULL, [DenseItem("x" * 100_000, [0], [1], [])]))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert len(error.details()) < 2500 and "characters cut" in error.details()


def test_create_table_validates_like_the_scheduler(cluster):
    def spec(**fields) -> pb.TableSpec:
        fields.setdefault("optimizer", pb.OptimizerSpec(lr=0.1))
        return pb.TableSpec(name="t", **fields)

    cases = [
        (pb.CreateTableRequest(spec=spec(shape=[], block_size=4), blocks=[0]), "shape must"),
        (pb.CreateTableRequest(spec=spec(shape=[8], block_size=4)), "lists none"),
        (pb.CreateTableRequest(spec=spec(shape=[8], block_size=4), blocks=[1, 1]), "distinct"),
        (pb.CreateTableRequest(spec=spec(shape=[8], block_size=4), blocks=[2]), "[0, 2)"),
        (pb.CreateTableRequest(spec=spec(shape=[1 << 30, 1 << 30], block_size=4), blocks=[0]),
         "more than"),
        (pb.CreateTableRequest(spec=spec(kind=pb.TableSpec.EMBEDDING, dim=MAX_DIM + 1)),
         f"dim must be in [1, {MAX_DIM}]"),
        (pb.CreateTableRequest(spec=pb.TableSpec(name="", shape=[4], block_size=4), blocks=[0]),
         "a table needs a name"),
    ]
    with grpc.insecure_channel(cluster.server_addresses[0]) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        for request, why in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateTable(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert why in info.value.details()
        assert not stub.Stats(pb.StatsRequest(), timeout=10).tables  # nothing was created


def test_the_client_refuses_absurd_declarations_before_sending(cluster):
    with cluster.connect() as client:
        with pytest.raises(ps.InvalidRequestError, match=r"dim must be an int in \[1, 65536\]"):
            client.embedding("e", dim=250_000_000, optimizer=ps.SGD())
        with pytest.raises(ps.InvalidRequestError, match="a table name must be"):
            client.dense("n" * 300, shape=(2,), optimizer=ps.SGD())
        with pytest.raises(ps.InvalidRequestError, match="more than the"):
            client.dense("huge", shape=(10**13,), optimizer=ps.SGD())


@pytest.fixture
def budgeted(tmp_path: Path):
    """A scheduler and one server with a 1 MiB memory budget."""
    sched, info = start_node(["scheduler", "--port", "0", "--num-servers", "1"],
                             tmp_path / "s.json", tmp_path / "s.log")
    cluster = Cluster(info["address"], sched)
    try:
        server, sinfo = start_node(["server", "--scheduler", cluster.scheduler, "--max-memory",
                                    "1M"], tmp_path / "v.json", tmp_path / "v.log")
        cluster.servers.append(server)
        cluster.server_addresses.append(sinfo["address"])
        yield cluster
    finally:
        for proc in cluster.servers + [sched]:
            kill(proc)


def test_the_memory_budget_refuses_naming_the_table_and_changes_nothing(budgeted):
    with budgeted.connect() as client:
        # 100k elements of Adam: values and 2 state arrays, 1.2 MB > 1 MiB.
        with pytest.raises(ps.ResourceExhaustedError, match=r"table 'big'.*--max-memory"):
            client.dense("big", shape=(100_000,), optimizer=ps.Adam())
        small = client.dense("small", shape=(1000,), optimizer=ps.Adam())  # 12 KB fits
        np.testing.assert_array_equal(small.pull(), np.zeros(1000, np.float32))
        emb = client.embedding("rows", dim=64, optimizer=ps.SGD())
        emb.pull(np.arange(100))  # about 30 KB
        with pytest.raises(ps.ResourceExhaustedError, match=r"table 'rows'.*embedding rows"):
            emb.pull(np.arange(100, 3700))  # about 1 MB of new rows, in one message
        assert emb.num_rows() == 100
        # Rows that exist cost nothing: a pull of known ids still works.
        assert emb.pull(np.arange(100)).shape == (100, 64)


def test_max_memory_accepts_units(tmp_path):
    import subprocess

    from tests.integration.conftest import PS
    bad = subprocess.run(PS + ["server", "--scheduler", "127.0.0.1:1", "--max-memory", "lots"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a size: 'lots'" in bad.stderr
    from paramserver.cli import _size
    assert [_size(s) for s in ("0", "1024", "512K", "8G", "1.5GiB", "2mb")] == [
        0, 1024, 512 << 10, 8 << 30, 3 << 29, 2 << 20]


def test_a_failed_declaration_leaves_no_half_table(budgeted):
    """The budget refuses the table on the server: the declaring worker drops what it made and
    frees the name at the scheduler, so the name can be declared again, differently."""
    with budgeted.connect() as client:
        with pytest.raises(ps.ResourceExhaustedError, match=r"table 'big'"):
            client.dense("big", shape=(100_000,), optimizer=ps.Adam())
        assert "big" not in client.tables()
        assert not [t for t in client.status()["tables"] if t["name"] == "big"]
        again = client.dense("big", shape=(1000,), optimizer=ps.SGD(lr=1.0))  # a new spec: fine
        again.push(-np.ones(1000, np.float32))
        np.testing.assert_array_equal(again.pull(), np.ones(1000, np.float32))


def test_create_table_refuses_tables_the_scheduler_did_not_place(cluster):
    """A CreateTable sent straight to a server for a table no one declared, or with blocks the
    scheduler did not place there, is refused and creates nothing."""
    channel = rpc.make_channel(cluster.server_addresses[0], ps.Security())
    try:
        stub = pb_grpc.ParameterServerStub(channel)
        stray = pb.CreateTableRequest(spec=pb.TableSpec(
            name="stray", shape=[8], block_size=4, optimizer=pb.OptimizerSpec(lr=1)), blocks=[0])
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateTable(stray, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'stray' is unknown to the scheduler" in info.value.details()
        with cluster.connect() as client:
            t = client.dense("placed", (100_000,), ps.SGD(lr=1.0))
            layout = t._ref.layout
            theirs = [b for b, s in enumerate(layout.block_servers) if s == 1]
            wrong = pb.CreateTableRequest(spec=_placed_spec(client, "placed"), blocks=theirs)
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateTable(wrong, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the scheduler placed blocks" in info.value.details()
            np.testing.assert_array_equal(t.pull(), np.zeros(100_000, np.float32))
    finally:
        channel.close()


def _placed_spec(client, name: str) -> pb.TableSpec:
    reply = client._membership.call("ListTables", pb.ListTablesRequest(name=name))
    return reply.tables[0].spec


def test_a_table_larger_than_the_machine_is_refused_by_name_and_the_server_keeps_serving(cluster):
    """No --max-memory: a 2^40-element table is refused as ResourceExhaustedError naming the
    table, the bytes asked and the memory the machine has, not a bare std::bad_alloc."""
    with cluster.connect() as client:
        with pytest.raises(ps.ResourceExhaustedError) as info:
            client.dense("huge", shape=(2**40,), optimizer=ps.SGD())
        message = str(info.value)
        share = 2**42 // len(cluster.servers)  # each server is asked for its part of 4 TiB
        assert "table 'huge'" in message and f"{share} bytes" in message, message
        assert "this machine has" in message and "refused before allocating" in message, message
        assert "huge" not in client.tables()
        assert all(proc.poll() is None for proc in cluster.servers)
        table = client.dense("after", shape=(1000,), optimizer=ps.SGD(lr=1.0))
        table.push(-np.ones(1000, np.float32))
        np.testing.assert_array_equal(table.pull(), np.ones(1000, np.float32))
