"""The scheduler: membership, the partition map, barriers, heartbeats and cluster status.

One per job, on the control path only (tensors never pass through it). Nodes register and get ranks;
workers declare tables here, and the scheduler decides which server holds which block and which
worker initializes a new table. Liveness is computed from heartbeats: a node silent for longer than
``heartbeat_timeout`` is reported dead in status, in barrier errors and to workers asking about a
server they cannot reach.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from paramserver import checkpoint as ckpt
from paramserver import initial, nodestate, roles, rpc, tablectl
from paramserver.config import DEFAULT_BLOCK_SIZE, SchedulerConfig
from paramserver.coordinator import CheckpointCoordinator
from paramserver.errors import (
    CheckpointError,
    InvalidRequestError,
    NodeUnavailableError,
    ParamServerError,
    PSTimeoutError,
    TableMismatchError,
)
from paramserver.partition import assign_blocks, default_block_size
from paramserver.rounds import RoundCoordinator
from paramserver.sync import Consistency
from paramserver.syncgroup import SyncGroup
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import describe_spec, optimizer_from_spec, specs_match

__all__ = ["Scheduler", "has_recoverable_state"]

log = logging.getLogger(__name__)

#: Owner of a table being loaded from a checkpoint (not a node: never taken over).
_RESTORE = "(checkpoint restore)"
#: Owner of an abandoned table while its shards are dropped: a new declaration waits, so the drop
#: cannot remove the shards of the next initialization of that name.
_DROPPING = "(being dropped)"
#: The scheduler's own state, kept in the checkpoint directory for --recover.
_STATE_FILE = "scheduler-state.json"
#: Refused before any placement work: 2^40 float32 with Adam state is 13 TB.
_MAX_ELEMENTS = 1 << 40
_MAX_BLOCKS = 1 << 24
#: Longest a Barrier call waits on the scheduler before answering "pending" (seconds).
_BARRIER_POLL = 1.0


def _few(names: list[str], limit: int = 10) -> str:
    """A list of names for a message, cut after ``limit``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

_ROLE_NAMES = {pb.SERVER: "server", pb.WORKER: "worker"}


def has_recoverable_state(checkpoint_dir: str | os.PathLike[str]) -> bool:
    """True if ``checkpoint_dir`` holds a scheduler's state (``--recover`` can continue its
    job): what a supervisor that restarts the scheduler with one command asks
    (``paramserver scheduler --recover-if-present``)."""
    return Path(checkpoint_dir, _STATE_FILE).is_file()


@dataclass
class _Node:
    role: int
    rank: int
    node_id: str
    address: str
    pid: int
    hostname: str
    last_heartbeat: float
    left: bool = False
    stats: pb.ServerStats = field(default_factory=pb.ServerStats)
    incarnation: str = ""
    restarts: int = 0
    rolled_back: int = 0
    restore_state: str = ""
    transport: str = ""
    #: A node of a recovered job's saved state counts as alive until then (monotonic time),
    #: though it has not reported back since the scheduler restarted; 0 once it has.
    grace_until: float = 0.0


@dataclass
class _Table:
    placement: pb.TablePlacement
    owner: str
    ready: bool = False
    restored: int = 0     # the checkpoint version it was loaded from (0: declared in this job)
    error: str = ""       # why loading it from the checkpoint failed
    given: bool = False   # a worker initialized it from given values (not its initializer)


@dataclass
class _Barrier:
    generation: int = 0
    arrived: set[str] = field(default_factory=set)


