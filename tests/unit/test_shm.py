"""paramserver.shm pieces in one process: the messages a transport writes, the reply room a
message asks for, and a server's registry of mapped segments (bounds, detach, reaping the
segments of a process that ended). The transport between real processes is tested in
tests/integration/test_shm.py."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from paramserver import shm
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import (
    DenseItem,
    SparseItem,
    encode_pending,
    encode_reply,
    iter_messages,
    iter_requests,
)


def _items(rng: np.random.Generator, reads: bool) -> list:
    items: list = []
    for t in range(int(rng.integers(1, 4))):
        blocks = sorted(rng.choice(10_000, int(rng.integers(1, 6)), replace=False).tolist())
        lengths = rng.integers(1, 300, len(blocks)).tolist()
        views = [] if reads else [rng.standard_normal(n).astype(np.float32) for n in lengths]
        items.append(DenseItem(f"dense-{t}" * int(rng.integers(1, 9)), blocks, lengths, views))
    for t in range(int(rng.integers(0, 3))):
        ids = np.unique(rng.integers(0, 2**63, int(rng.integers(1, 50)), dtype=np.uint64))
        dim = int(rng.integers(1, 33))
        rows = None if reads else rng.standard_normal((ids.size, dim)).astype(np.float32)
        items.append(SparseItem(f"emb-{t}", ids, dim, rows))
    return items


@pytest.mark.parametrize("op", [pb.PUSH, pb.PULL, pb.PUSH_PULL, pb.ASSIGN, pb.LOOKUP])
def test_messages_are_the_requests_bytes_and_their_replies_fit_the_room_they_ask(op):
    rng = np.random.default_rng(op)
    for trial in range(40):
        reads = op in (pb.PULL, pb.LOOKUP)
        items = _items(rng, reads)
        message_bytes = int(rng.choice([64, 1 << 12, 1 << 20]))
        tag = pb.OpTag(client="c", seq=trial + 1, servers=[0], parts=[1])
        count, messages = iter_messages(op, items, message_bytes, "worker-1", tag)
        expected_count, requests = iter_requests(op, items, message_bytes, "worker-1", tag)
        messages, requests = list(messages), list(requests)
        assert count == expected_count == len(messages)
        for message, request in zip(messages, requests):
            assert message.join() == request and message.size == len(request)
            view = bytearray(message.size)
            assert shm.write_parts(memoryview(view), message.parts) == message.size
            assert bytes(view) == request
            # The largest reply a server sends: every slice of the message read back.
            parsed = pb.DataRequest.FromString(request)
            if op in (pb.PUSH, pb.ASSIGN):
                continue
            by_name = {item.table: item for item in items}
            dense = [(d.table, list(d.blocks), np.zeros(sum(
                dict(zip(by_name[d.table].blocks, by_name[d.table].lengths))[b]
                for b in d.blocks), np.float32)) for d in parsed.dense]
            sparse = [(s.table, np.frombuffer(s.ids, np.uint64),
                       np.zeros((len(s.ids) // 8, by_name[s.table].dim), np.float32))
                      for s in parsed.sparse]
            assert len(encode_reply(dense, sparse)) <= message.reply_bytes
            assert len(encode_pending("x" * 5000)) <= message.reply_bytes


def _attach(registry: shm.ShmRegistry, segment: shm.Segment, pid: int,
            client: str = "worker-0/abc") -> pb.ShmAttachReply:
    return registry.attach(pb.ShmAttachRequest(client=client, boot_id=shm.boot_id(), pid=pid,
                                               name=segment.name, size=segment.size))


def test_a_registry_maps_checks_bounds_and_detaches():
    registry = shm.ShmRegistry("server-0")
    segment = shm.Segment.create(1 << 20)
    try:
        reply = _attach(registry, segment, pid=os.getpid())
    finally:
        segment.unlink()
    assert reply.accepted and reply.segment
    segment.view[:5] = b"hello"
    request, room = registry.segment(pb.ShmExchangeRequest(
        segment=reply.segment, request_size=5, reply_offset=16, reply_capacity=100))
    assert bytes(request) == b"hello" and len(room) == 100
    room[:3] = b"abc"
    assert bytes(segment.view[16:19]) == b"abc"  # the worker sees what the server wrote
    for bad in [dict(request_size=-1), dict(request_size=(1 << 20) + 1),
                dict(request_size=32, reply_offset=16),
                dict(request_size=5, reply_offset=17, reply_capacity=1),
                dict(request_size=5, reply_offset=16, reply_capacity=1 << 20)]:
        with pytest.raises(ValueError, match="out of bounds"):
            registry.segment(pb.ShmExchangeRequest(segment=reply.segment, **bad))
    assert registry.stats() == (1, 1 << 20)
    registry.detach("worker-0/abc", [reply.segment])
    with pytest.raises(shm.UnknownSegment, match="holds no shared-memory segment"):
        registry.segment(pb.ShmExchangeRequest(segment=reply.segment, request_size=1))
    assert registry.stats() == (0, 0)
    del request, room
    segment.close()


def test_a_registry_unmaps_the_segments_of_a_process_that_ended():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    registry = shm.ShmRegistry("server-0")
    segment = shm.Segment.create(1 << 20)
    try:
        assert _attach(registry, segment, pid=child.pid).accepted
    finally:
        segment.unlink()
        segment.close()
    assert registry.reap() == [] and registry.stats()[0] == 1
    child.stdin.close()
    child.wait(10)
    assert registry.reap() == ["worker-0/abc"] and registry.stats() == (0, 0)


def test_a_registry_refuses_what_it_cannot_share():
    registry = shm.ShmRegistry("server-0")
    segment = shm.Segment.create(1 << 20)
    try:
        reply = registry.attach(pb.ShmAttachRequest(client="c", boot_id=shm.boot_id(),
                                                    pid=2**22 + 12345, name=segment.name,
                                                    size=segment.size))
        assert not reply.accepted and "not visible here" in reply.reason
        reply = registry.attach(pb.ShmAttachRequest(
            client="c", boot_id=shm.boot_id(), pid=os.getpid(),
            name=segment.name, size=segment.size + 1))
        assert not reply.accepted and "has 1048576 bytes, not 1048577" in reply.reason
        registry.willing = False
        reply = _attach(registry, segment, pid=os.getpid())
        assert not reply.accepted and "turned off" in reply.reason
    finally:
        segment.unlink()
        segment.close()
    assert registry.stats() == (0, 0)
