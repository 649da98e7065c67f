"""The shared-memory transport (paramserver.shm) with real processes: negotiation, fallback,
what a peer's death leaves behind, a server that forgot a segment, and malformed descriptors.

Every other integration test runs on both transports (the ``transport`` fixture of conftest);
these are about shared memory itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest

import paramserver as ps
from paramserver import shm
from paramserver.status import format_status
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import DenseItem, decode_reply, floats, iter_requests
from tests.conftest import wait_for
from tests.integration.conftest import kill, start_node


@pytest.fixture(params=["shm"])
def transport(request, monkeypatch):
    """These tests choose their transport themselves."""
    monkeypatch.delenv("PARAMSERVER_TRANSPORT", raising=False)
    yield request.param


def _server_stats(address: str) -> pb.ServerStats:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.ParameterServerStub(channel).Stats(pb.StatsRequest(), timeout=10)


def _segments() -> list[str]:
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.PREFIX))


def test_a_worker_on_the_same_host_uses_shared_memory_and_status_shows_it(cluster):
    with cluster.connect() as client:
        assert client.transport() == "shm"
        t = client.dense("w", shape=(300_000,), optimizer=ps.SGD(lr=0.5), block_size=1000,
                         init=np.arange(300_000.0))
        e = client.embedding("e", dim=4, optimizer=ps.SGD(lr=1.0), init=ps.init.zeros())
        t.push(np.full(300_000, 2.0, np.float32))
        np.testing.assert_array_equal(t.pull(), np.arange(300_000.0, dtype=np.float32) - 1.0)
        ids = np.array([3, 7, 3, 2**40], np.uint64)
        e.push(ids, np.ones((4, 4), np.float32))
        np.testing.assert_array_equal(e.pull(ids)[:, 0], [-2.0, -1.0, -2.0, -1.0])
        # Nothing of the segments is left in /dev/shm: they live in the two processes only.
        assert _segments() == []
        for address in cluster.server_addresses:
            stats = _server_stats(address)
            assert stats.shm_clients == 1 and stats.shm_bytes >= 1 << 20
        def reported() -> dict | None:
            status = client.status()
            workers = [n for n in status["nodes"] if n["role"] == "worker"]
            return status if workers and workers[0]["transport"] else None

        status = wait_for(reported, 10, "the worker's heartbeat with its transport")
        worker = next(n for n in status["nodes"] if n["role"] == "worker")
        assert worker["transport"] == "shm"
        assert all(s["shm_clients"] == 1 for s in status["servers"])
        text = format_status(status)
        assert "transport: shm" in text and "shared memory: 1 workers" in text
    # close() detaches: the servers unmap at once.
    for address in cluster.server_addresses:
        assert _server_stats(address).shm_clients == 0


def test_transport_grpc_and_a_server_that_refuses(cluster_factory):
    cluster = cluster_factory(num_servers=2, server_args=("--transport", "grpc"))
    with cluster.connect() as client:  # auto: falls back to gRPC silently
        t = client.dense("w", shape=(10,), optimizer=ps.SGD(lr=1.0), init=np.zeros(10))
        t.push(np.ones(10, np.float32))
        np.testing.assert_array_equal(t.pull(), -np.ones(10))
        assert client.transport() == "grpc"
    with pytest.raises(ps.ParamServerError, match=r"shared memory with server-\d at .* is not "
                                                  r"possible: .*turned off \(--transport grpc\)"):
        cluster.connect(transport="shm")
    with cluster.connect(transport="grpc") as client:
        client.table("w").push(np.ones(10, np.float32))
        assert client.transport() == "grpc"
    assert _server_stats(cluster.server_addresses[0]).shm_clients == 0


WORKER = """
import sys, time
import numpy as np
import paramserver as ps
client = ps.connect(transport="shm", timeout=20)
t = client.dense("w", shape=(100_000,), optimizer=ps.SGD(lr=1.0), init=np.zeros(100_000))
t.push(np.ones(100_000, np.float32))
print("pushed", flush=True)
time.sleep(60)
"""


def test_a_killed_worker_leaves_nothing_and_its_segments_are_unmapped(cluster, tmp_path):
    env = dict(os.environ, PARAMSERVER_SCHEDULER=cluster.scheduler)
    log = tmp_path / "worker.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "pushed", log.read_text()
        assert all(_server_stats(a).shm_clients == 1 for a in cluster.server_addresses)
        kill(proc, signal.SIGKILL)
        # Each server sees the process end and unmaps its segments (janitor, every second).
        wait_for(lambda: all(_server_stats(a).shm_clients == 0
                             for a in cluster.server_addresses), 15,
                 "the servers to unmap the killed worker's segments")
        assert _segments() == []
        with cluster.connect() as client:  # the job goes on, values intact
            np.testing.assert_array_equal(client.table("w").pull(), -np.ones(100_000))
    finally:
        kill(proc)
        proc.stdout.close()


def test_a_server_restarted_at_its_address_gets_the_segments_attached_again(cluster_factory,
                                                                           tmp_path):
    """SIGKILL of a server leaves nothing in /dev/shm; its new incarnation at the same address
    does not know the worker's segments, so the worker attaches again, and a push is applied
    once on the restored tables."""
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(1, scheduler_args=("--checkpoint-dir", str(directory)))
    port = cluster.server_addresses[0].rsplit(":", 1)[1]
    with cluster.connect(timeout=30) as client:
        t = client.dense("w", shape=(1000,), optimizer=ps.SGD(lr=1.0), init=np.zeros(1000))
        t.push(np.ones(1000, np.float32))
        client.checkpoint()
        kill(cluster.servers[0], signal.SIGKILL)
        assert _segments() == []
        proc, _ = start_node(["server", "--scheduler", cluster.scheduler, "--rank", "0",
                              "--port", port, "--replace"], tmp_path / "s0b.json",
                             tmp_path / "s0b.log")
        cluster.servers.append(proc)
        wait_for(lambda: next(n for n in client.status()["nodes"] if n["node_id"] ==
                              "server-0")["restore_state"].startswith("restored"), 60,
                 "server-0 restored")
        t.push(np.ones(1000, np.float32))
        np.testing.assert_array_equal(t.pull(), np.full(1000, -2.0))
        assert client.transport() == "shm"
        assert _server_stats(cluster.server_addresses[0]).shm_clients == 1


def test_a_server_that_forgot_the_segments_gets_them_attached_again(cluster):
    with cluster.connect() as client:
        t = client.dense("w", shape=(64,), optimizer=ps.SGD(lr=1.0), init=np.zeros(64),
                         block_size=16)  # on both servers
        t.push(np.ones(64, np.float32))
        # The server drops every segment of this client (as a restarted server at the same
        # address would not know them): the next message attaches again and is applied once.
        for address in cluster.server_addresses:
            with grpc.insecure_channel(address) as channel:
                pb_grpc.ParameterServerStub(channel).ShmDetach(
                    pb.ShmDetachRequest(client=client._client_id), timeout=10)
            assert _server_stats(address).shm_clients == 0
        t.push(np.ones(64, np.float32))
        np.testing.assert_array_equal(t.pull(), np.full(64, -2.0))
        assert client.transport() == "shm"
        assert all(_server_stats(a).shm_clients == 1 for a in cluster.server_addresses)


def test_malformed_descriptors_are_refused_and_change_nothing(cluster, tmp_path):
    with cluster.connect() as client:
        t = client.dense("w", shape=(8,), optimizer=ps.SGD(lr=1.0), init=np.arange(8.0))
        address = cluster.server_addresses[0]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ShmExchange(pb.ShmExchangeRequest(segment=12345, request_size=10),
                                 timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "holds no shared-memory segment 12345" in info.value.details()
            # Names that are not a segment's, or a file that is not private, are not mapped.
            for name in ["../../etc/passwd", "paramserver-1-zz", "x"]:
                reply = stub.ShmAttach(pb.ShmAttachRequest(
                    client="c", boot_id=shm.boot_id(), pid=os.getpid(), name=name, size=4096),
                    timeout=10)
                assert not reply.accepted and "not a paramserver segment name" in reply.reason
            open_segment = shm.Segment.create(1 << 20)
            try:
                os.chmod(os.path.join(shm.SHM_DIR, open_segment.name), 0o644)
                reply = stub.ShmAttach(pb.ShmAttachRequest(
                    client="c", boot_id=shm.boot_id(), pid=os.getpid(),
                    name=open_segment.name, size=open_segment.size), timeout=10)
                assert not reply.accepted and "not a private file" in reply.reason
            finally:
                open_segment.unlink()
                open_segment.close()
            reply = stub.ShmAttach(pb.ShmAttachRequest(
                client="c", boot_id="another-host", pid=os.getpid(), name="x", size=1), timeout=10)
            assert not reply.accepted and "another host" in reply.reason

            # A real segment: bounds outside it are INVALID_ARGUMENT; a reply that does not fit
            # the room given comes back inline.
            segment = shm.Segment.create(1 << 20)
            try:
                reply = stub.ShmAttach(pb.ShmAttachRequest(
                    client="c", boot_id=shm.boot_id(), pid=os.getpid(), name=segment.name,
                    size=segment.size), timeout=10)
            finally:
                segment.unlink()
            assert reply.accepted
            handle = reply.segment
            _, messages = iter_requests(pb.PULL, [DenseItem("w", [0], [8], [])], 1 << 20, "")
            message = next(messages)
            size = shm.write_parts(segment.view, [message])
            for bad in [dict(request_size=segment.size + 1),
                        dict(request_size=size, reply_offset=size + 1),
                        dict(request_size=size, reply_offset=64, reply_capacity=segment.size)]:
                with pytest.raises(grpc.RpcError) as info:
                    stub.ShmExchange(pb.ShmExchangeRequest(segment=handle, **bad), timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "out of bounds" in info.value.details()
            # Garbage in the segment is a malformed request, as on gRPC.
            segment.view[:size] = b"\xff" * size
            with pytest.raises(grpc.RpcError) as info:
                stub.ShmExchange(pb.ShmExchangeRequest(segment=handle, request_size=size,
                                                       reply_offset=4096, reply_capacity=4096),
                                 timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            segment.view[:size] = message
            answer = stub.ShmExchange(pb.ShmExchangeRequest(
                segment=handle, request_size=size, reply_offset=4096, reply_capacity=8),
                timeout=10)
            assert answer.reply_size == -1
            dense, _ = decode_reply(answer.inline)
            np.testing.assert_array_equal(floats(dense[0].data), np.arange(8.0))
            answer = stub.ShmExchange(pb.ShmExchangeRequest(
                segment=handle, request_size=size, reply_offset=4096, reply_capacity=4096),
                timeout=10)
            dense, _ = decode_reply(bytes(segment.view[4096:4096 + answer.reply_size]))
            np.testing.assert_array_equal(floats(dense[0].data), np.arange(8.0))
            stub.ShmDetach(pb.ShmDetachRequest(client="c"), timeout=10)
            segment.close()
        np.testing.assert_array_equal(t.pull(), np.arange(8.0))  # nothing changed


def test_sweep_removes_only_the_segments_of_dead_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    left = tmp_path / f"paramserver-{dead.stdout.strip()}-{'ab' * 16}"
    live = tmp_path / f"paramserver-{os.getpid()}-{'cd' * 16}"
    other = tmp_path / "not-ours"
    for path in (left, live, other):
        path.write_bytes(b"x")
    assert shm.sweep(str(tmp_path)) == [left.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_segment_is_private_and_its_name_unguessable():
    a, b = shm.Segment.create(10), shm.Segment.create(3 << 20)
    try:
        for segment in (a, b):
            info = os.stat(os.path.join(shm.SHM_DIR, segment.name))
            assert info.st_mode & 0o777 == 0o600
            assert segment.name.startswith(f"paramserver-{os.getpid()}-")
        assert a.size == 1 << 20 and b.size == 3 << 20  # rounded up to MiB
        assert a.name != b.name and len(a.name.rsplit("-", 1)[1]) == 32
    finally:
        for segment in (a, b):
            segment.unlink()
            segment.close()
    assert not any(n in _segments() for n in (a.name, b.name))


def test_a_bsp_step_of_many_messages_keeps_its_own_copy_of_borrowed_segments(cluster_factory):
    """A BSP contribution of many messages is summed when its last message is here; the worker
    reuses a message's segment as soon as that call returns (8 in flight), so the server must
    not keep views into the segments (without its copy, the early messages' values are those of
    later ones)."""
    cluster = cluster_factory(num_servers=1, num_workers=1, scheduler_args=("--sync", "bsp"))
    with cluster.connect(rank=0, num_workers=1, message_bytes=256) as client:
        t = client.dense("w", shape=(20_000,), optimizer=ps.SGD(lr=1.0), block_size=64,
                         init=np.zeros(20_000))
        assert client.transport() == "shm"
        grad = (np.arange(20_000) % 7).astype(np.float32)
        for step in (1, 2):
            t.push(grad)
            np.testing.assert_array_equal(t.pull(), -step * grad)