class _SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config
        self._num_workers = config.num_workers
        self._nodes: dict[str, _Node] = {}
        self._tables: dict[str, _Table] = {}
        self._server_load = [0] * config.num_servers
        self._barriers: dict[str, _Barrier] = {}
        self._cond = threading.Condition()
        self._started = time.monotonic()
        root = ckpt.check_writable(config.checkpoint_dir) if config.checkpoint_dir else None
        self.checkpoints = CheckpointCoordinator(root, config.keep, config.num_servers,
                                                 self._live_servers, self._ready_tables,
                                                 security=config.security)
        self._restored_metadata = ""
        self.consistency = Consistency.parse(config.sync)
        self.sync_group: SyncGroup | None = None
        if self.consistency.synchronous:
            self.sync_group = SyncGroup(self.consistency, config.on_worker_failure,
                                        config.num_workers, self._call_all_servers,
                                        on_change=self._save_state_locked)
            threading.Thread(target=self._watch_workers, name="ps-sync-watch",
                             daemon=True).start()
        self.rounds: RoundCoordinator | None = None
        if config.federated is not None:
            self.rounds = RoundCoordinator(config.federated, self._call_all_servers,
                                           self._worker_alive)
        self._view_version = 0
        self._waiting = 0  # Barrier calls waiting on a handler thread
        self._state_file = root / _STATE_FILE if root is not None else None
        self._state_cv = threading.Condition()
        self._state_pending: dict | None = None
        self._state_writing = False
        self._state_asked = self._state_written = 0  # states handed to the writer / written
        self._state_closed = False
        if self._state_file is not None:
            threading.Thread(target=self._write_states, name="ps-state-writer",
                             daemon=True).start()
        if config.recover:
            self._load_state()
        elif config.resume:
            assert root is not None
            self._load_checkpoint(root)
        self._save_state()

    # -- the scheduler's own state (for a restart) ----------------------------------------------

    def _save_state(self) -> None:
        """Have the job's tables, placement and size written to the checkpoint directory
        (atomically, by a writer thread: the fsync never runs under the scheduler's lock), so a
        restarted scheduler (--recover) continues the job. Caller may hold the lock."""
        if self._state_file is None:
            return
        state = {"format": "paramserver-scheduler-state", "num_workers": self._num_workers,
                 "server_load": self._server_load, "view_version": self._view_version,
                 "restored_version": self.checkpoints.restored_version,
                 "checkpoint_floor": self.checkpoints.floor,
                 "restored_metadata": self._restored_metadata,
                 "tables": [json_format.MessageToDict(t.placement, preserving_proto_field_name=True)
                            for t in self._tables.values() if t.ready],
                 "sync_members": (self.sync_group.to_state()
                                  if self.sync_group is not None else []),
                 "nodes": nodestate.to_state(self._nodes.values())}
        with self._state_cv:
            self._state_pending = state  # the latest state wins; older ones need no write
            self._state_asked += 1
            state["_seq"] = self._state_asked
            self._state_cv.notify()

    def _flush_state(self, timeout: float = 10.0) -> None:
        """Wait until the state saved so far is on disk (or ``timeout`` passes): a step-group
        change is acknowledged only once a restarted scheduler would know it."""
        if self._state_file is None:
            return
        deadline = time.monotonic() + timeout
        with self._state_cv:
            target = self._state_asked
            while self._state_written < target and not self._state_closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("the scheduler's state was not written within %.0f s", timeout)
                    return
                self._state_cv.wait(left)

    def _save_state_locked(self) -> None:
        with self._cond:
            self._save_state()

    def _write_states(self) -> None:
        while True:
            with self._state_cv:
                while self._state_pending is None and not self._state_closed:
                    self._state_cv.wait()
                state, self._state_pending = self._state_pending, None
                if state is None:
                    return
                self._state_writing = True
            seq = state.pop("_seq", 0)
            self._write_state(state)
            with self._state_cv:
                self._state_writing = False
                self._state_written = max(self._state_written, seq)
                self._state_cv.notify_all()

    def _write_state(self, state: dict) -> None:
        assert self._state_file is not None
        tmp = self._state_file.with_name(self._state_file.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self._state_file)
        except OSError as exc:
            log.error("cannot save the scheduler's state to %s: %s", self._state_file, exc)

    def close_state(self) -> None:
        """Write the last pending state and stop the writer (at shutdown)."""
        deadline = time.monotonic() + 10.0
        with self._state_cv:
            self._state_closed = True
            self._state_cv.notify_all()
            while (self._state_pending is not None or self._state_writing) \
                    and time.monotonic() < deadline:
                self._state_cv.wait(1.0)

    def _load_state(self) -> None:
        assert self._state_file is not None
        try:
            state = json.loads(self._state_file.read_text())
            if state.get("format") != "paramserver-scheduler-state":
                raise ValueError("not a scheduler state file")
            tables = [json_format.ParseDict(t, pb.TablePlacement()) for t in state["tables"]]
        except (OSError, ValueError, KeyError, json_format.ParseError) as exc:
            raise CheckpointError(f"cannot recover the job from {self._state_file}: {exc}") \
                from None
        self._num_workers = self._num_workers or int(state["num_workers"])
        self._server_load = list(state["server_load"])
        self._view_version = int(state["view_version"]) + 1
        self.checkpoints.restored_version = int(state["restored_version"])
        self.checkpoints.floor = int(state.get("checkpoint_floor", 0))
        self._restored_metadata = state["restored_metadata"]
        for placement in tables:
            self._tables[placement.spec.name] = _Table(placement, owner="", ready=True)
        if self.sync_group is not None and state.get("sync_members"):
            self.sync_group.load_state(state["sync_members"])
        now = time.monotonic()
        grace = self._config.recover_grace or 3 * self._config.heartbeat_timeout
        try:
            for node in nodestate.from_state(state.get("nodes", []), _Node, now, grace):
                self._nodes[node.node_id] = node
        except ValueError as exc:
            raise CheckpointError(f"cannot recover the job from {self._state_file}: {exc}") \
                from None
        waiting = sorted(n.node_id for n in self._nodes.values() if not n.left)
        log.warning("recovering the job from %s: %d tables; nodes %s count as alive for %.1f s "
                    "while they report back", self._state_file, len(tables), _few(waiting),
                    grace)

    # -- checkpoints ---------------------------------------------------------------------------

    def _load_checkpoint(self, root: Path) -> None:
        """Pick the newest complete checkpoint (skipping corrupt ones, said in the log and in
        status) and register its tables; they are loaded onto the servers once all registered."""
        start = time.monotonic()
        manifest, notes = ckpt.latest(root)
        self.checkpoints.verify_seconds = time.monotonic() - start
        for note in notes:
            log.warning("resume: %s", note)
        self.checkpoints.restore_notes = notes
        if manifest is None:
            if notes:
                raise CheckpointError(f"cannot resume from {root}: no complete checkpoint ("
                                      + "; ".join(notes) + ")")
            log.warning("resume: %s holds no checkpoint; starting a fresh job", root)
            self.checkpoints.restore_notes = [f"{root} held no checkpoint: fresh job"]
            return
        if notes:
            log.warning("resume: falling back to checkpoint %d", manifest.version)
        log.warning("resuming from checkpoint %d (%s): %d tables", manifest.version,
                    manifest.path, len(manifest.tables))
        self.checkpoints.restored_version = manifest.version
        self.checkpoints.floor = manifest.version
        self._restored_metadata = json.dumps(manifest.metadata)
        for name, spec in manifest.tables.items():
            placement = pb.TablePlacement(spec=spec, num_servers=self._config.num_servers)
            self._tables[name] = _Table(placement, owner=_RESTORE, restored=manifest.version)
        threading.Thread(target=self._restore, args=(manifest,), name="ps-restore",
                         daemon=True).start()

    def _restore(self, manifest: ckpt.Manifest) -> None:
        with self._cond:
            while len(self._by_role(pb.SERVER)) < self._config.num_servers:
                self._cond.wait(0.5)
            placements = {}
            for name, table in self._tables.items():
                if table.owner == _RESTORE:
                    self._place(table.placement)
                    placements[name] = table.placement
            servers = self._live_servers()
        error = ""
        try:
            self.checkpoints.restore(manifest, placements, servers)
            log.warning("restored %d tables from checkpoint %d", len(placements),
                        manifest.version)
        except ParamServerError as exc:
            error = f"restoring checkpoint {manifest.version} failed: {exc}"
            log.error("%s", error)
            self.checkpoints.restore_notes.append(error)
        with self._cond:
            for name in placements:
                table = self._tables[name]
                table.ready, table.error = not error, error
            self._save_state()
            self._cond.notify_all()

    def _call_all_servers(self, method: str, request: object, what: str,
                          timeout: float) -> dict:
        """Call every server of the job (all must be alive: a change of the step group must reach
        every one of them)."""
        now = time.monotonic()
        with self._cond:
            servers = self._by_role(pb.SERVER)
            down = [f"server-{r}" if r not in servers else self._describe(servers[r], now)
                    for r in range(self._config.num_servers)
                    if r not in servers or not self._alive(servers[r], now)]
            addresses = {r: n.address for r, n in servers.items()}
        if down:
            raise NodeUnavailableError(f"{what}: needs every server, and {', '.join(down)} "
                                       f"is not serving")
        return self.checkpoints.on_servers(addresses, method, request, what, timeout)

    def _watch_workers(self) -> None:
        """Synchronous jobs: act on workers of the step group that died or left."""
        assert self.sync_group is not None
        while True:
            time.sleep(min(1.0, self._config.heartbeat_interval / 2))
            now = time.monotonic()
            with self._cond:
                workers = {r: (n.incarnation, self._alive(n, now), n.left, self._describe(n, now))
                           for r, n in self._by_role(pb.WORKER).items()}
            try:
                self.sync_group.check(workers)
            except Exception:  # keep watching; the error is logged
                log.exception("checking the step group")

    def SyncJoin(self, request: pb.SyncJoinRequest, context: grpc.ServicerContext) -> pb.SyncJoinReply:
        def run() -> pb.SyncJoinReply:
            group, node = self._sync_caller(request.node_id, request.incarnation)
            first = group.join(node.rank, node.incarnation, request.timeout or 30.0)
            self._flush_state()
            return pb.SyncJoinReply(first_step=first)
        return rpc.abort_on(context, run)

    def SyncLeave(self, request: pb.SyncLeaveRequest, context: grpc.ServicerContext) -> pb.SyncLeaveReply:
        def run() -> pb.SyncLeaveReply:
            group, node = self._sync_caller(request.node_id, request.incarnation)
            group.leave(node.rank, node.incarnation, request.last_step)
            self._flush_state()
            return pb.SyncLeaveReply()
        return rpc.abort_on(context, run)

    def _sync_caller(self, node_id: str, incarnation: str) -> tuple[SyncGroup, _Node]:
        if self.sync_group is None:
            raise ValueError("this job is asynchronous: it has no step group")
        with self._cond:
            node = self._nodes.get(node_id)
        if node is None or node.role != pb.WORKER or (incarnation and
                                                      incarnation != node.incarnation):
            raise ValueError(f"{node_id!r} (incarnation {incarnation!r}) is not a current worker "
                             f"of this job")
        return self.sync_group, node

    # -- federated jobs (paramserver.rounds) ------------------------------------------------------

    def _worker_alive(self, node_id: str) -> bool:
        now = time.monotonic()
        with self._cond:
            node = self._nodes.get(node_id)
            return node is not None and node.role == pb.WORKER and self._alive(node, now)

    def _federated(self, node_id: str) -> RoundCoordinator:
        if self.rounds is None:
            raise ValueError("this job is not federated (start it with paramserver scheduler "
                             "--federated or paramserver launch --federated)")
        if not self._worker_alive(node_id):
            raise ValueError(f"{node_id!r} is not a live worker of this job: participants are "
                             f"hosted by a connected client")
        return self.rounds

    def FederatedJoin(self, request: pb.FederatedJoinRequest, context: grpc.ServicerContext) -> pb.FederatedJoinReply:
        return rpc.abort_on(context, lambda: pb.FederatedJoinReply(status=self._federated(
            request.node_id).join(request.node_id, list(request.participants))))

    def FederatedPoll(self, request: pb.RoundPollRequest, context: grpc.ServicerContext) -> pb.RoundPollReply:
        return rpc.abort_on(context, lambda: self._federated(request.node_id).poll(
            request.node_id, list(request.participants), request.wait,
            request.version_after))

    def FederatedReport(self, request: pb.RoundReportRequest, context: grpc.ServicerContext) -> pb.RoundReportReply:
        return rpc.abort_on(context, lambda: self._federated(request.node_id).report(
            request.node_id, request.participant, request.round, request.num_examples,
            request.attempt))

    def _live_servers(self) -> dict[int, str]:
        now = time.monotonic()
        with self._cond:
            return {r: n.address for r, n in self._by_role(pb.SERVER).items()
                    if self._alive(n, now)}

    def _ready_tables(self) -> dict[str, pb.TablePlacement]:
        with self._cond:
            return {name: t.placement for name, t in self._tables.items() if t.ready}

    def _place(self, placement: pb.TablePlacement, load: list[int] | None = None) -> None:
        """Fill a dense table's block placement (and its default block size), balancing over
        ``load`` (updated; default: the scheduler's, and the caller holds the lock)."""
        spec = placement.spec
        if spec.kind != pb.TableSpec.DENSE:
            return
        size = 1
        for d in spec.shape:
            size *= d
        if spec.block_size == 0:
            spec.block_size = default_block_size(size, self._config.num_servers)
        del placement.block_servers[:]
        placement.block_servers.extend(
            assign_blocks(size, spec.block_size, self._server_load if load is None else load))

    def _unload(self, placement: pb.TablePlacement) -> None:
        """Give a dropped dense table's elements back to the servers' load. Caller holds the
        lock."""
        spec = placement.spec
        if spec.kind != pb.TableSpec.DENSE or not placement.block_servers:
            return
        size = 1
        for d in spec.shape:
            size *= d
        for block, server in enumerate(placement.block_servers):
            self._server_load[server] -= min(spec.block_size, size - block * spec.block_size)

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointReply:
        def run() -> pb.CheckpointReply:
            if request.dir:  # servers write files where the caller says: the control plane's
                roles.require(roles.CONTROL_ONLY, "a checkpoint into a directory of the caller's "
                                                  "choosing (other roles checkpoint into the "
                                                  "job's own checkpoint directory only)")
            metadata = None
            if request.metadata_json:
                try:
                    metadata = json.loads(request.metadata_json)
                except json.JSONDecodeError as exc:
                    raise InvalidRequestError(f"checkpoint metadata is not JSON: {exc}") from None
                if not isinstance(metadata, dict):
                    raise InvalidRequestError("checkpoint metadata must be a JSON object")
            return self.checkpoints.checkpoint(metadata, request.dir, request.timeout or 600.0)
        return rpc.abort_on(context, run)

    def ListTables(self, request: pb.ListTablesRequest, context: grpc.ServicerContext) -> pb.ListTablesReply:
        with self._cond:
            return pb.ListTablesReply(tables=[
                t.placement for name, t in sorted(self._tables.items())
                if (t.ready or request.include_pending)
                and (not request.name or name == request.name)])

    # -- liveness ------------------------------------------------------------------------------

    def _alive(self, node: _Node, now: float) -> bool:
        return not node.left and (now - node.last_heartbeat <= self._config.heartbeat_timeout
                                  or now < node.grace_until)

    def _describe(self, node: _Node, now: float) -> str:
        if node.left:
            return f"{node.node_id} at {node.address or node.hostname} (left the job)"
        if node.grace_until:
            return (f"{node.node_id} at {node.address or node.hostname} (pid {node.pid}, not "
                    f"heard from since the scheduler restarted "
                    f"{now - node.last_heartbeat:.1f} s ago)")
        return (f"{node.node_id} at {node.address or node.hostname} (pid {node.pid}, "
                f"last heartbeat {now - node.last_heartbeat:.1f} s ago)")

    def _by_role(self, role: int) -> dict[int, _Node]:
        return {n.rank: n for n in self._nodes.values() if n.role == role}

    # -- membership ----------------------------------------------------------------------------

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        return rpc.abort_on(context, lambda: self._register(request))

    def _register(self, request: pb.RegisterRequest) -> pb.RegisterReply:
        if request.role not in _ROLE_NAMES:
            raise ValueError(f"cannot register role {request.role}; expected SERVER or WORKER")
        if request.role == pb.SERVER:
            roles.require(roles.CONTROL_ONLY, "registering as a server")
            if not request.address:
                raise ValueError("a server must register with the address it serves on")
        now = time.monotonic()
        with self._cond:
            if request.role == pb.WORKER and request.num_workers > 0:
                if self._num_workers == 0:
                    self._num_workers = request.num_workers
                    self._save_state()
                elif self._num_workers != request.num_workers:
                    raise TableMismatchError(
                        f"worker expects a job of {request.num_workers} workers, the scheduler "
                        f"has {self._num_workers}")
            limit = self._config.num_servers if request.role == pb.SERVER else self._num_workers
            taken = self._by_role(request.role)
            name = _ROLE_NAMES[request.role]
            rank = request.requested_rank
            if rank >= 0:
                if limit and rank >= limit:
                    raise ValueError(f"{name} rank {rank} out of range [0, {limit})")
                old = taken.get(rank)
                if old is not None and self._alive(old, now) and not request.replace \
                        and not self._same_node(old, request):
                    raise TableMismatchError(
                        f"{name} rank {rank} is held by live node {self._describe(old, now)}")
            else:
                # The lowest free rank; a dead or departed node's rank is reused (restart).
                free = [r for r in range(limit or len(taken) + 1)
                        if r not in taken or not self._alive(taken[r], now)]
                if not free:
                    raise TableMismatchError(
                        f"all {limit} {name} ranks are held by live nodes; the job expects "
                        f"{limit} {name}s")
                rank = free[0]
            previous = taken.get(rank)
            # A node registering again after this scheduler's restart keeps its incarnation
            # (whether the saved state listed it or not): it is the same node, not a restart.
            rejoin = previous is None or self._same_node(previous, request)
            incarnation = (request.incarnation if request.incarnation and rejoin
                           else uuid.uuid4().hex[:16])
            node = _Node(request.role, rank, f"{name}-{rank}", request.address, request.pid,
                         request.hostname, now, incarnation=incarnation)
            restoring = False
            if previous is not None and rejoin:
                node.restarts, node.rolled_back = previous.restarts, previous.rolled_back
                node.stats, node.transport = previous.stats, previous.transport
                log.info("%s (incarnation %s) reported back", node.node_id, incarnation)
            elif previous is not None:
                # A new incarnation of the rank: the old one is fenced from now on.
                node.restarts = previous.restarts + 1
                node.rolled_back = previous.rolled_back
                log.warning("%s registered again (restart %d): incarnation %s replaces %s",
                            node.node_id, node.restarts, node.incarnation, previous.incarnation)
                if request.role == pb.SERVER and self._shards_on(rank):
                    restoring = True
                    node.restore_state = "restoring"
                    threading.Thread(target=self._recover_server, args=(node, previous.stats),
                                     name=f"ps-recover-{rank}", daemon=True).start()
            self._nodes[node.node_id] = node
            self._view_version += 1
            self._save_state()
            self._cond.notify_all()
            reply = pb.RegisterReply(rank=rank, node_id=node.node_id,
                                    heartbeat_interval=self._config.heartbeat_interval,
                                    num_servers=self._config.num_servers,
                                    num_workers=self._num_workers,
                                    restored_version=self.checkpoints.restored_version,
                                    restored_metadata_json=self._restored_metadata,
                                    incarnation=node.incarnation, restoring=restoring,
                                    view_version=self._view_version,
                                    sync=str(self.consistency),
                                    on_worker_failure=self._config.on_worker_failure,
                                    sync_members=(self.sync_group.members()
                                                  if self.sync_group is not None else []))
        # On disk before the node is answered: a scheduler restarted after this knows the node
        # (and serves its calls) before it reports back.
        self._flush_state()
        return reply

    @staticmethod
    def _same_node(node: _Node, request: pb.RegisterRequest) -> bool:
        """Whether ``request`` registers ``node`` again (same incarnation: the scheduler
        restarted, or the node missed its answer), rather than a new process for its rank."""
        return bool(request.incarnation) and request.incarnation == node.incarnation \
            and not node.left

    def _shards_on(self, rank: int) -> list[str]:
        """Ready tables with a shard on server ``rank``. Caller holds the lock."""
        return [name for name, t in self._tables.items() if t.ready and (
            t.placement.spec.kind == pb.TableSpec.EMBEDDING or rank in t.placement.block_servers)]

    def _recover_server(self, node: _Node, last_stats: pb.ServerStats) -> None:
        """Load a restarted server's shards from the newest complete checkpoint; the tables no
        checkpoint has are recreated from their initializers or saved initial values (a rollback
        to version 0); only a table given initial values that were not saved (no checkpoint
        directory) is reported lost to it (it refuses requests for it, naming it)."""
        with self._cond:
            tables = {n: self._tables[n].placement for n in self._shards_on(node.rank)}
            given = {n for n in tables if self._tables[n].given}
        root = self.checkpoints.root
        manifest, notes = (ckpt.latest(root, self.checkpoints.floor) if root is not None
                           else (None, []))
        for note in notes:
            log.warning("recovering %s: %s", node.node_id, note)
        restorable = {n: p for n, p in tables.items() if manifest is not None
                      and n in manifest.tables and specs_match(manifest.tables[n], p.spec)}
        fresh: dict[str, pb.TablePlacement] = {}
        saved: dict[str, ckpt.Manifest] = {}
        lost: list[str] = []
        at_cut = self.checkpoints.cut_stats(manifest.version, node.rank) if manifest else None
        rolled: dict[str, int] = {}
        if at_cut is not None:
            before = {t.name: t.updates for t in at_cut.tables}
            rolled = {t.name: max(0, t.updates - before.get(t.name, 0))
                      for t in last_stats.tables if t.name in restorable}
        try:
            for name, placement in sorted(tables.items()):
                if name in restorable:
                    continue
                entry = (initial.find(root, placement.spec)
                         if root is not None and placement.spec.kind == pb.TableSpec.DENSE
                         else None)
                if entry is not None:
                    saved[name] = entry
                elif name in given:
                    lost.append(name)
                    continue
                fresh[name] = placement
            # Recreated tables roll back every update they had.
            rolled.update({t.name: t.updates for t in last_stats.tables if t.name in fresh})
            self.checkpoints.restore_server(node.rank, node.address, manifest, restorable, lost,
                                            at_cut, fresh, saved)
            parts = [f"restored from checkpoint {manifest.version}"] if manifest and restorable \
                else []
            if fresh:
                parts.append(f"recreated from initial values (rollback to version 0): "
                             f"{', '.join(sorted(fresh))}")
            if lost:
                parts.append(f"lost: {', '.join(lost)}")
            state = "; ".join(parts)
            what = ", ".join(f"{n}: {c}" for n, c in sorted(rolled.items())) or "unknown"
            if manifest is not None and restorable:
                log.warning("%s restored %d tables from checkpoint %d; updates rolled back (at "
                            "least, per table): %s", node.node_id, len(restorable),
                            manifest.version, what)
            if fresh:
                log.warning("%s recreated tables %s from their initial values: no checkpoint "
                            "has them (rollback to version 0; updates rolled back, at least, "
                            "per table: %s)", node.node_id, sorted(fresh), what)
            if lost:
                log.error("%s lost tables %s: no checkpoint has them and their initial values "
                          "were not saved", node.node_id, lost)
        except ParamServerError as exc:
            state = f"restore failed: {exc}"
            log.error("recovering %s: %s", node.node_id, exc)
            rolled = {}
        with self._cond:
            node.restore_state = state
            node.rolled_back += sum(rolled.values())
            self._view_version += 1
            self._cond.notify_all()

    @staticmethod
    def _speaks_for(node: _Node | None, context: grpc.ServicerContext, what: str) -> None:
        """Only the control plane speaks for a server (its heartbeats, its departure)."""
        if node is not None and node.role == pb.SERVER:
            rpc.abort_on(context, lambda: roles.require(roles.CONTROL_ONLY, what))

    def Deregister(self, request: pb.DeregisterRequest, context: grpc.ServicerContext) -> pb.DeregisterReply:
        with self._cond:
            node = self._nodes.get(request.node_id)
            self._speaks_for(node, context, "deregistering a server")
            if node is not None and (not request.incarnation
                                     or request.incarnation == node.incarnation):
                node.left = True
                self._view_version += 1
                self._save_state()
                self._cond.notify_all()
        self._flush_state()  # a restarted scheduler must not wait for a node that left
        return pb.DeregisterReply()

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        with self._cond:
            node = self._nodes.get(request.node_id)
            self._speaks_for(node, context, "a server's heartbeat")
            if node is not None and request.incarnation and request.incarnation != node.incarnation:
                return pb.HeartbeatReply(known=True, superseded=True)  # fenced: changes nothing
            if node is None or node.left:
                return pb.HeartbeatReply(known=False)
            node.last_heartbeat = time.monotonic()
            node.grace_until = 0.0
            if request.HasField("stats"):
                node.stats = request.stats
            if request.transport:
                node.transport = request.transport
            return pb.HeartbeatReply(known=True)

    def _cluster(self, now: float) -> pb.ClusterView:
        view = pb.ClusterView(num_servers=self._config.num_servers, num_workers=self._num_workers,
                              version=self._view_version)
        for node in sorted(self._nodes.values(), key=lambda n: (n.role, n.rank)):
            view.nodes.append(pb.NodeInfo(
                role=node.role, rank=node.rank, node_id=node.node_id, address=node.address,
                alive=self._alive(node, now), last_heartbeat_age=now - node.last_heartbeat,
                pid=node.pid, hostname=node.hostname, left=node.left,
                incarnation=node.incarnation, restarts=node.restarts,
                rolled_back=node.rolled_back, restore_state=node.restore_state,
                transport=node.transport))
        return view

    def GetCluster(self, request: pb.ClusterRequest, context: grpc.ServicerContext) -> pb.ClusterView:
        deadline = time.monotonic() + max(0.0, request.timeout)
        with self._cond:
            while request.wait_for_servers:
                now = time.monotonic()
                servers = self._by_role(pb.SERVER)
                if len(servers) >= self._config.num_servers:
                    break
                if now >= deadline:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"only {len(servers)} of {self._config.num_servers} servers "
                                  f"registered after {request.timeout:.1f} s "
                                  f"(registered: {sorted(n.node_id for n in servers.values())})")
                self._cond.wait(min(deadline - now, 0.5))
            return self._cluster(time.monotonic())

    # -- tables --------------------------------------------------------------------------------

    def DeclareTable(self, request: pb.DeclareTableRequest, context: grpc.ServicerContext) -> pb.DeclareTableReply:
        def run() -> pb.DeclareTableReply:
            reply = self._declare(request)
            if reply.action == pb.DeclareTableReply.INITIALIZE:
                # The shards are created here, with the control credential (paramserver.tablectl).
                try:
                    tablectl.create_shards(self.checkpoints.on_servers, reply.placement,
                                           self._live_servers())
                except ParamServerError as exc:
                    self._abandon(request.spec.name, request.node_id, str(exc))
                    raise
            return reply
        return rpc.abort_on(context, run)

    @staticmethod
    def _check_spec(spec: pb.TableSpec) -> None:
        if not spec.name:
            raise ValueError("a table needs a non-empty name")
        optimizer_from_spec(spec.optimizer)  # raises ValueError naming a bad hyperparameter
        if spec.kind == pb.TableSpec.DENSE:
            if not spec.shape or any(d <= 0 for d in spec.shape):
                raise ValueError(f"table {spec.name!r}: shape must have positive dimensions, got "
                                 f"{tuple(spec.shape)}")
            if spec.block_size < 0:  # 0: the default for the job's server count
                raise ValueError(f"table {spec.name!r}: block_size must be > 0, got {spec.block_size}")
            size = 1
            for d in spec.shape:
                size *= d
            blocks = -(-size // (spec.block_size or DEFAULT_BLOCK_SIZE))
            if size > _MAX_ELEMENTS or blocks > _MAX_BLOCKS:
                raise ValueError(f"table {spec.name!r}: {size} elements in {blocks} blocks is "
                                 f"more than any set of servers holds (limits: {_MAX_ELEMENTS} "
                                 f"elements, {_MAX_BLOCKS} blocks)")
        elif spec.kind == pb.TableSpec.EMBEDDING:
            if spec.dim <= 0:
                raise ValueError(f"table {spec.name!r}: dim must be > 0, got {spec.dim}")
        else:
            raise ValueError(f"table {spec.name!r}: unknown kind {spec.kind}")

    def _declare(self, request: pb.DeclareTableRequest) -> pb.DeclareTableReply:
        spec = request.spec
        self._check_spec(spec)
        now = time.monotonic()
        with self._cond:
            exists = spec.name in self._tables
            load = list(self._server_load)
        placement = None
        if not exists:
            # Placement work (a loop over every block) runs outside the lock, on a copy of the
            # servers' load; it is committed below unless another declaration won meanwhile.
            placement = pb.TablePlacement(spec=spec, num_servers=self._config.num_servers)
            before = list(load)
            self._place(placement, load)
            added = [after - b for after, b in zip(load, before)]
        with self._cond:
            servers = self._by_role(pb.SERVER)
            if len(servers) < self._config.num_servers:
                raise NodeUnavailableError(
                    f"cannot place table {spec.name!r}: only {len(servers)} of "
                    f"{self._config.num_servers} servers have registered")
            table = self._tables.get(spec.name)
            if table is None and placement is not None:
                for server, extra in enumerate(added):
                    self._server_load[server] += extra
                self._tables[spec.name] = _Table(placement, owner=request.node_id)
                return pb.DeclareTableReply(action=pb.DeclareTableReply.INITIALIZE,
                                            placement=placement)
            if table is None:  # it existed a moment ago and is gone: ask again
                return pb.DeclareTableReply(action=pb.DeclareTableReply.WAIT)
            if not specs_match(table.placement.spec, spec):
                origin = (f"was restored from checkpoint {table.restored} as" if table.restored
                          else "exists as")
                raise TableMismatchError(
                    f"table {spec.name!r} {origin} {describe_spec(table.placement.spec)}; "
                    f"it was declared {'' if table.restored else 'again '}as "
                    f"{describe_spec(spec)}")
            if table.error:
                raise CheckpointError(f"table {spec.name!r}: {table.error}")
            if table.ready:
                action = pb.DeclareTableReply.ATTACH
            elif table.owner in (_RESTORE, _DROPPING):
                action = pb.DeclareTableReply.WAIT
            elif table.owner == request.node_id:
                action = pb.DeclareTableReply.INITIALIZE
            else:
                owner = self._nodes.get(table.owner)
                if owner is None or not self._alive(owner, now):
                    table.owner = request.node_id  # the initializer died: take over
                    action = pb.DeclareTableReply.INITIALIZE
                else:
                    action = pb.DeclareTableReply.WAIT
            return pb.DeclareTableReply(action=action, placement=table.placement)

    def TableReady(self, request: pb.TableReadyRequest, context: grpc.ServicerContext) -> pb.TableReadyReply:
        def check() -> _Table:
            table = self._tables.get(request.name)
            if table is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no table {request.name!r}")
            assert table is not None  # abort raises
            if table.owner != request.node_id:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{request.node_id} does not own the initialization of "
                              f"{request.name!r} ({table.owner} does)")
            return table

        with self._cond:
            placement = check().placement
        # Before the table is ready nothing but its initializer has written it: its initial
        # values are saved now (outside the lock: the servers write them), or the table fails.
        rpc.abort_on(context, lambda: self.checkpoints.save_initial(placement,
                                                                    request.initial_values))
        with self._cond:
            table = check()
            table.given = request.initial_values
            table.ready = True
            self._save_state()
            self._cond.notify_all()
        return pb.TableReadyReply()

    def AbandonTable(self, request: pb.AbandonTableRequest, context: grpc.ServicerContext) -> pb.AbandonTableReply:
        self._abandon(request.name, request.node_id, request.reason)
        return pb.AbandonTableReply()

    def _abandon(self, name: str, node_id: str, reason: str) -> None:
        """Forget a table whose initialization by ``node_id`` failed and drop its shards on the
        servers (best effort: a failed drop is logged)."""
        with self._cond:
            table = self._tables.get(name)
            if table is None or table.ready or table.owner != node_id:
                return
            table.owner = _DROPPING
            log.warning("table %r abandoned by %s: %s", name, node_id, reason[:500])
        try:
            tablectl.drop_shards(self.checkpoints.on_servers, name, self._live_servers())
        except ParamServerError as exc:
            log.warning("dropping the shards of abandoned table %r: %s", name, exc)
        finally:
            with self._cond:
                del self._tables[name]
                self._unload(table.placement)
                self._cond.notify_all()

    # -- barriers ------------------------------------------------------------------------------

    def Barrier(self, request: pb.BarrierRequest, context: grpc.ServicerContext) -> pb.BarrierReply:
        return rpc.abort_on(context, lambda: self._barrier(request))

    def _barrier(self, request: pb.BarrierRequest) -> pb.BarrierReply:
        final = request.timeout <= _BARRIER_POLL
        with self._cond:
            if request.node_id not in self._nodes:
                raise ValueError(f"{request.node_id!r} is not registered")
            barrier = self._barriers.setdefault(request.name, _Barrier())
            if request.waiting:
                generation = request.waiting - 1
                if barrier.generation > generation:
                    return pb.BarrierReply(generation=generation)
            else:
                generation = barrier.generation
            barrier.arrived.add(request.node_id)
            # Waiting holds a handler thread: only up to half of them, so heartbeats and
            # everything else always find one; the other callers poll.
            may_wait = final or self._waiting < self._config.max_threads // 2
            deadline = time.monotonic() + (min(request.timeout, _BARRIER_POLL) if may_wait else 0)
            self._waiting += may_wait
            try:
                while True:
                    now = time.monotonic()
                    workers = self._by_role(pb.WORKER)
                    expected = self._num_workers
                    if not expected:
                        barrier.arrived.discard(request.node_id)
                        raise ValueError(
                            f"barrier {request.name!r}: the job size is unknown (start the "
                            f"scheduler with --num-workers, or connect workers with "
                            f"num_workers / PARAMSERVER_NUM_WORKERS)")
                    if len(barrier.arrived) >= expected:
                        barrier.generation += 1
                        barrier.arrived.clear()
                        self._cond.notify_all()
                        return pb.BarrierReply(generation=generation)
                    if barrier.generation != generation:
                        return pb.BarrierReply(generation=generation)
                    missing = [f"worker-{r}" for r in range(expected)
                               if f"worker-{r}" not in barrier.arrived]
                    dead = [self._describe(workers[r], now) for r in range(expected)
                            if r in workers and f"worker-{r}" not in barrier.arrived
                            and not self._alive(workers[r], now)]
                    if dead or (final and now >= deadline):
                        barrier.arrived.discard(request.node_id)
                        if dead:
                            raise NodeUnavailableError(
                                f"barrier {request.name!r} cannot complete: {_few(dead)} "
                                f"{'is' if len(dead) == 1 else 'are'} dead")
                        raise PSTimeoutError(
                            f"barrier {request.name!r} timed out after "
                            f"{request.total or request.timeout:.1f} s: {len(barrier.arrived) + 1}"
                            f" of {expected} workers arrived; waiting for {_few(missing)}")
                    if now >= deadline:
                        return pb.BarrierReply(generation=generation, pending=True)
                    self._cond.wait(min(deadline - now, 0.25))
            finally:
                self._waiting -= may_wait

    # -- status --------------------------------------------------------------------------------

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        now = time.monotonic()
        with self._cond:  # copy what is needed; the reply is built outside the lock
            reply = pb.StatusReply(cluster=self._cluster(now), uptime=now - self._started,
                                   checkpoint=self.checkpoints.status(),
                                   sync=str(self.consistency),
                                   on_worker_failure=self._config.on_worker_failure)
            servers = self._by_role(pb.SERVER)
            n = self._config.num_servers
            stats = [servers[r].stats if r in servers else pb.ServerStats() for r in range(n)]
            tables = [(name, t.placement, t.ready) for name, t in sorted(self._tables.items())]
        reply.server_stats.extend(stats)
        if self.sync_group is not None:
            reply.sync_members.extend(self.sync_group.members())
        if self.rounds is not None:
            reply.federated.CopyFrom(self.rounds.status())
        held = [{t.name: t for t in stats[r].tables} for r in range(n)]
        for name, placement, ready in tables:
            status = pb.TableStatus(spec=placement.spec, ready=ready)
            blocks = [0] * n
            for server in placement.block_servers:
                blocks[server] += 1
            status.blocks_per_server.extend(blocks)
            status.rows_per_server.extend(
                held[r][name].rows if name in held[r] else 0 for r in range(n))
            status.bytes_per_server.extend(
                held[r][name].bytes if name in held[r] else 0 for r in range(n))
            reply.tables.append(status)
        return reply


