"""A parameter server: holds shards of every table in the C++ core and serves pushes and pulls.

Each message is checked whole before any state is touched: unknown tables, a table or a block
listed twice, blocks held elsewhere, payloads of the wrong length, non-finite values and replies
that would not fit in a message are rejected with INVALID_ARGUMENT / NOT_FOUND / OUT_OF_RANGE
and a message naming the table, and the server keeps serving unchanged. Nothing a request asks
for is allocated before it is known to fit: table creations and new embedding rows are checked
against the memory budget (``max_memory``, RESOURCE_EXHAUSTED). Error messages never echo
unbounded request contents.
The tensor bytes of a request are handed to the core without a copy; the core applies updates with
the GIL released, so requests for different blocks proceed in parallel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from paramserver import _core, roles, rpc, shm
from paramserver.checkpoint import CheckpointError
from paramserver.config import (
    MAX_BLOCK_SIZE,
    MAX_DIM,
    MAX_NAME_BYTES,
    MAX_TABLE_ELEMENTS,
    ServerConfig,
)
from paramserver.cut import WriteGate, WritesHeld, gone_clients
from paramserver.dedup import ReplyCache
from paramserver.errors import (
    NodeUnavailableError,
    ResourceExhaustedError,
    TableMismatchError,
    TableNotFoundError,
)
from paramserver.membership import Membership
from paramserver.memory import check_fits
from paramserver.partition import server_of_ids
from paramserver.shm import ShmRegistry, UnknownSegment
from paramserver.snapshot import Snapshot, new_table, restore_dense, restore_embedding
from paramserver.steps import Contribution, StepEngine
from paramserver.sync import Consistency
from paramserver.updates import RoundUpdates
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import (
    RequestView,
    decode_request,
    describe_spec,
    encode_pending,
    first_non_finite,
    floats,
    ids_view,
    optimizer_from_spec,
    reply_parts,
    specs_match,
)

__all__ = ["Server"]

log = logging.getLogger(__name__)

#: Bytes a reply may hold: the message limit, less room for the slices' headers.
_MAX_REPLY_BYTES = rpc.MAX_MESSAGE_BYTES - 1024 * 1024
#: Seconds a read of a BSP job without a step (a plain pull) may wait for a step being applied
#: before answering pending.
_BSP_READ_WAIT = 1.0
#: Bookkeeping bytes per embedding row beyond values and state (id, step count, map slot), for the
#: memory budget's estimate.
_ROW_OVERHEAD = 32


def _preview(values: Any, limit: int = 8) -> str:
    """At most ``limit`` items of a sequence for an error message, and how many there are."""
    items = list(values[:limit])
    more = len(values) - len(items)
    return f"{items}" if not more else f"{items[:-1] + ['...']} ({len(values)} in all)"


def _first_repeated(values: Any) -> Any:
    """The first value of ``values`` seen before in it (the caller knows there is one)."""
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    raise AssertionError("no repeated value")


def _step_tag(request: pb.DataRequest | RequestView) -> pb.StepTag | None:
    if isinstance(request, RequestView):
        return request.step
    return request.step if request.HasField("step") else None


def _name(name: str) -> str:
    """A table name for an error message: quoted, and cut if it is absurdly long."""
    return repr(name) if len(name) <= 80 else repr(name[:80]) + f"... ({len(name)} characters)"


def _check_spec(spec: pb.TableSpec, blocks: tuple[int, ...]) -> int:
    """Validate a CreateTableRequest as the scheduler validates a declaration, with the limits a
    server enforces; return the number of elements of a dense table (0 for an embedding)."""
    name = _name(spec.name)
    if not spec.name or len(spec.name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"a table needs a name of 1 to {MAX_NAME_BYTES} bytes, got {name}")
    if spec.kind == pb.TableSpec.DENSE:
        if not spec.shape or any(d <= 0 for d in spec.shape):
            raise ValueError(f"table {name}: shape must have positive dimensions, got "
                             f"{_preview(tuple(spec.shape))}")
        size = 1
        for d in spec.shape:  # Python ints: numpy's product would wrap around silently
            size *= d
            if size > MAX_TABLE_ELEMENTS:
                raise ValueError(f"table {name}: more than {MAX_TABLE_ELEMENTS} elements")
        if not 0 < spec.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"table {name}: block_size must be in [1, {MAX_BLOCK_SIZE}], got "
                             f"{spec.block_size}")
        if not blocks:  # the core would read an empty list as "every block"
            raise ValueError(f"table {name}: a server is created with the blocks it holds; "
                             f"the request lists none")
        num_blocks = -(-size // spec.block_size)
        if len(set(blocks)) != len(blocks) or not all(0 <= b < num_blocks for b in blocks):
            raise ValueError(f"table {name}: blocks must be distinct ids in [0, {num_blocks}), "
                             f"got {_preview(blocks)}")
        return size
    if spec.kind == pb.TableSpec.EMBEDDING:
        if not 0 < spec.dim <= MAX_DIM:
            raise ValueError(f"table {name}: dim must be in [1, {MAX_DIM}], got {spec.dim}")
        return 0
    raise ValueError(f"table {name}: unknown kind {spec.kind}")


class ReplyLost(Exception):
    """Test-only fault: the server applied a write and then lost its reply (UNAVAILABLE)."""


@dataclass
class _DenseShard:
    spec: pb.TableSpec
    blocks: tuple[int, ...]
    table: _core.DenseTable
    updates: int = 0


@dataclass
class _SparseShard:
    spec: pb.TableSpec
    table: _core.EmbeddingTable
    updates: int = 0


class _Shards:
    """The tables this server holds, and the checks and operations on them.

    ``rank`` and ``num_servers`` are set once the server has registered; an embedding id is served
    only by the server its hash maps to.
    """

    def __init__(self, node: str, apply_threads: int, max_memory: int = 0) -> None:
        self.node = node
        self.rank = 0
        self.num_servers = 1
        self._apply_threads = apply_threads
        self._max_memory = max_memory
        self._dense: dict[str, _DenseShard] = {}
        self._sparse: dict[str, _SparseShard] = {}
        self._lock = threading.Lock()
        self.push_requests = 0
        self.pull_requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.gate = WriteGate(node)
        self._snapshot = Snapshot()
        self.replies = ReplyCache()
        #: Set while a restarted server waits for its tables from a checkpoint: every data
        #: request is refused UNAVAILABLE (clients retry) rather than served from empty tables.
        self.restoring: str | None = None
        #: The scheduler's Restore has completed (it can arrive before the registration's
        #: reply is processed: then the server must not start refusing requests after it).
        self.restored = False
        #: Tables this server held before a restart that no checkpoint had: name -> reason.
        self.lost: dict[str, str] = {}
        #: Asks the scheduler whether it placed a table here as requested (set once registered;
        #: None for a shard set without a scheduler, as in unit tests).
        self.placed: Callable[[pb.TableSpec, tuple[int, ...]], None] | None = None
        #: ``ready(name)``: whether the scheduler lists table ``name`` as ready (set by Server).
        self.ready: Callable[[str], bool] | None = None
        self.seen_ready: set[str] = set()
        #: The steps of a synchronous job (None: asynchronous); set once registered.
        self.steps: StepEngine | None = None
        #: The federated rounds as this server sees them (used only in a federated job).
        self.rounds = RoundUpdates(node, self._dense_snapshot, apply_threads)
        self._rng = np.random.default_rng()  # DP-FedAvg noise: OS entropy, unknown to anyone
        #: Test-only fault hook: lose the reply of every N-th applied write (0: never).
        self.drop_reply_every = 0
        self._writes = 0
        #: Workers' shared-memory segments mapped here (paramserver.shm).
        self.shm = ShmRegistry(node)

    def _dense_snapshot(self) -> dict[str, _DenseShard]:
        with self._lock:
            return dict(self._dense)

    def _held_bytes(self) -> int:
        return sum(s.table.bytes() for s in self._dense.values()) + sum(
            s.table.bytes() for s in self._sparse.values())

    def _check_budget(self, table: str, more: int, what: str) -> None:
        """ResourceExhaustedError if ``more`` bytes would take the server past its budget."""
        if not self._max_memory:
            return
        held = self._held_bytes()
        if held + more > self._max_memory:
            raise ResourceExhaustedError(
                f"table {_name(table)}: {what} needs about {more} bytes; {self.node} holds "
                f"{held} of its {self._max_memory}-byte memory budget (--max-memory)")

    def create(self, request: pb.CreateTableRequest) -> bool:
        spec = request.spec
        blocks = tuple(request.blocks)
        size = _check_spec(spec, blocks)
        optimizer = optimizer_from_spec(spec.optimizer)
        if self.placed is not None:
            self.placed(spec, blocks)  # a table the scheduler did not place here is refused
        with self._lock:
            existing = self._dense.get(spec.name) or self._sparse.get(spec.name)
            if existing is not None:
                same_blocks = getattr(existing, "blocks", ()) == blocks
                if specs_match(existing.spec, spec) and same_blocks:
                    return False
                raise TableMismatchError(
                    f"table {spec.name!r} exists on {self.node} as {describe_spec(existing.spec)}; "
                    f"asked for {describe_spec(spec)}")
            if spec.kind == pb.TableSpec.DENSE:
                last = -(-size // spec.block_size) - 1
                elements = len(blocks) * spec.block_size - (
                    (last + 1) * spec.block_size - size if last in blocks else 0)
                per_element = 4 * (1 + _core.num_slots(optimizer.to_config()))
                self._check_budget(spec.name, elements * per_element,
                                   f"creating {len(blocks)} blocks ({elements} elements)")
                check_fits(spec.name, elements * per_element, self.node,
                           f"{len(blocks)} blocks ({elements} elements, values and optimizer "
                           f"state)")
            try:
                shard = self._new_shard(spec, blocks)
            except MemoryError as exc:  # the core's own check, or the allocator
                raise ResourceExhaustedError(f"table {_name(spec.name)} on {self.node}: {exc}") \
                    from None
            self._install(shard)
            return True

    @staticmethod
    def _new_shard(spec: pb.TableSpec, blocks: tuple[int, ...]) -> _DenseShard | _SparseShard:
        # The core validates sizes and block ids; its errors arrive as ValueError.
        table = new_table(spec, blocks)
        if isinstance(table, _core.DenseTable):
            return _DenseShard(spec, blocks, table)
        return _SparseShard(spec, table)

    def drop(self, name: str) -> bool:
        """Forget table ``name`` (its declaration failed); True if it was here."""
        with self._lock:
            return (self._dense.pop(name, None) or self._sparse.pop(name, None)) is not None

    def _install(self, shard: _DenseShard | _SparseShard) -> None:
        """Publish a shard under its name, replacing any table of that name. Caller holds _lock."""
        name = shard.spec.name
        self._dense.pop(name, None)
        self._sparse.pop(name, None)
        if isinstance(shard, _DenseShard):
            self._dense[name] = shard
        else:
            self._sparse[name] = shard

    # -- checkpoints -------------------------------------------------------------------------------

    def prepare_cut(self, request: pb.PrepareCutRequest) -> pb.PrepareCutReply:
        """Phase 0 of a cut (``buffers_only``): size the snapshot buffers while writes flow.
        Phase 1: close the gate and report the multi-server operations admitted."""
        if request.buffers_only:
            with self._lock:
                dense, sparse = dict(self._dense), dict(self._sparse)
            self._snapshot.prepare(dense, sparse)
            return pb.PrepareCutReply()
        return pb.PrepareCutReply(ops=self.gate.prepare(request.cut, request.lease))

    def snapshot_cut(self, request: pb.SnapshotCutRequest) -> pb.SnapshotCutReply:
        """Phase 2: wait for the cut's operations, copy the tables, reopen the gate."""
        self.gate.drain(request.cut, list(request.ops), request.timeout)
        try:
            with self._lock:
                dense, sparse = dict(self._dense), dict(self._sparse)
            copied, steps = self._snapshot.take(request.cut, list(request.tables), dense, sparse,
                                                self._apply_threads)
            stats = self.stats()  # the update counters at the cut (for rollback counts)
        finally:
            held = self.gate.reopen(request.cut)
        return pb.SnapshotCutReply(bytes=copied, hold_seconds=held, updates=steps, stats=stats)

    def persist_cut(self, request: pb.PersistCutRequest) -> pb.PersistCutReply:
        """Phase 3: write the snapshot's shard files into ``request.dir`` (fsynced). Cut 0: write
        ``request.tables`` as they are now, without a cut (a table's initial values, saved
        before it is ready: nothing writes it yet), through a snapshot of their own."""
        try:
            if request.cut == 0:
                with self._lock:
                    dense, sparse = dict(self._dense), dict(self._sparse)
                own = Snapshot()
                own.take(0, list(request.tables), dense, sparse, self._apply_threads)
                files = own.persist(0, request.dir, self.rank)
            else:
                files = self._snapshot.persist(request.cut, request.dir, self.rank)
        except OSError as exc:
            detail = exc.strerror or str(exc)
            if exc.filename:
                detail += f" ({exc.filename})"
            raise CheckpointError(f"{self.node} could not write its shards: {detail}") from None
        return pb.PersistCutReply(files=files)

    def restore(self, request: pb.RestoreRequest) -> pb.RestoreReply:
        """Create the listed tables with this server's part of their placement and load their
        state from the checkpoint's shard files (any server's), each file checked against its
        manifest entry; ``fresh`` tables are recreated from their initializers instead (a dense
        one from its saved initial values if ``files`` has some). Each table appears only once
        it is fully loaded, replacing a table of the same name."""
        files: dict[str, list[pb.ShardFile]] = {}
        for entry in request.files:
            files.setdefault(entry.table, []).append(entry)
        counters = {t.name: t.updates for t in request.at_cut.tables}
        rank, num_servers = request.rank, request.num_servers or self.num_servers
        fresh = set(request.fresh)
        total = 0
        for placement in request.tables:
            spec = placement.spec
            entries = files.get(spec.name, [])
            paths = [Path(request.dir) / e.file for e in entries]
            if spec.kind == pb.TableSpec.DENSE:
                blocks = tuple(b for b, s in enumerate(placement.block_servers) if s == rank)
                if not blocks:
                    continue
                shard = self._new_shard(spec, blocks)
                if spec.name not in fresh or entries:  # fresh without files: zeros
                    assert isinstance(shard.table, _core.DenseTable)
                    total += restore_dense(shard.table, spec.name, paths, entries)
            else:
                shard = self._new_shard(spec, ())
                if spec.name not in fresh:  # fresh: rows come from the initializer
                    assert isinstance(shard.table, _core.EmbeddingTable)
                    total += restore_embedding(shard.table, spec.name, paths, rank, num_servers,
                                               entries, request.written_by)
            shard.updates = 0 if spec.name in fresh else counters.get(spec.name, 0)
            with self._lock:
                self._install(shard)
        with self._lock:
            for name in request.lost:
                self.lost[name] = ("it was on this server before a restart, no checkpoint has "
                                   "it, and the initial values it was given were not saved (the "
                                   "job has no --checkpoint-dir)")
            self.restoring = None
            self.restored = True
        if request.tables:
            log.warning("server-%d restored its part of %d tables (%d bytes) from checkpoint %d "
                        "(%s)", rank, len(request.tables), total, request.version, request.dir)
        return pb.RestoreReply(bytes=total)

    def begin_restore(self) -> None:
        """Refuse data requests until the scheduler's Restore completes (unless it already
        has: the scheduler starts it as soon as this server registers)."""
        with self._lock:
            if not self.restored:
                self.restoring = "restoring its tables after a restart"

    def _shard(self, name: str, sparse: bool) -> Any:
        tables, other = (self._sparse, self._dense) if sparse else (self._dense, self._sparse)
        shard = tables.get(name)
        if shard is None and name in self.lost:
            raise TableNotFoundError(f"table {name!r} was lost on {self.node}: {self.lost[name]}")
        if shard is None:
            kind, other_kind = ("embedding", "dense") if sparse else ("dense", "embedding")
            note = f" (it is {'an' if other_kind[0] == 'e' else 'a'} {other_kind} table)" \
                if name in other else ""
            raise TableNotFoundError(f"no {kind} table {name!r} on {self.node}{note}")
        return shard

    def _check_dense(self, op: int, piece: pb.DenseSlice) -> tuple:
        shard: _DenseShard = self._shard(piece.table, sparse=False)
        if len(set(piece.blocks)) != len(piece.blocks):
            # A repeated block would be stepped twice by a push and read twice by a pull: a 5 KB
            # pull of one block listed 5,000 times once made a server allocate gigabytes.
            repeated = _first_repeated(piece.blocks)
            raise ValueError(f"table {_name(piece.table)}: block {repeated} is listed more than "
                             f"once in one message")
        blocks = np.array(piece.blocks, dtype=np.int64)
        length = 0
        for b in piece.blocks:
            if not shard.table.holds(b):
                raise IndexError(f"table {_name(piece.table)}: block {b} is not held by "
                                 f"{self.node} (it holds {len(shard.blocks)} of "
                                 f"{shard.table.num_blocks})")
            length += shard.table.block_length(b)
        data = self._check_data(op, piece.table, piece.data, length,
                                f"blocks {_preview(piece.blocks)} hold")
        return shard, blocks, data, length

    def _check_sparse(self, op: int, piece: pb.SparseSlice) -> tuple:
        shard: _SparseShard = self._shard(piece.table, sparse=True)
        if op == pb.ASSIGN:
            raise ValueError(f"table {_name(piece.table)}: embedding rows cannot be assigned")
        ids = ids_view(piece.ids)
        if self.num_servers > 1:
            wrong = np.flatnonzero(server_of_ids(ids, self.num_servers) != self.rank)
            if wrong.size:
                raise ValueError(f"table {_name(piece.table)}: id {int(ids[wrong[0]])} belongs to "
                                 f"server-{int(server_of_ids(ids[wrong[:1]], self.num_servers)[0])}"
                                 f", not {self.node}")
        dim = shard.spec.dim
        data = self._check_data(op, piece.table, piece.data, ids.size * dim,
                                f"{ids.size} rows of dim {dim} hold")
        return shard, ids, None if data is None else data.reshape(ids.size, dim)

    @staticmethod
    def _check_data(op: int, table: str, payload: bytes, length: int,
                    what: str) -> np.ndarray | None:
        if op in (pb.PULL, pb.LOOKUP):
            if payload:
                raise ValueError(f"table {_name(table)}: a pull carries no data")
            return None
        if op in (pb.PUSH, pb.PUSH_PULL) and not payload and length:
            return None  # a read-only slice: read after the message's writes
        data = floats(payload)
        if data.size != length:
            raise ValueError(f"table {_name(table)}: {what} {length} elements, the request "
                             f"carries {data.size}")
        bad = first_non_finite(data)
        if bad >= 0:
            kind = "values to assign are" if op == pb.ASSIGN else "gradient is"
            raise ValueError(f"table {_name(table)}: {kind} not finite ({data[bad]} at element "
                             f"{bad} of the slice)")
        return data

    def handle_bytes(self, message: bytes | memoryview, into: memoryview | None = None
                     ) -> bytes | int:
        """Serve one serialized DataRequest; return the serialized DataReply.

        Payloads are viewed in the received bytes and the reply is encoded with one copy of the
        values (see paramserver.wire), instead of protobuf's three or four copies. A write
        message seen before (same client, operation and part) gets its first reply and is not
        applied again (paramserver.dedup).

        With ``into`` (a shared-memory segment's reply room) the reply's values are written
        there when they fit, and the number of bytes written is returned instead of the bytes.
        """
        if self.restoring is not None:
            raise NodeUnavailableError(f"{self.node} is {self.restoring}")
        request = decode_request(message)
        if request.op in roles.WRITE_OPS and roles.caller() is not None:
            roles.check_data_op(request.op, lambda: self._any_ready(request))
        elif request.op == pb.PULL and roles.caller() == roles.READER:
            request.op = pb.LOOKUP  # a reader's read never creates embedding rows (memory)
        tag = request.op_tag
        if request.op not in (pb.PUSH, pb.PUSH_PULL, pb.ASSIGN) or tag is None or not tag.client:
            return self.handle(request, into)
        key = (tag.client, tag.seq, request.part)
        cached = self.replies.begin(key, tag.done_below)
        if cached is not None:
            return cached
        try:
            reply = self.handle(request, into)
        except BaseException:
            self.replies.fail(key)
            raise
        self.replies.finish(key, bytes(into[:reply]) if isinstance(reply, int) and into is not None
                            else reply)
        if self.drop_reply_every:
            with self._lock:
                self._writes += 1
                drop = self._writes % self.drop_reply_every == 0
            if drop:
                raise ReplyLost(f"{self.node}: reply of operation {tag.seq} part {request.part} "
                                f"dropped after applying it (fault injection)")
        return reply

    def _any_ready(self, request: pb.DataRequest | RequestView) -> bool:
        """Whether a table the request writes is initialized (ready at the scheduler): a
        participant may ASSIGN only to tables still being initialized. A table seen ready stays
        so (remembered); one not yet ready is asked again at each such ASSIGN."""
        names = {s.table for s in request.dense} | {s.table for s in request.sparse}
        for name in names - self.seen_ready:
            if self.ready is None or self.ready(name):
                self.seen_ready.add(name)
        return bool(names & self.seen_ready)

    def handle(self, request: pb.DataRequest | RequestView, into: memoryview | None = None
               ) -> bytes | int:
        """Validate every slice of a request, then apply it. Returns the serialized reply: the
        values read (none for a plain write), or, in a synchronous job whose step the request
        waits for is not reached in time, a *pending* reply saying what the step waits for."""
        op = request.op
        if op not in (pb.PUSH, pb.PULL, pb.PUSH_PULL, pb.ASSIGN, pb.LOOKUP):
            raise ValueError(f"unknown op {op}")
        step = _step_tag(request)
        if step is not None and self.steps is None:
            raise ValueError(f"{self.node} serves an asynchronous job; the request carries a "
                             f"step (is the worker connected to another job?)")
        if op in (pb.PULL, pb.LOOKUP):
            return self._serve(request, step, into=into)
        # A write: admitted by the gate (or refused while a checkpoint's cut holds writes).
        tag = request.op_tag if isinstance(request, RequestView) or request.HasField("op_tag") \
            else None
        handle = self.gate.enter(tag)
        try:
            return self._serve(request, step, tag, into)
        finally:
            self.gate.leave(handle)

    def _serve(self, request: pb.DataRequest | RequestView, step: pb.StepTag | None,
               tag: pb.OpTag | None = None, into: memoryview | None = None) -> bytes | int:
        # ``into`` (a reply room in the request's shared-memory segment) also means the
        # request's bytes are borrowed: the worker reuses them once the call returns.
        op = request.op
        dense, sparse = self._validate(request)
        # Everything is valid: from here on nothing raises on the request's content.
        steps = self.steps
        writes = op in (pb.PUSH, pb.PUSH_PULL)
        if steps is not None and writes and (step is None or not step.step):
            raise ValueError(f"{self.node} serves a synchronous job ({steps.consistency}): a push "
                             f"must carry its step (an older client?)")
        if steps is None:
            self._write(op, dense, sparse)
        elif writes:
            self._contribute(steps, step, request.part, tag, dense, sparse,
                             borrowed=into is not None)
        elif op == pb.ASSIGN:
            self._write(op, dense, sparse)
        read_only = self._reads(op, dense, sparse)
        reads = bool(read_only[0] or read_only[1]) or op in (pb.PULL, pb.PUSH_PULL, pb.LOOKUP)
        waits = steps is not None and (reads or (step is not None and step.read_step))
        if not waits:
            reply, sent = self._read(op, dense, sparse, into) if reads else (b"", 0)
            self._count(request, op, dense, sparse, sent)
            return reply
        assert steps is not None
        worker = step.worker if step is not None else -1
        read_step = step.read_step if step is not None else 0
        wait = step.wait if step is not None else _BSP_READ_WAIT
        with steps.read(worker, read_step, wait) as pending:
            # Read inside: a BSP step is not applied meanwhile.
            reply, sent = self._read(op, dense, sparse, into) if reads and not pending \
                else (b"", 0)
        self._count(request, op, dense, sparse, sent)
        return encode_pending(pending) if pending else reply

    def _contribute(self, steps: StepEngine, step: pb.StepTag, part: int,
                    tag: pb.OpTag | None, dense: list, sparse: list,
                    borrowed: bool = False) -> None:
        """A worker's share of a step (synchronous jobs): summed into the step (BSP) or applied
        now and counted on the worker's clock (SSP). ``borrowed``: the request's bytes are the
        worker's to reuse once this call returns (a shared-memory segment)."""
        parts = self.gate.parts_here(tag) if tag is not None else 1
        # A BSP step keeps the views of a contribution that spans several messages until the
        # last one is here, past this call: copies, when the bytes are only borrowed.
        keep = (lambda a: a.copy()) if borrowed and parts > 1 else (lambda a: a)
        share = Contribution([(shard, blocks, keep(data)) for shard, blocks, data, _ in dense
                              if data is not None],
                             [(shard, keep(ids), keep(rows)) for shard, ids, rows in sparse
                              if rows is not None])
        if steps.consistency.mode == "bsp":
            whole = steps.contribute(step.worker, step.step, part, parts, share)
            if whole is not None:
                steps.add(step.worker, step.step, whole, lambda apply: apply())
            return
        steps.contribute(step.worker, step.step, part, parts, Contribution())
        try:
            self._write(pb.PUSH, dense, sparse)
        finally:
            steps.applied(step.worker, step.step)

    def _validate(self, request: pb.DataRequest | RequestView) -> tuple[list, list]:
        """Check every slice; the dense ``(shard, blocks, data, length)`` and embedding
        ``(shard, ids, rows)`` of the message. In a push, a slice without data is read-only:
        read after the writes (a table may have one write and one read-only slice)."""
        op = request.op
        dense = [self._check_dense(op, piece) for piece in request.dense]
        sparse = [self._check_sparse(op, piece) for piece in request.sparse]
        for pieces, checked in ((request.dense, dense), (request.sparse, sparse)):
            keys = [(p.table, c[2] is None) for p, c in zip(pieces, checked)]
            if len(set(keys)) != len(keys):
                repeated = _first_repeated(keys)[0]
                raise ValueError(f"table {_name(repeated)} appears more than once in one message")
        reads = self._reads(op, dense, sparse)
        if reads[0] or reads[1]:
            # The reply must fit in a message: check before building it or creating rows.
            reply = sum(4 * length + 64 for _, _, _, length in reads[0]) + sum(
                ids.size * (8 + 4 * shard.spec.dim) + 64 for shard, ids, _ in reads[1])
            if reply > _MAX_REPLY_BYTES:
                tables = [p.table for p in request.dense] + [p.table for p in request.sparse]
                raise ResourceExhaustedError(
                    f"the reply to this message would be {reply} bytes, over the "
                    f"{_MAX_REPLY_BYTES}-byte limit (tables {_preview(tables)}); send fewer "
                    f"blocks or ids per message")
        if self._max_memory and op != pb.LOOKUP:  # a lookup creates no rows
            for shard, ids, _ in sparse:
                self._check_new_rows(shard, ids)
        return dense, sparse

    def _write(self, op: int, dense: list, sparse: list) -> None:
        for shard, blocks, data, _ in dense:
            if op == pb.ASSIGN:
                shard.table.assign_many(blocks, data)
            elif data is not None:
                shard.table.apply_many(blocks, data, self._apply_threads)
        for shard, ids, rows in sparse:
            if rows is not None:
                shard.table.push(ids, rows, self._apply_threads)

    @staticmethod
    def _reads(op: int, dense: list, sparse: list) -> tuple[list, list]:
        """The slices a message reads: all of a pull or push_pull, the read-only ones of a
        push."""
        if op in (pb.PULL, pb.PUSH_PULL, pb.LOOKUP):
            return dense, sparse
        if op == pb.PUSH:
            return [d for d in dense if d[2] is None], [s for s in sparse if s[2] is None]
        return [], []

    def _read(self, op: int, dense: list, sparse: list, into: memoryview | None = None
              ) -> tuple[bytes | int, int]:
        """The serialized reply with the values the message reads, and its payload bytes. The
        core reads dense blocks straight into the reply (one copy of the values): a new bytes
        object, or ``into`` when given and large enough (then its length is returned)."""
        dense, sparse = self._reads(op, dense, sparse)
        rows = []
        for shard, ids, _ in sparse:
            read = shard.table.lookup if op == pb.LOOKUP else shard.table.pull
            rows.append((shard.spec.name, ids, read(ids, None, self._apply_threads)))
        parts = reply_parts([(shard.spec.name, blocks.tolist(), 4 * length, (shard.table, blocks))
                             for shard, blocks, _, length in dense], rows)
        sent = sum(4 * length for _, _, _, length in dense) + sum(
            ids.nbytes + values.nbytes for _, ids, values in rows)
        return _core.assemble(parts, self._apply_threads, into), sent

    def _count(self, request: pb.DataRequest | RequestView, op: int, dense: list, sparse: list,
               sent: int) -> None:
        with self._lock:
            self.bytes_in += sum(len(p.data) for p in request.dense) + sum(
                len(p.ids) + len(p.data) for p in request.sparse)
            self.bytes_out += sent
            if op in (pb.PUSH, pb.PUSH_PULL):
                self.push_requests += 1
                if self.steps is None or self.steps.consistency.mode != "bsp":
                    for shard, blocks, data, _ in dense:  # BSP counts when it applies a step
                        shard.updates += len(blocks) if data is not None else 0
                    for shard, ids, rows in sparse:
                        shard.updates += ids.size if rows is not None else 0
            if op in (pb.PULL, pb.PUSH_PULL, pb.LOOKUP):
                self.pull_requests += 1

    def _check_new_rows(self, shard: _SparseShard, ids: np.ndarray) -> None:
        """ResourceExhaustedError if the rows ``ids`` would create pass the memory budget.

        Cheap when far from the budget (every id counted as new); near it, the new ids are
        counted exactly. Concurrent requests are checked independently, so the budget can be
        overrun by at most what the requests in flight create together.
        """
        row = 4 * shard.spec.dim * (1 + shard.table.num_slots) + _ROW_OVERHEAD
        if self._held_bytes() + ids.size * row <= self._max_memory:
            return
        new = sum(1 for i in np.unique(ids).tolist() if not shard.table.contains(i))
        self._check_budget(shard.spec.name, new * row, f"creating {new} embedding rows")

    def stats(self) -> pb.ServerStats:
        with self._lock:
            out = pb.ServerStats(push_requests=self.push_requests, pull_requests=self.pull_requests,
                                 bytes_in=self.bytes_in, bytes_out=self.bytes_out)
            for name, shard in sorted(self._dense.items()):
                out.tables.append(pb.TableStats(name=name, blocks=len(shard.blocks),
                                                bytes=shard.table.bytes(), updates=shard.updates))
            for name, shard in sorted(self._sparse.items()):
                out.tables.append(pb.TableStats(name=name, rows=shard.table.num_rows(),
                                                bytes=shard.table.bytes(), updates=shard.updates))
        if self.steps is not None:
            out.sync.CopyFrom(self.steps.stats())
        out.shm_clients, out.shm_bytes = self.shm.stats()
        return out

    def federated_submit(self, request: pb.FederatedUpdate) -> pb.FederatedUpdateReply:
        """One message of a participant's update for the open round (paramserver.updates):
        validated whole (dense tables held here, whole blocks, finite values) before anything is
        recorded."""
        if self.restoring is not None:
            raise NodeUnavailableError(f"{self.node} is {self.restoring}")
        dense = [self._check_dense(pb.PUSH, piece) for piece in request.dense]
        names = [piece.table for piece in request.dense]
        if len(set(names)) != len(names):
            raise ValueError(f"table {_name(_first_repeated(names))} appears more than once in "
                             f"one message")
        for (shard, _, data, length), piece in zip(dense, request.dense):
            if data is None and length:
                raise ValueError(f"table {_name(piece.table)}: a federated update carries the "
                                 f"blocks' values or delta; this slice has none")
        with self._lock:
            self.bytes_in += sum(len(p.data) for p in request.dense)
        self.rounds.submit(request, dense)
        return pb.FederatedUpdateReply()

    def federated_round(self, request: pb.RoundControlRequest) -> pb.RoundControlReply:
        """The scheduler's control of a federated round; a commit applies each dense table's
        optimizer once, as a write admitted by the gate (retried while a checkpoint's cut holds
        writes)."""
        return self.rounds.control(request, self._as_write, self._rng)

    def _as_write(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` as a write admitted by the checkpoint gate (waiting while a cut holds
        writes)."""
        while True:
            try:
                handle = self.gate.enter(None)
                break
            except WritesHeld:
                time.sleep(0.005)
        try:
            fn()
        finally:
            self.gate.leave(handle)

    def change_members(self, request: pb.SyncMembersRequest) -> pb.SyncMembersReply:
        """The scheduler's change to the step group; a step it completes is applied here, as a
        write admitted by the gate (retried while a checkpoint's cut holds writes)."""
        if self.steps is None:
            raise ValueError(f"{self.node} serves an asynchronous job: it has no step group")
        return pb.SyncMembersReply(step=self.steps.change(request, self._as_write))


class _ParameterServerService(pb_grpc.ParameterServerServicer):
    def __init__(self, shards: _Shards, scheduler: str = "") -> None:
        self._shards = shards
        self._scheduler = scheduler

    def _data(self, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return rpc.abort_on(context, fn)
        except WritesHeld as exc:  # the client retries it once the checkpoint's cut is taken
            context.abort(grpc.StatusCode.ABORTED, str(exc))
        except ReplyLost as exc:  # test-only fault: the client retries, the repeat is cached
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def CreateTable(self, request: pb.CreateTableRequest, context: grpc.ServicerContext) -> pb.CreateTableReply:
        return pb.CreateTableReply(created=rpc.abort_on(context, lambda: self._shards.create(request)))

    # Exchange is registered on raw bytes (see _add_service): the request is decoded inside
    # abort_on, so a malformed message is INVALID_ARGUMENT naming the problem.
    def Exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._data(context, lambda: self._shards.handle_bytes(request))

    # The shared-memory data path (paramserver.shm): the same messages, in a worker's segment.
    def ShmAttach(self, request: pb.ShmAttachRequest, context: grpc.ServicerContext) -> pb.ShmAttachReply:
        return self._shards.shm.attach(request)

    def ShmExchange(self, request: pb.ShmExchangeRequest, context: grpc.ServicerContext) -> pb.ShmExchangeReply:
        shards = self._shards
        try:
            message, room = shards.shm.segment(request)
        except UnknownSegment as exc:
            context.set_trailing_metadata(shm.unknown_metadata())
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply = self._data(context, lambda: shards.handle_bytes(message, room))
        if isinstance(reply, int):
            return pb.ShmExchangeReply(reply_size=reply)
        if len(reply) <= len(room):
            room[:len(reply)] = reply
            return pb.ShmExchangeReply(reply_size=len(reply))
        return pb.ShmExchangeReply(reply_size=-1, inline=reply)

    def ShmDetach(self, request: pb.ShmDetachRequest, context: grpc.ServicerContext) -> pb.ShmDetachReply:
        self._shards.shm.detach(request.client, list(request.segments))
        return pb.ShmDetachReply()

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.ServerStats:
        reply = self._shards.stats()
        reply.node, reply.scheduler = self._shards.node, self._scheduler
        return reply

    def PrepareCut(self, request: pb.PrepareCutRequest, context: grpc.ServicerContext) -> pb.PrepareCutReply:
        return rpc.abort_on(context, lambda: self._shards.prepare_cut(request))

    def SnapshotCut(self, request: pb.SnapshotCutRequest, context: grpc.ServicerContext) -> pb.SnapshotCutReply:
        return rpc.abort_on(context, lambda: self._shards.snapshot_cut(request))

    def PersistCut(self, request: pb.PersistCutRequest, context: grpc.ServicerContext) -> pb.PersistCutReply:
        return rpc.abort_on(context, lambda: self._shards.persist_cut(request))

    def AbortCut(self, request: pb.AbortCutRequest, context: grpc.ServicerContext) -> pb.AbortCutReply:
        self._shards.gate.reopen(request.cut)
        return pb.AbortCutReply()

    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> pb.RestoreReply:
        return rpc.abort_on(context, lambda: self._shards.restore(request))

    def DropTable(self, request: pb.DropTableRequest, context: grpc.ServicerContext) -> pb.DropTableReply:
        return pb.DropTableReply(dropped=self._shards.drop(request.name))

    def SyncMembers(self, request: pb.SyncMembersRequest, context: grpc.ServicerContext) -> pb.SyncMembersReply:
        return rpc.abort_on(context, lambda: self._shards.change_members(request))

    def FederatedSubmit(self, request: pb.FederatedUpdate, context: grpc.ServicerContext) -> pb.FederatedUpdateReply:
        return rpc.abort_on(context, lambda: self._shards.federated_submit(request))

    def FederatedRound(self, request: pb.RoundControlRequest, context: grpc.ServicerContext) -> pb.RoundControlReply:
        return rpc.abort_on(context, lambda: self._shards.federated_round(request))


def _add_service(service: _ParameterServerService, server: grpc.Server) -> None:
    """Register the ParameterServer service: the generated handlers for the control methods, and
    Exchange without (de)serializers, on the wire bytes, which paramserver.wire encodes and
    decodes without protobuf's copies of the payload."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name), request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString)
        for name, request, reply in [
            ("CreateTable", pb.CreateTableRequest, pb.CreateTableReply),
            ("Stats", pb.StatsRequest, pb.ServerStats),
            ("PrepareCut", pb.PrepareCutRequest, pb.PrepareCutReply),
            ("SnapshotCut", pb.SnapshotCutRequest, pb.SnapshotCutReply),
            ("PersistCut", pb.PersistCutRequest, pb.PersistCutReply),
            ("AbortCut", pb.AbortCutRequest, pb.AbortCutReply),
            ("Restore", pb.RestoreRequest, pb.RestoreReply),
            ("DropTable", pb.DropTableRequest, pb.DropTableReply),
            ("SyncMembers", pb.SyncMembersRequest, pb.SyncMembersReply),
            ("ShmAttach", pb.ShmAttachRequest, pb.ShmAttachReply),
            ("ShmExchange", pb.ShmExchangeRequest, pb.ShmExchangeReply),
            ("ShmDetach", pb.ShmDetachRequest, pb.ShmDetachReply),
            ("FederatedSubmit", pb.FederatedUpdate, pb.FederatedUpdateReply),
            ("FederatedRound", pb.RoundControlRequest, pb.RoundControlReply),
        ]
    }
    handlers["Exchange"] = grpc.unary_unary_rpc_method_handler(service.Exchange)
    name = "paramserver.v1.ParameterServer"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)  # as the generated code does


class Server:
    """A parameter-server node.

    ``start()`` binds, serves, registers with the scheduler (retrying until ``config.timeout``) and
    starts heartbeats carrying this server's statistics; then ``rank`` and ``address`` are set.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._server = rpc.make_server(config.threads, config.security)
        self._port = rpc.bind(self._server, config.host, config.port, config.security)
        self.address = config.advertise or f"{config.host}:{self._port}"
        self._shards = _Shards(f"server at {self.address}", config.apply_threads,
                               config.max_memory)
        self._shards.shm.willing = config.transport != "grpc"
        self._janitor_stop = threading.Event()
        _add_service(_ParameterServerService(self._shards, config.scheduler), self._server)
        self._health = rpc.serve_health(self._server)
        self._membership: Membership | None = None
        self.rank = -1

    def start(self) -> Server:
        """Serve, register with the scheduler and start heartbeats. Raises NodeUnavailableError
        if the scheduler cannot be reached within ``config.timeout`` seconds."""
        shm.sweep()  # segments a killed process left between creating and unlinking them
        self._server.start()
        shm.janitor(self._shards.shm, self._janitor_stop)
        self._shards.drop_reply_every = self.config.fault_drop_reply_every
        if self.config.rank >= 0:  # known before registering: no window with the default rank
            self._shards.rank = self._shards.gate.rank = self.config.rank
        try:
            self._membership = Membership(
                self.config.scheduler, pb.SERVER, address=self.address,
                requested_rank=self.config.rank, timeout=self.config.timeout,
                stats=self._shards.stats, replace=self.config.replace,
                on_superseded=self._superseded, security=self.config.security)
        except Exception:
            self._server.stop(0)
            raise
        self._shards.placed = self._check_placed
        self._shards.gate.ask_gone = self._gone_clients
        self._shards.ready = self._table_ready
        if self._membership.reply.restoring:
            self._shards.begin_restore()
        self.rank = self._membership.rank
        self._shards.node = f"server-{self.rank} at {self.address}"
        self._shards.shm.node = self._shards.node
        self._shards.rounds.node = self._shards.node
        self._shards.gate.node = self._shards.node
        self._shards.gate.rank = self.rank
        self._shards.rank = self.rank
        self._shards.num_servers = self._membership.reply.num_servers
        reply = self._membership.reply
        consistency = Consistency.parse(reply.sync)
        if consistency.synchronous:
            engine = StepEngine(consistency, self._shards.node, max(1, self.config.threads // 2),
                                self.config.apply_threads)
            engine.set_members(list(reply.sync_members), restarted=reply.restoring)
            self._shards.steps = engine
        self._health.set("", rpc.health_pb2.HealthCheckResponse.SERVING)
        log.info("server-%d serving on %s (protection: %s)", self.rank, self.address,
                 self.config.security.protection)
        return self

    def stats(self) -> pb.ServerStats:
        """Request counts, bytes and per-table sizes of this server."""
        return self._shards.stats()

    def _check_placed(self, spec: pb.TableSpec, blocks: tuple[int, ...]) -> None:
        """Refuse a CreateTable for a table the scheduler does not know, or knows otherwise (its
        spec, or the blocks it placed on this server)."""
        assert self._membership is not None
        reply = self._membership.call("ListTables", pb.ListTablesRequest(
            name=spec.name, include_pending=True), what=f"check table {spec.name!r}")
        if not reply.tables:
            raise TableNotFoundError(f"table {spec.name!r} is unknown to the scheduler: declare "
                                     f"it with client.dense / client.embedding first")
        placement = reply.tables[0]
        if not specs_match(placement.spec, spec):
            raise TableMismatchError(f"table {spec.name!r} is placed as "
                                     f"{describe_spec(placement.spec)}; CreateTable asked for "
                                     f"{describe_spec(spec)}")
        if spec.kind == pb.TableSpec.DENSE:
            mine = tuple(b for b, s in enumerate(placement.block_servers) if s == self.rank)
            if tuple(sorted(blocks)) != mine:
                raise ValueError(f"table {spec.name!r}: the scheduler placed blocks "
                                 f"{list(mine)[:10]} here, CreateTable listed "
                                 f"{list(blocks)[:10]}")

    def _gone_clients(self, clients: set[str]) -> set[str]:
        """Which of ``clients`` the scheduler says are gone (a checkpoint's drain stops waiting
        for their missing messages; see paramserver.cut)."""
        assert self._membership is not None
        return gone_clients(self._membership.cluster(timeout=2.0), clients)
    def _table_ready(self, name: str) -> bool:
        """Whether the scheduler lists table ``name`` as ready (initialized)."""
        assert self._membership is not None
        return bool(self._membership.call("ListTables", pb.ListTablesRequest(name=name),
                                          what=f"check table {name!r}").tables)

    def _superseded(self) -> None:
        # A newer incarnation holds this rank: stop serving (from another thread: this is called
        # on the heartbeat thread, which stop() joins).
        threading.Thread(target=self.stop, kwargs={"grace": 0.5}, daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` seconds pass); True if it stopped."""
        # grpc returns True when the wait timed out.
        return not self._server.wait_for_termination(timeout)

    def stop(self, grace: float = 1.0) -> None:
        """Leave the job (deregister), then stop serving after ``grace`` seconds for calls in flight."""
        if self._membership is not None:
            self._membership.close()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._janitor_stop.set()
        self._shards.shm.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

