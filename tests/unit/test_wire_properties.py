"""Property-based tests of the codec and the server's message handler (bounded for CI; the long
run is ``tests/fuzz/fuzz_codec.py``).

- Whatever protobuf writes, :func:`decode_request` reads the same fields; whatever we write,
  protobuf reads back the items we encoded, however small the messages.
- Any mutation of a message is decoded or refused with ``ValueError``, nothing else.
- The server's handler, given random and mutated messages, answers or refuses with an exception
  that maps to a clean gRPC status, and a refused message leaves every table unchanged.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramserver import SGD, init
from paramserver.errors import ResourceExhaustedError, TableMismatchError, TableNotFoundError
from paramserver.server import _Shards
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import (
    DenseItem,
    SparseItem,
    decode_request,
    initializer_to_json,
    iter_requests,
    optimizer_to_spec,
)

#: Bounded: these run in CI on every commit. The fuzz script runs the same properties longer by
#: setting PARAMSERVER_FUZZ_EXAMPLES before importing this module.
BOUNDED = settings(max_examples=int(os.environ.get("PARAMSERVER_FUZZ_EXAMPLES", "150")),
                   deadline=None, database=None, suppress_health_check=list(HealthCheck))

OPS = st.sampled_from([pb.PUSH, pb.PULL, pb.PUSH_PULL, pb.ASSIGN])
NAMES = st.text(min_size=1, max_size=10)
INT64 = st.integers(-2**63, 2**63 - 1)


def _whole(unit: int, max_size: int = 64) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size).map(lambda b: b[:len(b) // unit * unit])


PB_REQUESTS = st.builds(
    lambda op, dense, sparse, node: pb.DataRequest(op=op, dense=dense, sparse=sparse, node_id=node),
    OPS,
    st.lists(st.builds(lambda t, b, d: pb.DenseSlice(table=t, blocks=b, data=d), NAMES,
                       st.lists(INT64, max_size=6), _whole(4)), max_size=4),
    st.lists(st.builds(lambda t, i, d: pb.SparseSlice(table=t, ids=i, data=d), NAMES, _whole(8),
                       _whole(4)), max_size=3),
    st.text(max_size=12))


@BOUNDED
@given(PB_REQUESTS)
def test_we_read_what_protobuf_writes(request):
    view = decode_request(request.SerializeToString())
    assert view.op == request.op and view.node_id == request.node_id
    assert [(d.table, d.blocks, bytes(d.data)) for d in view.dense] == [
        (d.table, list(d.blocks), d.data) for d in request.dense]
    assert [(s.table, bytes(s.ids), bytes(s.data)) for s in view.sparse] == [
        (s.table, s.ids, s.data) for s in request.sparse]


@st.composite
def items(draw, pull: bool | None = None):
    """Dense and embedding items for one server (distinct tables), and the op."""
    op = draw(OPS) if pull is None else (pb.PULL if pull else pb.PUSH)
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    out = []
    for name in names:
        if draw(st.booleans()):
            blocks = draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=5, unique=True))
            lengths = [draw(st.integers(1, 40)) for _ in blocks]
            views = [] if op == pb.PULL else [
                np.arange(n, dtype=np.float32) + b for b, n in zip(blocks, lengths)]
            out.append(DenseItem(name, blocks, lengths, views))
        else:
            ids = np.array(draw(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20,
                                         unique=True)), dtype=np.uint64)
            dim = draw(st.integers(1, 6))
            rows = None if op == pb.PULL else np.arange(ids.size * dim, dtype=np.float32).reshape(
                ids.size, dim)
            out.append(SparseItem(name, ids, dim, rows))
    return op, out


@BOUNDED
@given(items(), st.integers(8, 2048))
def test_protobuf_reads_back_what_we_write_in_messages_of_any_size(drawn, message_bytes):
    op, its = drawn
    count, messages = iter_requests(op, its, message_bytes, "worker-1")
    parsed = [pb.DataRequest.FromString(m) for m in messages]
    assert len(parsed) == count
    blocks: dict[str, list[int]] = {}
    data: dict[str, bytes] = {}
    for message in parsed:
        assert message.op == op and message.node_id == "worker-1"
        names = [d.table for d in message.dense] + [s.table for s in message.sparse]
        assert len(set(names)) == len(names)  # a table at most once per message
        for d in message.dense:
            blocks.setdefault(d.table, []).extend(d.blocks)
            data[d.table] = data.get(d.table, b"") + d.data
        for s in message.sparse:
            blocks.setdefault(s.table, []).extend(np.frombuffer(s.ids, "<u8").tolist())
            data[s.table] = data.get(s.table, b"") + s.data
    for item in its:
        if isinstance(item, DenseItem):
            assert blocks[item.table] == item.blocks
            expected = b"".join(v.tobytes() for v in item.views)
        else:
            assert blocks[item.table] == item.ids.tolist()
            expected = b"" if item.rows is None else item.rows.tobytes()
        assert data.get(item.table, b"") == expected


@st.composite
def mutated(draw, message: bytes) -> bytes:
    """``message`` with a few random byte flips, cuts, insertions and duplications."""
    buf = bytearray(message)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, len(buf)))
        if kind == "flip" and buf:
            at = min(at, len(buf) - 1)
            buf[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del buf[at:at + draw(st.integers(1, 16))]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=12))
        else:
            buf[at:at] = buf[at:at + draw(st.integers(1, 32))]
    return bytes(buf)


@BOUNDED
@given(st.data(), PB_REQUESTS)
def test_any_mutation_is_read_or_refused_with_value_error(data, request):
    message = data.draw(mutated(request.SerializeToString()))
    try:
        view = decode_request(message)
    except ValueError:
        return
    assert isinstance(view.op, int) and all(isinstance(b, int) for d in view.dense
                                            for b in d.blocks)


# -- the server's handler --------------------------------------------------------------------------

#: What the handler may raise on a bad message: exactly what rpc.abort_on turns into a status.
CLEAN = (ValueError, TypeError, IndexError, TableNotFoundError, TableMismatchError,
         ResourceExhaustedError)


def _shards() -> _Shards:
    shards = _Shards("server-0 at test", apply_threads=1, max_memory=64 * 1024)
    spec = pb.TableSpec(name="d", kind=pb.TableSpec.DENSE, shape=[40], block_size=10,
                        optimizer=optimizer_to_spec(SGD(lr=1.0)))
    shards.create(pb.CreateTableRequest(spec=spec, blocks=[0, 1, 2, 3]))
    spec = pb.TableSpec(name="e", kind=pb.TableSpec.EMBEDDING, dim=2,
                        optimizer=optimizer_to_spec(SGD(lr=1.0)),
                        initializer_json=initializer_to_json(init.zeros()), seed=0)
    shards.create(pb.CreateTableRequest(spec=spec))
    return shards


def _state(shards: _Shards) -> list:
    dense = shards._dense["d"].table
    values = np.empty(40, np.float32)
    dense.read_many(np.arange(4, dtype=np.int64), values, 1)
    ids, rows, slots, steps = shards._sparse["e"].table.export_rows()
    order = np.argsort(ids)
    return [values.tobytes(), [dense.step(b) for b in range(4)], ids[order].tobytes(),
            rows[order].tobytes(), steps[order].tobytes()]


@st.composite
def server_messages(draw) -> bytes:
    """Messages for tables "d" (blocks 0-3 of 10) and "e" (dim 2), sometimes wrong, sometimes
    mutated: unknown tables and blocks, wrong lengths, NaN, repeated blocks and tables."""
    op = draw(OPS)
    its: list = []
    tables = draw(st.lists(st.sampled_from(["d", "e", "zz"]), max_size=3, unique=True))
    if tables and draw(st.integers(0, 7)) == 0:
        tables.append(tables[0])  # a table twice in one message
    for table in tables:
        if table == "d" or (table == "zz" and draw(st.booleans())):
            blocks = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
            lengths = [draw(st.sampled_from([10, 10, 10, 9])) for _ in blocks]
            fill = draw(st.sampled_from([1.0, -2.0, 0.5, np.nan, np.inf]))
            views = [] if op == pb.PULL else [np.full(n, fill, np.float32) for n in lengths]
            its.append(DenseItem(table, blocks, lengths, views))
        else:
            ids = np.array(draw(st.lists(st.integers(0, 50), min_size=1, max_size=8)), np.uint64)
            dim = draw(st.sampled_from([2, 2, 3]))
            rows = None if op == pb.PULL else np.ones((ids.size, dim), np.float32)
            its.append(SparseItem(table, ids, dim, rows))
    message = b"".join(iter_requests(op, its, 1 << 20, "w")[1]) if its else (
        b"\x08" + bytes([op]))
    return draw(mutated(message)) if draw(st.integers(0, 2)) == 0 else message


@BOUNDED
@given(st.lists(server_messages(), min_size=1, max_size=4))
def test_the_handler_answers_or_refuses_cleanly_and_a_refusal_changes_nothing(messages):
    shards = _shards()
    for message in messages:
        before = _state(shards)
        try:
            shards.handle_bytes(message)
        except CLEAN:
            assert _state(shards) == before


def test_opposite_infinities_are_refused_without_a_warning():
    # Found by the fuzz run: inf + -inf in the finiteness check warned (an error under pytest).
    shards = _shards()
    before = _state(shards)
    grad = np.zeros(10, np.float32)
    grad[2], grad[5] = np.inf, -np.inf
    message = next(iter_requests(pb.PUSH, [DenseItem("d", [1], [10], [grad])], 1 << 20, "w")[1])
    try:
        shards.handle_bytes(message)
    except ValueError as exc:
        assert "gradient is not finite (inf at element 2" in str(exc)
    else:
        raise AssertionError("a gradient with infinities was applied")
    assert _state(shards) == before