class Scheduler:
    """A scheduler node: a gRPC server running the Scheduler service and the health service.

    ``start()`` binds and serves in background threads and returns; ``address`` then gives the
    ``host:port`` nodes connect to (useful with port 0). Thread safe.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._server = rpc.make_server(config.max_threads, config.security)
        self._service = _SchedulerService(config)
        pb_grpc.add_SchedulerServicer_to_server(self._service, self._server)
        self._health = rpc.serve_health(self._server)
        self._port = rpc.bind(self._server, config.host, config.port, config.security)

    @property
    def address(self) -> str:
        """``host:port`` the scheduler serves on."""
        return f"{self.config.host}:{self._port}"

    def start(self) -> Scheduler:
        """Start serving (non-blocking) and report SERVING on the health service; start
        periodic checkpoints if configured."""
        self._server.start()
        self._health.set("", rpc.health_pb2.HealthCheckResponse.SERVING)
        log.info("scheduler serving on %s (protection: %s)", self.address,
                 self.config.security.protection)
        if self.config.checkpoint_every > 0:
            self._service.checkpoints.start_periodic(self.config.checkpoint_every)
        if self._service.rounds is not None:
            self._service.rounds.start()
        return self

    def checkpoint(self, metadata: dict | None = None, timeout: float = 600.0) -> dict:
        """Take a checkpoint now (as :meth:`paramserver.Client.checkpoint`); block until durable."""
        from paramserver.coordinator import checkpoint_reply_to_dict
        return checkpoint_reply_to_dict(
            self._service.checkpoints.checkpoint(None if metadata is None else dict(metadata), "",
                                                 timeout))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` seconds pass); True if it stopped."""
        # grpc returns True when the wait timed out.
        return not self._server.wait_for_termination(timeout)

    def stop(self, grace: float = 1.0) -> None:
        """Stop periodic checkpoints (letting one in progress finish), then stop serving;
        in-flight calls get ``grace`` seconds to finish."""
        self._service.checkpoints.close()
        if self._service.rounds is not None:
            self._service.rounds.close()
        self._service.close_state()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
