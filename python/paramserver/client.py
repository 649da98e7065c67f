"""The worker's client: declare tables, push gradients, pull weights.

A :class:`Client` registers with the scheduler as a worker, waits for every server, and then talks
to the servers directly: a call that touches several tables sends one request per server, to all
servers at once, carrying whole blocks and rows; a request larger than ``message_bytes`` is cut
into messages of about that size, sent as parallel calls. Each push is one optimizer step per block, applied when it arrives
(asynchronous SGD).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Union

import numpy as np

from paramserver import shm
from paramserver.config import (
    MAX_BLOCK_SIZE,
    MAX_DIM,
    MAX_NAME_BYTES,
    MAX_TABLE_ELEMENTS,
    ClientConfig,
    load_security,
)
from paramserver.errors import (
    CheckpointError,
    InvalidRequestError,
    ParamServerError,
    PSTimeoutError,
    TableMismatchError,
    TableNotFoundError,
)
from paramserver.membership import Membership
from paramserver.optim import Optimizer
from paramserver.partition import BlockLayout
from paramserver.plan import DensePlan, DenseRef, EmbeddingRef, SparsePlan
from paramserver.pool import ServerPool
from paramserver.sync import Consistency
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import (
    FLOAT,
    DenseItem,
    SparseItem,
    decode_reply,
    initializer_to_json,
    iter_messages,
    optimizer_from_spec,
    optimizer_to_spec,
    plan_requests,
    reply_pending,
    spec_to_dict,
)

__all__ = ["Client", "DenseTable", "EmbeddingTable", "connect"]

log = logging.getLogger(__name__)

#: Ops that write, and so carry an OpTag (checkpoint cuts, exactly-once retries).
_WRITES = (pb.PUSH, pb.PUSH_PULL, pb.ASSIGN)
#: Seconds a server may hold a call that waits for a step before answering pending (the client
#: then asks again): long enough that a step usually completes within one call, short enough that
#: no server thread is pinned for long.
_STEP_WAIT = 2.0


class _OpSequence:
    """Numbers a client's write operations and knows the lowest one still in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self._open: set[int] = set()

    def begin(self) -> tuple[int, int]:
        """A new operation: (its number, the number below which every operation is finished)."""
        with self._lock:
            seq = self._next
            self._next += 1
            self._open.add(seq)
            return seq, min(self._open)

    def end(self, seq: int) -> None:
        with self._lock:
            self._open.discard(seq)


#: What ``init=`` accepts: None (zeros), an array of the table's shape, or a callable of the shape.
Init = Union[None, np.ndarray, Callable[[tuple[int, ...]], Any]]


class _Handle:
    """What the table handles share: the client they forward to and the table's reference."""

    def __init__(self, client: Client, ref: Any) -> None:
        self._client = client
        self._ref = ref

    @property
    def name(self) -> str:
        """The table's name."""
        return self._ref.name

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer the servers apply to this table."""
        return self._ref.optimizer


class DenseTable(_Handle):
    """A handle on one dense table, returned by :meth:`Client.dense`.

    Thread safe (it only forwards to its client). Every method blocks until the servers answered
    or ``timeout`` passed, except the ``*_async`` ones, which return futures.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return self._ref.shape

    @property
    def num_blocks(self) -> int:
        """Blocks the tensor is cut into."""
        return len(self._ref.layout.block_servers)

    def pull(self) -> np.ndarray:
        """The current values, a new float32 array of :attr:`shape`."""
        return self._client.pull([self.name])[self.name]

    def push(self, grad: np.ndarray) -> None:
        """Apply one optimizer step with ``grad`` (float32, :attr:`shape`)."""
        self._client.push({self.name: grad})

    def push_pull(self, grad: np.ndarray) -> np.ndarray:
        """Push ``grad``, then return the values after that update, in one round trip."""
        return self._client.push_pull({self.name: grad})[self.name]

    def assign(self, values: np.ndarray) -> None:
        """Overwrite the values (float32, :attr:`shape`); the optimizer state is kept. Not an
        optimizer step (a synchronous job does not count it as one)."""
        self._client.assign({self.name: values})

    def pull_async(self) -> Future[np.ndarray]:
        """:meth:`pull` in the background; the future's result is the array."""
        return self._client._submit(self.pull)

    def push_async(self, grad: np.ndarray) -> Future[None]:
        """:meth:`push` in the background. ``grad`` must not be modified until the future is done."""
        return self._client._submit(self.push, grad)

    def __repr__(self) -> str:
        return f"DenseTable({self.name!r}, shape={self.shape}, optimizer={self.optimizer!r})"


class EmbeddingTable(_Handle):
    """A handle on one embedding table, returned by :meth:`Client.embedding`.

    Rows are keyed by any 64-bit id and created on first touch with the table's deterministic
    initializer. Thread safe; methods block until the servers answered, except ``*_async``.
    """

    @property
    def dim(self) -> int:
        """Floats per row."""
        return self._ref.dim

    def pull(self, ids: np.ndarray, create: bool = True) -> np.ndarray:
        """Rows of ``ids`` (int64 or uint64, any shape): float32 of shape ``(*ids.shape, dim)``.

        Rows not seen before are created with the initializer; with ``create=False`` they are not
        created, and an unseen id gets the row it would be created with (read-only lookups for
        evaluation and serving, which never grow the table). int64 ids are taken as the uint64 of
        the same bits, so -1 and 2**64 - 1 name the same row.
        """
        if create:
            return self._client.pull({self.name: ids})[self.name]
        return self._client._exchange(pb.LOOKUP, {self.name: ids}, {self.name: self._ref},
                                      "lookup")[self.name]

    def push(self, ids: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step per distinct id; ``grads`` is float32 ``(*ids.shape, dim)`` and the
        gradients of repeated ids are summed first."""
        self._client.push({self.name: (ids, grads)})

    def push_pull(self, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Push, then return the rows of ``ids`` after the update, in one round trip."""
        return self._client.push_pull({self.name: (ids, grads)})[self.name]

    def pull_async(self, ids: np.ndarray) -> Future[np.ndarray]:
        """:meth:`pull` in the background."""
        return self._client._submit(self.pull, ids)

    def push_async(self, ids: np.ndarray, grads: np.ndarray) -> Future[None]:
        """:meth:`push` in the background; do not modify the arrays until the future is done."""
        return self._client._submit(self.push, ids, grads)

    def num_rows(self) -> int:
        """Rows held across all servers (asks every server now)."""
        return sum(self._client._table_stats(self.name, "rows").values())

    def __repr__(self) -> str:
        return f"EmbeddingTable({self.name!r}, dim={self.dim}, optimizer={self.optimizer!r})"


class Client:
    """A worker's connection to a job. Use :func:`connect` to make one.

    Construction registers with the scheduler (retrying until ``config.timeout``), waits until every
    server has registered, and starts heartbeats. Methods are thread safe; calls issued through
    ``*_async`` run in order on one background thread; a sync call does not wait for them, so it
    can be applied before async calls issued earlier (wait for their futures first).

    Raises (from the constructor):
        NodeUnavailableError: the scheduler is unreachable.
        PSTimeoutError: not every server registered within ``config.timeout``.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        shm.sweep()  # segments a killed process left between creating and unlinking them
        self._membership = Membership(config.scheduler, pb.WORKER, requested_rank=config.rank,
                                      num_workers=config.num_workers, timeout=config.timeout,
                                      replace=config.replace, security=config.security,
                                      transport=self.transport)
        try:
            view = self._membership.cluster(wait_for_servers=True, timeout=config.timeout)
        except Exception:
            self._membership.close()
            raise
        self.node_id = self._membership.node_id
        # NODE/INCARNATION: a server asks the scheduler about this node to tell whether the
        # client is gone (then its unfinished writes cannot hold a checkpoint's cut; see cut.py).
        self._client_id = f"{self.node_id}/{self._membership.incarnation}"
        self._op_seq = _OpSequence()
        self._num_workers = view.num_workers
        reply = self._membership.reply
        self._restored = (json.loads(reply.restored_metadata_json)
                          if reply.restored_metadata_json else {})
        self._restored_version = reply.restored_version
        self._consistency = Consistency.parse(reply.sync)
        if config.sync and Consistency.parse(config.sync) != self._consistency:
            self._membership.close()
            raise TableMismatchError(f"this worker expects a {config.sync} job; the job at "
                                     f"{config.scheduler} is {self._consistency}")
        self._clock = 0                 # steps this worker has pushed (synchronous jobs)
        self._first_step = 0            # 0 until it joined the step group
        self._left = False              # left the step group (leave / close)
        self._step_lock = threading.Lock()
        self._pool = ServerPool(self._membership, view, config.timeout, config.security,
                                client_id=self._client_id, transport=config.transport)
        try:
            self._pool.connect_links()
        except Exception:
            self._pool.close()
            self._membership.close()
            raise
        self._tables: dict[str, DenseRef | EmbeddingRef] = {}
        self._lock = threading.Lock()
        self._async = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ps-async")
        self._closing = self._closed = False

    # -- job ------------------------------------------------------------------------------------

    def transport(self) -> str:
        """How this worker's data travels to the servers: ``"shm"`` (shared memory),
        ``"grpc"``, or per server (``"shm (server-0), grpc (server-1)"``); ``""`` until the
        first data call (a shared-memory link is negotiated with each server on first use)."""
        pool = getattr(self, "_pool", None)
        return pool.transport() if pool is not None else ""

    @property
    def rank(self) -> int:
        """This worker's rank in [0, num_workers)."""
        return self._membership.rank

    @property
    def num_workers(self) -> int:
        """Workers in the job (as told by the launcher or the scheduler; 0 if unknown)."""
        return self._num_workers

    @property
    def num_servers(self) -> int:
        """Servers in the job."""
        return len(self._pool)

    @property
    def sync(self) -> Consistency:
        """The job's consistency model: ``str(client.sync)`` is ``"async"``, ``"bsp"`` or
        ``"ssp:S"``; ``client.sync.mode`` and ``client.sync.staleness`` give its parts."""
        return self._consistency

    @property
    def clock(self) -> int:
        """Synchronous jobs: this worker's clock, the last step it pushed (every ``push`` and
        ``push_pull`` is one step). 0 before its first push; a worker that joined a running job
        starts just below the step it joined at."""
        return self._clock

    def barrier(self, name: str = "default", timeout: float | None = None) -> None:
        """Block until every worker of the job has called ``barrier(name)``.

        Raises PSTimeoutError naming the workers still missing after ``timeout`` seconds
        (default: the client's timeout), NodeUnavailableError if one of them is dead, and
        ParamServerError if the job size is unknown (a barrier cannot know whom to wait for:
        pass ``connect(num_workers=...)`` or start the scheduler with ``--num-workers``) or the
        client is closed.
        """
        self._check_open(f"barrier {name!r}")
        if not self._num_workers:  # another worker or the scheduler may have told it since
            self._num_workers = self._membership.cluster().num_workers
        if not self._num_workers:
            raise ParamServerError(
                f"barrier {name!r} needs the job size, and neither this worker nor the "
                f"scheduler at {self.config.scheduler} knows it: pass connect(num_workers=N), "
                f"set PARAMSERVER_NUM_WORKERS, or start the scheduler with --num-workers N")
        timeout = self.config.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        waiting, delay = 0, 0.01
        while True:
            # Each call waits on the scheduler at most ~1 s (or not at all when many workers
            # wait), so a barrier never pins one of the scheduler's threads for long.
            left = max(0.0, deadline - time.monotonic())
            reply = self._membership.call(
                "Barrier", pb.BarrierRequest(name=name, node_id=self.node_id, timeout=left,
                                             waiting=waiting, total=timeout),
                timeout=left + 10.0, what=f"barrier {name!r}")
            if not reply.pending:
                return
            waiting = reply.generation + 1
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    @property
    def restored_metadata(self) -> dict[str, Any]:
        """The metadata saved with the checkpoint this job resumed from (``{}`` on a fresh job):
        where the training script should continue (epoch, data position, ...)."""
        return dict(self._restored)

    @property
    def restored_version(self) -> int:
        """The version of the checkpoint this job resumed from (0 on a fresh job)."""
        return self._restored_version

    def checkpoint(self, metadata: Mapping[str, Any] | None = None, *,
                   timeout: float | None = None) -> dict[str, Any]:
        """Take a consistent checkpoint of every table now; block until it is durable.

        ``metadata`` (JSON-serializable: epoch, data position, ...) is saved with it and comes
        back as :attr:`restored_metadata` when the job resumes from it. Writes of every worker are
        held for the cut's copy (milliseconds) and then flow again while the servers write.

        Returns ``{"version", "path", "bytes", "step", "hold_s", "snapshot_s", "persist_s",
        "total_s"}``. Raises CheckpointError (the job has no checkpoint directory, a server could
        not write its files: nothing is left half written and the job keeps running) or
        InvalidRequestError (metadata that is not a JSON object).
        """
        from paramserver.coordinator import checkpoint_reply_to_dict

        text = _metadata_json(metadata) if metadata is not None else "{}"
        timeout = self.config.timeout if timeout is None else timeout
        reply = self._membership.call("Checkpoint", pb.CheckpointRequest(
            metadata_json=text, timeout=timeout), timeout=timeout + 5.0, what="checkpoint")
        return checkpoint_reply_to_dict(reply)

    def tables(self) -> dict[str, dict[str, Any]]:
        """Every ready table of the job, whoever declared it: ``{name: spec as a dict}`` (kind,
        shape or dim, optimizer, ...). Attach to one with :meth:`table`."""
        reply = self._membership.call("ListTables", pb.ListTablesRequest(), what="list tables")
        return {p.spec.name: spec_to_dict(p.spec) for p in reply.tables}

    def status(self) -> dict[str, Any]:
        """The scheduler's status of the job as a dict (see ``paramserver status --json``)."""
        from paramserver.status import status_to_dict
        self._check_open("status")
        reply = self._membership.call("Status", pb.StatusRequest(), what="status")
        return status_to_dict(reply)

    # -- tables ---------------------------------------------------------------------------------

    def dense(self, name: str, shape: Sequence[int] | int, optimizer: Optimizer,
              init: Init = None, *, block_size: int | None = None,
              combine: str = "mean") -> DenseTable:
        """Declare a dense float32 table, or attach to it if it exists; return its handle.

        Args:
            name: the table's name, unique in the job.
            shape: the tensor's shape.
            optimizer: the update the servers apply to each push (e.g. ``paramserver.Adam()``).
            init: initial values: None (zeros), an array of ``shape``, or a callable taking the
                shape and returning such an array. Used only by the worker that creates the
                table; when several declare it at once, exactly one initialization wins.
            block_size: elements per block. Default: the tensor split evenly over the servers,
                in blocks of 16Ki to 256Ki elements (64 KiB to 1 MiB), so a mid-size tensor
                still uses every server. Workers must agree on it (the default always does).
            combine: BSP jobs: how a step combines the workers' gradients, ``"mean"`` (default:
                a step equals one process on the workers' batches together, with a mean loss)
                or ``"sum"``. Ignored by async and SSP jobs, which apply every push as it comes.

        Raises:
            TableMismatchError: the table exists with another shape, optimizer or block size.
            InvalidRequestError: a bad shape, optimizer or init value.
            PSTimeoutError: another worker is initializing it and did not finish in time.
        """
        _check_name(name)
        shape_t = _shape_tuple(name, shape)
        if not isinstance(optimizer, Optimizer):
            raise InvalidRequestError(f"table {name!r}: optimizer must be a paramserver optimizer "
                                      f"(e.g. paramserver.Adam()), got {optimizer!r}")
        # No block_size: 0 asks the scheduler for the default (or, for a table that exists, e.g.
        # restored from a checkpoint taken with another server count, the one it has).
        if block_size is not None and (isinstance(block_size, bool)
                                       or not isinstance(block_size, int)
                                       or not 0 < block_size <= MAX_BLOCK_SIZE):
            raise InvalidRequestError(f"table {name!r}: block_size must be an int in "
                                      f"[1, {MAX_BLOCK_SIZE}], got {block_size!r}")
        if combine not in ("mean", "sum"):
            raise InvalidRequestError(f"table {name!r}: combine must be 'mean' or 'sum', got "
                                      f"{combine!r}")
        values = None if init is None else _init_values(name, shape_t, init)
        spec = pb.TableSpec(name=name, kind=pb.TableSpec.DENSE, shape=shape_t,
                            block_size=block_size or 0, optimizer=optimizer_to_spec(optimizer),
                            combine=pb.TableSpec.SUM if combine == "sum" else pb.TableSpec.MEAN)
        ref = self._attach(self._declare(spec, values))
        return DenseTable(self, ref)

    def embedding(self, name: str, dim: int, optimizer: Optimizer, init: Any = None, *,
                  seed: int = 0) -> EmbeddingTable:
        """Declare an embedding table, or attach to it if it exists; return its handle.

        Args:
            name: the table's name, unique in the job.
            dim: floats per row.
            optimizer: applied to each pushed row, with its own state and step count per row.
            init: a ``paramserver.init`` initializer for new rows (default ``init.zeros()``).
            seed: initializer seed; a row's initial values depend only on (init, seed, id).

        Raises:
            TableMismatchError: the table exists with another dim, optimizer, init or seed.
            InvalidRequestError: a bad dim, optimizer, init or seed.
        """
        from paramserver import init as initializers

        _check_name(name)
        if (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                or not 0 < dim <= MAX_DIM):
            raise InvalidRequestError(f"table {name!r}: dim must be an int in [1, {MAX_DIM}], "
                                      f"got {dim!r}")
        if not isinstance(optimizer, Optimizer):
            raise InvalidRequestError(f"table {name!r}: optimizer must be a paramserver optimizer "
                                      f"(e.g. paramserver.Adagrad()), got {optimizer!r}")
        init = initializers.zeros() if init is None else init
        if not isinstance(init, initializers.Initializer):
            raise InvalidRequestError(f"table {name!r}: init must be a paramserver.init "
                                      f"initializer (e.g. ps.init.normal(0.0, 0.01)), got {init!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
                0 <= seed < 2**64):
            raise InvalidRequestError(f"table {name!r}: seed must be an int in [0, 2**64), "
                                      f"got {seed!r}")
        spec = pb.TableSpec(name=name, kind=pb.TableSpec.EMBEDDING, dim=int(dim),
                            optimizer=optimizer_to_spec(optimizer),
                            initializer_json=initializer_to_json(init), seed=int(seed))
        ref = self._attach(self._declare(spec, None))
        return EmbeddingTable(self, ref)

    def _table_stats(self, name: str, field: str) -> dict[int, int]:
        """``field`` of table ``name`` in every server's statistics, asked now: {rank: value}."""
        results = self._pool.on_servers(
            {server.rank: None for server in self._pool.all()},
            lambda rank, _: self._pool.call(rank, "Stats", pb.StatsRequest(), "stats"))
        return {rank: next((getattr(t, field) for t in stats.tables if t.name == name), 0)
                for rank, stats in results.items()}

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ParamServerError(f"{what}: client {self.node_id} is closed")

    def _declare(self, spec: pb.TableSpec, values: np.ndarray | None) -> pb.TablePlacement:
        self._check_open(f"declare table {spec.name!r}")
        deadline = time.monotonic() + self.config.timeout
        delay = 0.01
        while True:
            reply = self._membership.call(
                "DeclareTable", pb.DeclareTableRequest(spec=spec, node_id=self.node_id),
                what=f"declare table {spec.name!r}")
            if reply.action == pb.DeclareTableReply.ATTACH:
                return reply.placement
            if reply.action == pb.DeclareTableReply.INITIALIZE:
                try:
                    self._initialize(reply.placement, values)
                except ParamServerError as exc:
                    self._abandon(spec.name, exc)
                    raise
                try:
                    # Given values are saved by the servers before the table is ready.
                    self._membership.call("TableReady", pb.TableReadyRequest(
                        name=spec.name, node_id=self.node_id, initial_values=values is not None),
                        what=f"table {spec.name!r} ready")
                except CheckpointError as exc:  # they could not be: the table is not ready
                    self._abandon(spec.name, exc)
                    raise
                return reply.placement
            if time.monotonic() + delay > deadline:
                raise PSTimeoutError(
                    f"table {spec.name!r} is being initialized by another worker and was not "
                    f"ready after {self.config.timeout:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _abandon(self, name: str, error: Exception) -> None:
        """Undo a failed initialization: the scheduler frees the name and drops the shards it
        made (best effort: the error being raised matters more)."""
        try:
            self._membership.call("AbandonTable", pb.AbandonTableRequest(
                name=name, node_id=self.node_id, reason=str(error)[:2000]),
                what=f"abandon table {name!r}")
        except ParamServerError:
            pass

    def _initialize(self, placement: pb.TablePlacement, values: np.ndarray | None) -> None:
        # The scheduler created the shards before answering INITIALIZE (paramserver.tablectl);
        # what is left is writing given initial values.
        if values is None:
            return
        spec = placement.spec
        layout = BlockLayout(int(np.prod(spec.shape)), spec.block_size,
                             tuple(placement.block_servers))
        ref = DenseRef(spec.name, tuple(spec.shape), optimizer_from_spec(spec.optimizer),
                       layout, layout.blocks_by_server())
        self._exchange(pb.ASSIGN, {spec.name: values}, {spec.name: ref}, "initialize")

    def table(self, name: str) -> DenseTable | EmbeddingTable:
        """The handle of any ready table of the job, whoever declared it (an evaluator or an
        exporter need not repeat its shape and optimizer). TableNotFoundError if the job has no
        ready table of that name."""
        ref = self._tables.get(name)
        if ref is None:
            reply = self._membership.call("ListTables", pb.ListTablesRequest(name=name),
                                          what=f"find table {name!r}")
            if not reply.tables:
                known = sorted(self.tables())
                raise TableNotFoundError(f"the job has no ready table {name!r} (tables: {known})")
            ref = self._attach(reply.tables[0])
        return DenseTable(self, ref) if isinstance(ref, DenseRef) else EmbeddingTable(self, ref)

    def _attach(self, placement: pb.TablePlacement) -> DenseRef | EmbeddingRef:
        """Remember a table's placement as this client's reference to it."""
        from paramserver import init as initializers

        spec = placement.spec
        optimizer = optimizer_from_spec(spec.optimizer)
        if spec.kind == pb.TableSpec.DENSE:
            shape = tuple(spec.shape)
            layout = BlockLayout(int(np.prod(shape)), spec.block_size,
                                 tuple(placement.block_servers))
            ref: DenseRef | EmbeddingRef = DenseRef(spec.name, shape, optimizer, layout,
                                                    layout.blocks_by_server())
        else:
            init = initializers.initializer_from_dict(json.loads(spec.initializer_json))
            ref = EmbeddingRef(spec.name, spec.dim, optimizer, init, spec.seed,
                               placement.num_servers)
        with self._lock:
            self._tables[spec.name] = ref
        return ref

    def _ref(self, name: str) -> DenseRef | EmbeddingRef:
        ref = self._tables.get(name)
        if ref is None:
            raise TableNotFoundError(
                f"table {name!r} is not declared on this client (declared: "
                f"{sorted(self._tables)}); call client.dense({name!r}, ...) or "
                f"client.embedding({name!r}, ...) first")
        return ref

    # -- data path ------------------------------------------------------------------------------

    def pull(self, tables: Iterable[str] | Mapping[str, np.ndarray | None], *,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Current values of several tables in one RPC per server.

        ``tables`` is a list of dense table names, or a dict mapping dense names to None and
        embedding names to their ids. Returns ``{name: array}`` (embedding rows shaped
        ``(*ids.shape, dim)``). ``out`` maps dense tables to arrays the values are written into
        instead of new ones (writable, C-contiguous float32 of the table's size; returned as
        given), e.g. a torch parameter's ``.numpy()``.
        """
        entries = _read_entries(tables)
        return self._exchange(pb.PULL, entries, self._refs(entries), "pull", out=out)

    def push(self, grads: Mapping[str, Any],
             pull: Iterable[str] | Mapping[str, np.ndarray | None] | None = None, *,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
        """One optimizer step on each table, one RPC per server for all of them.

        ``grads`` maps a dense table to its gradient and an embedding table to ``(ids, grads)``.
        Every entry is checked (declared table, float32, exact shape, finite, integer ids) before
        anything is sent: a bad one raises InvalidRequestError naming the table, nothing applied.

        ``pull`` (as :meth:`pull` takes it) is read in the same round trip, after this push is
        applied: e.g. the next batch's embedding rows while this batch's gradients go out, or a
        dense table's new values. Returns what was pulled (None without ``pull``); ``out`` as in
        :meth:`pull`. In a synchronous job the pulled values are those after this step.
        """
        if pull is None:
            self._exchange(pb.PUSH, dict(grads), self._refs(grads), "push")
            return None
        reads = _read_entries(pull)
        return self._exchange(pb.PUSH, dict(grads), self._refs(grads), "push",
                              reads=(reads, self._refs(reads)), out=out)

    def assign(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite several dense tables (float32 arrays of their shapes) in one RPC per
        server; their optimizer state is kept. Not an optimizer step (a synchronous job does not
        count it as one)."""
        self._exchange(pb.ASSIGN, dict(values), self._refs(values), "assign")

    def push_pull(self, grads: Mapping[str, Any], *,
                  out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Push as :meth:`push`, then return each table's values (embedding: the pushed ids'
        rows) after the update, in one round trip; ``out`` as in :meth:`pull`."""
        return self._exchange(pb.PUSH_PULL, dict(grads), self._refs(grads), "push_pull",
                              out=out)

    def _refs(self, names: Iterable[str]) -> dict[str, DenseRef | EmbeddingRef]:
        return {name: self._ref(name) for name in names}

    def push_async(self, grads: Mapping[str, np.ndarray]) -> Future[None]:
        """:meth:`push` in the background (in order with other async calls of this client).
        The arrays must not be modified until the future is done."""
        return self._submit(self.push, grads)

    def pull_async(self, tables: Iterable[str] | Mapping[str, np.ndarray | None]
                   ) -> Future[dict[str, np.ndarray]]:
        """:meth:`pull` in the background; the future's result is the dict."""
        return self._submit(self.pull, dict(tables) if isinstance(tables, Mapping) else list(tables))

    def push_pull_async(self, grads: Mapping[str, np.ndarray]) -> Future[dict[str, np.ndarray]]:
        """:meth:`push_pull` in the background."""
        return self._submit(self.push_pull, grads)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._closing:
            raise ParamServerError(f"an async call: client {self.node_id} is closed")
        return self._async.submit(fn, *args)

    def _exchange(self, op: int, entries: dict[str, Any], refs: dict[str, Any],
                  what: str, reads: tuple[dict[str, Any], dict[str, Any]] | None = None,
                  out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Send one call's tables to the servers (one RPC each, all at once); reassemble reads.

        ``entries`` maps a dense table to its array (None in pulls) and an embedding table to its
        ids (pulls) or ``(ids, grads)``. ``reads`` (a push's ``pull``: entries and refs) are read
        in the same messages, after the writes. ``out`` gives dense tables' result arrays to
        write the values into (float32, C-contiguous, the table's size). Every entry is
        validated before anything is sent. In a synchronous job a push or push_pull is one step:
        it goes to every server (empty where it has nothing), and waits for the step as the
        job's model says.
        """
        self._check_open(f"{what} of {sorted(refs)}")
        leases: list = []
        try:
            return self._exchange_leased(op, entries, refs, what, reads, out, leases)
        finally:
            shm.release(leases)

    def _exchange_leased(self, op: int, entries: dict[str, Any], refs: dict[str, Any],
                         what: str, reads: tuple[dict[str, Any], dict[str, Any]] | None,
                         out: Mapping[str, np.ndarray] | None,
                         leases: list) -> dict[str, np.ndarray]:
        out = out or {}

        def plan_of(name: str, ref: Any, kind: int, value: Any) -> DensePlan | SparsePlan:
            if isinstance(ref, DenseRef):
                return DensePlan(ref, kind, value, out=out.get(name))
            return SparsePlan(ref, kind, value)

        plans = {name: plan_of(name, ref, op, entries[name]) for name, ref in refs.items()}
        items: dict[int, list[DenseItem | SparseItem]] = {}
        for plan in plans.values():
            for server, item in plan.items().items():
                items.setdefault(server, []).append(item)
        label = f"{what} of {sorted(refs)}"
        if reads is not None:
            # The push's own plans only send; the reads' plans take the values.
            plans = {name: plan_of(name, ref, pb.PULL, reads[0][name])
                     for name, ref in reads[1].items()}
            for plan in plans.values():
                for server, item in plan.items().items():
                    items.setdefault(server, []).append(item)
            label += f", pull of {sorted(reads[1])}"
        if self._consistency.synchronous and op in (pb.PUSH, pb.PUSH_PULL):
            with self._step_lock:
                replies = self._step(op, items, label)
        elif reads is not None and any(_messages(its, self._cut(s)) > 1
                                       for s, its in items.items()):
            # A server reads a message's read-only slices after that message's writes, not
            # after the other messages', which it may apply in parallel: a push too large for
            # one message per server writes first, then reads, in two rounds.
            writes = {s: [item for item in its if not _read_only(item)]
                      for s, its in items.items()}
            self._send(op, {s: its for s, its in writes.items() if its}, label)
            reads_of = {s: [item for item in its if _read_only(item)] for s, its in items.items()}
            replies = self._send(pb.PULL, {s: its for s, its in reads_of.items() if its}, label)
        else:
            step = None
            if self._consistency.synchronous and op in (pb.PULL, pb.LOOKUP):
                step = self._read_tag(self._clock)
            # Replies through shared memory are read in their segments, no copy: the segments
            # are given back once the values are taken (below).
            replies = self._send(op, items, label, step, leases)
        if op not in (pb.PULL, pb.PUSH_PULL, pb.LOOKUP) and reads is None:
            return {}
        # Every reply is checked: each requested block and row arrives exactly once, with the
        # right length, and from the server it was asked of. A bad reply is an error naming the
        # server, never garbage in the result.
        for rank, server_replies in replies.items():
            try:
                for reply in server_replies:
                    dense, sparse = decode_reply(reply)
                    for piece in dense + sparse:
                        plan = plans.get(piece.table)
                        if plan is None:
                            raise ValueError(f"it answered for table {piece.table!r}, which was "
                                             f"not asked for")
                        plan.absorb(piece, rank)
            except ValueError as exc:
                server = self._pool.get(rank)
                raise ParamServerError(f"{label}: bad reply from server-{rank} at "
                                       f"{server.address}: {exc}") from None
        try:
            return {name: plan.result() for name, plan in plans.items()}
        except ValueError as exc:
            raise ParamServerError(f"{label}: incomplete replies: {exc}") from None

    def _cut(self, rank: int) -> int:
        """The message size of requests to server ``rank`` (larger through shared memory)."""
        return self._pool.message_bytes(rank, self.config.message_bytes)

    def _send(self, op: int, items: dict[int, list[DenseItem | SparseItem]], label: str,
              step: pb.StepTag | None = None, leases: list | None = None
              ) -> dict[int, list[bytes]]:
        """One round of requests: ``items`` cut into messages for each server, all sent at once;
        the replies by server. A read that waits for a step and gets *pending* asks again."""
        planned = {s: plan_requests(its, self._cut(s)) for s, its in items.items()}
        tag = None
        if op in _WRITES and planned:
            seq, done_below = self._op_seq.begin()
            servers = sorted(planned)
            tag = pb.OpTag(client=self._client_id, seq=seq, servers=servers,
                           parts=[len(planned[s]) for s in servers], done_below=done_below)
        try:
            replies = self._pool.on_servers(
                {s: iter_messages(op, plan, 0, self.node_id, tag, step)
                 for s, plan in planned.items()},
                lambda rank, requests: self._pool.exchange(rank, requests, label, leases))
        finally:
            if tag is not None:
                self._op_seq.end(tag.seq)
        if step is None or not self._consistency.synchronous:
            return replies
        waiting = {s for s, rs in replies.items() if any(reply_pending(r) for r in rs)}
        if waiting:
            # Ask again (reads only: a write is never sent twice) until the step is reached.
            reads = {s: _poll_items(op, items[s]) for s in waiting}
            poll_op = pb.LOOKUP if op == pb.LOOKUP else pb.PULL
            replies.update(self._pool.on_servers(
                reads, lambda rank, its: self._poll(poll_op, rank, its, step, label)))
        return replies

    def _poll(self, op: int, rank: int, items: list[DenseItem | SparseItem], step: pb.StepTag,
              label: str) -> list[bytes]:
        """Read ``items`` (``op`` PULL or LOOKUP) from server ``rank`` once it reached
        ``step.read_step``."""
        deadline = time.monotonic() + self.config.timeout
        delay = 0.001
        waits_for = "the step"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            tag = pb.StepTag(worker=step.worker, read_step=step.read_step,
                             wait=min(_STEP_WAIT, left))
            replies = self._pool.exchange(
                rank, iter_messages(op, plan_requests(items, self._cut(rank)), 0,
                                    self.node_id, None, tag), label)
            waits_for = next((w for r in replies if (w := reply_pending(r))), None)
            if waits_for is None:
                return replies
            time.sleep(delay)  # the server was too busy to wait, or the wait ran out
            delay = min(delay * 2, 0.05)
        server = self._pool.get(rank)
        raise PSTimeoutError(f"{label}: server-{rank} at {server.address} did not reach step "
                             f"{step.read_step} within {self.config.timeout:.1f} s; {waits_for}")

    def _read_tag(self, clock: int) -> pb.StepTag:
        return pb.StepTag(worker=self.rank, read_step=clock, wait=_STEP_WAIT)

    def _step(self, op: int, items: dict[int, list[DenseItem | SparseItem]],
              label: str) -> dict[int, list[bytes]]:
        """One step of a synchronous job: a contribution to every server, then (BSP, or a
        push_pull) wait until the step can be read. Caller holds ``_step_lock``."""
        if not self._first_step and not self._left:
            reply = self._membership.call("SyncJoin", pb.SyncJoinRequest(
                node_id=self.node_id, incarnation=self._membership.incarnation,
                timeout=self.config.timeout), timeout=self.config.timeout + 5.0,
                what="join the step group")
            self._first_step = reply.first_step
            self._clock = max(self._clock, reply.first_step - 1)
        if self._left:
            raise ParamServerError(f"{label}: {self.node_id} left the step group after step "
                                   f"{self._clock} (client.leave); it cannot push again")
        step = self._clock + 1
        for rank in range(len(self._pool)):
            items.setdefault(rank, [])
        waits = (self._consistency.mode == "bsp" or op == pb.PUSH_PULL
                 or any(_read_only(item) for its in items.values() for item in its))
        if not waits:
            replies = self._send(op, items, label, pb.StepTag(worker=self.rank, step=step))
        elif all(_messages(its, self._cut(s)) == 1 for s, its in items.items()):
            # One message per server: it waits for the step and brings the values back.
            replies = self._send(op, items, label, pb.StepTag(
                worker=self.rank, step=step, read_step=step, wait=_STEP_WAIT))
        else:
            # Several messages per server: they contribute without waiting (a server would
            # otherwise hold a thread per message); then one call per server waits for the
            # step, and a push_pull reads the values.
            writes = {s: [item for item in its if not _read_only(item)]
                      for s, its in items.items()}
            self._send(pb.PUSH, writes, label, pb.StepTag(worker=self.rank, step=step))
            self._send(pb.PULL, {rank: [] for rank in items}, label, self._read_tag(step))
            reads = {s: _poll_items(op, its) for s, its in items.items()}
            reads = {s: its for s, its in reads.items() if its}
            replies = self._send(pb.PULL, reads, label, self._read_tag(step)) if reads else {}
        self._clock = step
        return replies

    # -- lifecycle ------------------------------------------------------------------------------

    def leave(self) -> None:
        """Synchronous jobs: this worker has pushed its last step (it ran out of data); the
        steps after :attr:`clock` stop waiting for it. The client stays connected: it can still
        pull, checkpoint and meet the others at a barrier, but not push. ``close()`` leaves too.
        Idempotent; does nothing in an asynchronous job."""
        if not self._consistency.synchronous:
            return
        with self._step_lock:
            if self._left:
                return
            self._membership.call("SyncLeave", pb.SyncLeaveRequest(
                node_id=self.node_id, incarnation=self._membership.incarnation,
                last_step=self._clock), timeout=min(self.config.timeout, 30.0),
                what="leave the step group")
            self._left = True

    def close(self) -> None:
        """Finish queued async calls, leave the job and close every connection. Idempotent.

        In a synchronous job this is how a worker that ran out of data leaves the step group:
        the steps after its last one no longer wait for it."""
        if self._closing:
            return
        self._closing = True  # refuse new async calls; the queued ones still run
        self._async.shutdown(wait=True)
        self._closed = True
        if not self._membership.superseded:
            try:
                self.leave()
            except ParamServerError as exc:
                log.warning("%s: leaving the step group: %s", self.node_id, exc)
        self._pool.close()
        self._membership.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Client(rank={self.rank}, num_workers={self.num_workers}, "
                f"scheduler={self.config.scheduler!r}, servers={self.num_servers})")


def _messages(items: list[DenseItem | SparseItem], message_bytes: int) -> int:
    """How many messages ``items`` take."""
    return len(plan_requests(items, message_bytes))


def _read_entries(tables: Iterable[str] | Mapping[str, np.ndarray | None]) -> dict[str, Any]:
    """What :meth:`Client.pull` takes (a name, names, or names to ids) as a dict."""
    if isinstance(tables, str):
        return {tables: None}
    return dict(tables) if isinstance(tables, Mapping) else dict.fromkeys(tables)


def _read_only(item: DenseItem | SparseItem) -> bool:
    """A read in a push (no data: a pull's item)."""
    return not item.views if isinstance(item, DenseItem) else item.rows is None


def _read_item(item: DenseItem | SparseItem) -> DenseItem | SparseItem:
    """The read of what a write item wrote: the same blocks or rows, without data."""
    if isinstance(item, DenseItem):
        return DenseItem(item.table, item.blocks, item.lengths, [])
    return SparseItem(item.table, item.ids, item.dim)


def _poll_items(op: int, items: list[DenseItem | SparseItem]) -> list[DenseItem | SparseItem]:
    """What to read again from a server whose answer was pending: everything a pull or
    push_pull reads, a push's read-only items."""
    if op == pb.PUSH:
        return [item for item in items if _read_only(item)]
    return [_read_item(item) for item in items]


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise InvalidRequestError(f"checkpoint metadata must be a dict (JSON object), got "
                                  f"{type(metadata).__name__}")
    try:
        return json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"checkpoint metadata is not JSON-serializable: {exc}") from None
def _check_name(name: str) -> None:
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME_BYTES:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "..."
        raise InvalidRequestError(f"a table name must be a str of 1 to {MAX_NAME_BYTES} UTF-8 "
                                  f"bytes, got {shown}")


def _shape_tuple(name: str, shape: Sequence[int] | int) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0
                       for d in dims):
        raise InvalidRequestError(f"table {name!r}: shape must be positive ints, got {shape!r}")
    size = 1
    for d in dims:
        size *= int(d)
    if size > MAX_TABLE_ELEMENTS:
        raise InvalidRequestError(f"table {name!r}: shape {shape!r} has {size} elements, more "
                                  f"than the {MAX_TABLE_ELEMENTS} a table may hold")
    return tuple(int(d) for d in dims)


def _init_values(name: str, shape: tuple[int, ...], init: Init) -> np.ndarray:
    values = init(shape) if callable(init) else init
    try:
        array = np.asarray(values)
    except Exception as exc:  # an arbitrary object from a user callable
        raise InvalidRequestError(f"table {name!r}: init gave {type(values).__name__}, not an "
                                  f"array: {exc}") from None
    if array.shape != shape:
        raise InvalidRequestError(f"table {name!r}: init has shape {array.shape}, the table "
                                  f"{shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise InvalidRequestError(f"table {name!r}: init has dtype {array.dtype}, expected a "
                                  f"real number type")
    array = np.ascontiguousarray(array, dtype=FLOAT)
    if not np.isfinite(array).all():
        raise InvalidRequestError(f"table {name!r}: init contains NaN or infinity")
    return array


def connect(scheduler: str | None = None, *, rank: int | None = None,
            num_workers: int | None = None, timeout: float = 60.0,
            message_bytes: int | None = None, token: str | None = None,
            tls_ca: str | os.PathLike[str] | None = None,
            tls_cert: str | os.PathLike[str] | None = None,
            tls_key: str | os.PathLike[str] | None = None, sync: str | None = None,
            transport: str | None = None) -> Client:
    """Connect this process to a job as a worker and return its :class:`Client`.

    Args:
        scheduler: ``host:port`` of the scheduler; default ``$PARAMSERVER_SCHEDULER`` (set by
            ``paramserver launch``).
        rank: worker rank to ask for; default ``$PARAMSERVER_RANK`` or any free rank.
        num_workers: job size; default ``$PARAMSERVER_NUM_WORKERS`` or what the scheduler knows.
        timeout: seconds for each remote call and for waiting on servers, tables and barriers.
        message_bytes: payload bytes per gRPC message (default 2 MiB).
        token: the job token, attached to every call; default ``$PARAMSERVER_TOKEN`` (set by
            ``paramserver launch``) or none.
        tls_ca: path of the PEM CA certificates that signed the scheduler's and servers'
            certificates; calls then use TLS and verify them. Default ``$PARAMSERVER_TLS_CA``.
        tls_cert, tls_key: paths of this worker's PEM client certificate and key, for mutual TLS.
            Default ``$PARAMSERVER_TLS_CERT`` / ``$PARAMSERVER_TLS_KEY``.
        sync: the consistency model this worker is written for (``"async"``, ``"bsp"`` or
            ``"ssp:S"``); connecting to a job run with another one raises TableMismatchError.
            Default ``$PARAMSERVER_SYNC`` (set by ``paramserver launch --sync``) or the job's.
        transport: ``"auto"`` (shared memory with the servers on this host, gRPC with the
            others), ``"grpc"`` or ``"shm"`` (shared memory or an error). Default
            ``$PARAMSERVER_TRANSPORT`` or ``"auto"``.

    Raises:
        ParamServerError: no scheduler given and ``PARAMSERVER_SCHEDULER`` unset.
        NodeUnavailableError: the scheduler is unreachable within ``timeout``.
        AuthenticationError: the scheduler refused the token (missing or wrong).
        TableMismatchError: ``sync`` differs from the job's consistency model.
        InvalidRequestError: the token is not printable ASCII, or a TLS file cannot be read or
            is not PEM.
    """
    scheduler = scheduler or os.environ.get("PARAMSERVER_SCHEDULER")
    if not scheduler:
        raise ParamServerError("no scheduler address: pass connect('host:port') or set "
                               "PARAMSERVER_SCHEDULER (paramserver launch sets it)")
    if rank is None:
        rank = _env_int("PARAMSERVER_RANK", -1)
    if num_workers is None:
        num_workers = _env_int("PARAMSERVER_NUM_WORKERS", 0)
    extra = {} if message_bytes is None else {"message_bytes": message_bytes}
    try:
        security = load_security(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    # Set by `paramserver launch --max-restarts` for a worker it restarted: the rank's previous
    # holder is known dead, so take the rank over at once.
    replace = os.environ.get("PARAMSERVER_REPLACE") == "1"
    sync = os.environ.get("PARAMSERVER_SYNC", "") if sync is None else sync
    if transport is None:
        transport = os.environ.get("PARAMSERVER_TRANSPORT", "") or "auto"
    try:
        config = ClientConfig(scheduler=scheduler, rank=rank, num_workers=num_workers,
                              timeout=timeout, security=security, replace=replace, sync=sync,
                              transport=transport, **extra)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    return Client(config)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ParamServerError(f"environment variable {name}={raw!r} is not an integer") from None
