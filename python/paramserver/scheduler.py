"""The scheduler: membership, the partition map, barriers, heartbeats and cluster status.

One per job, on the control path only (tensors never pass through it). Nodes register and get ranks;
workers declare tables here, and the scheduler decides which server holds which block and which
worker initializes a new table. Liveness is computed from heartbeats: a node silent for longer than
``heartbeat_timeout`` is reported dead in status, in barrier errors and to workers asking about a
server they cannot reach.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from paramserver import rpc
from paramserver.config import SchedulerConfig
from paramserver.errors import (
    NodeUnavailableError,
    PSTimeoutError,
    TableMismatchError,
)
from paramserver.partition import assign_blocks
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import describe_spec, optimizer_from_spec, specs_match

__all__ = ["Scheduler"]

_ROLE_NAMES = {pb.SERVER: "server", pb.WORKER: "worker"}


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


@dataclass
class _Table:
    placement: pb.TablePlacement
    owner: str
    ready: bool = False


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

    # -- liveness ------------------------------------------------------------------------------

    def _alive(self, node: _Node, now: float) -> bool:
        return not node.left and now - node.last_heartbeat <= self._config.heartbeat_timeout

    def _describe(self, node: _Node, now: float) -> str:
        if node.left:
            return f"{node.node_id} at {node.address or node.hostname} (left the job)"
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
        if request.role == pb.SERVER and not request.address:
            raise ValueError("a server must register with the address it serves on")
        now = time.monotonic()
        with self._cond:
            if request.role == pb.WORKER and request.num_workers > 0:
                if self._num_workers == 0:
                    self._num_workers = request.num_workers
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
                if old is not None and self._alive(old, now):
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
            node = _Node(request.role, rank, f"{name}-{rank}", request.address, request.pid,
                         request.hostname, now)
            self._nodes[node.node_id] = node
            self._cond.notify_all()
            return pb.RegisterReply(rank=rank, node_id=node.node_id,
                                    heartbeat_interval=self._config.heartbeat_interval,
                                    num_servers=self._config.num_servers,
                                    num_workers=self._num_workers)

    def Deregister(self, request: pb.DeregisterRequest, context: grpc.ServicerContext) -> pb.DeregisterReply:
        with self._cond:
            node = self._nodes.get(request.node_id)
            if node is not None:
                node.left = True
                self._cond.notify_all()
        return pb.DeregisterReply()

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        with self._cond:
            node = self._nodes.get(request.node_id)
            if node is None or node.left:
                return pb.HeartbeatReply(known=False)
            node.last_heartbeat = time.monotonic()
            if request.HasField("stats"):
                node.stats = request.stats
            return pb.HeartbeatReply(known=True)

    def _cluster(self, now: float) -> pb.ClusterView:
        view = pb.ClusterView(num_servers=self._config.num_servers, num_workers=self._num_workers)
        for node in sorted(self._nodes.values(), key=lambda n: (n.role, n.rank)):
            view.nodes.append(pb.NodeInfo(
                role=node.role, rank=node.rank, node_id=node.node_id, address=node.address,
                alive=self._alive(node, now), last_heartbeat_age=now - node.last_heartbeat,
                pid=node.pid, hostname=node.hostname, left=node.left))
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
        return rpc.abort_on(context, lambda: self._declare(request))

    @staticmethod
    def _check_spec(spec: pb.TableSpec) -> None:
        if not spec.name:
            raise ValueError("a table needs a non-empty name")
        optimizer_from_spec(spec.optimizer)  # raises ValueError naming a bad hyperparameter
        if spec.kind == pb.TableSpec.DENSE:
            if not spec.shape or any(d <= 0 for d in spec.shape):
                raise ValueError(f"table {spec.name!r}: shape must have positive dimensions, got "
                                 f"{tuple(spec.shape)}")
            if spec.block_size <= 0:
                raise ValueError(f"table {spec.name!r}: block_size must be > 0, got {spec.block_size}")
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
            servers = self._by_role(pb.SERVER)
            if len(servers) < self._config.num_servers:
                raise NodeUnavailableError(
                    f"cannot place table {spec.name!r}: only {len(servers)} of "
                    f"{self._config.num_servers} servers have registered")
            table = self._tables.get(spec.name)
            if table is None:
                placement = pb.TablePlacement(spec=spec, num_servers=self._config.num_servers)
                if spec.kind == pb.TableSpec.DENSE:
                    size = 1
                    for d in spec.shape:
                        size *= d
                    placement.block_servers.extend(
                        assign_blocks(size, spec.block_size, self._server_load))
                self._tables[spec.name] = _Table(placement, owner=request.node_id)
                return pb.DeclareTableReply(action=pb.DeclareTableReply.INITIALIZE,
                                            placement=placement)
            if not specs_match(table.placement.spec, spec):
                raise TableMismatchError(
                    f"table {spec.name!r} exists as {describe_spec(table.placement.spec)}; "
                    f"it was declared again as {describe_spec(spec)}")
            if table.ready:
                action = pb.DeclareTableReply.ATTACH
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
        with self._cond:
            table = self._tables.get(request.name)
            if table is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no table {request.name!r}")
            if table.owner != request.node_id:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{request.node_id} does not own the initialization of "
                              f"{request.name!r} ({table.owner} does)")
            table.ready = True
            self._cond.notify_all()
        return pb.TableReadyReply()

    # -- barriers ------------------------------------------------------------------------------

    def Barrier(self, request: pb.BarrierRequest, context: grpc.ServicerContext) -> pb.BarrierReply:
        return rpc.abort_on(context, lambda: self._barrier(request))

    def _barrier(self, request: pb.BarrierRequest) -> pb.BarrierReply:
        deadline = time.monotonic() + request.timeout
        with self._cond:
            if request.node_id not in self._nodes:
                raise ValueError(f"{request.node_id!r} is not registered")
            barrier = self._barriers.setdefault(request.name, _Barrier())
            generation = barrier.generation
            barrier.arrived.add(request.node_id)
            while True:
                now = time.monotonic()
                workers = self._by_role(pb.WORKER)
                expected = self._num_workers or len(workers)
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
                if dead or now >= deadline:
                    barrier.arrived.discard(request.node_id)
                    if dead:
                        raise NodeUnavailableError(
                            f"barrier {request.name!r} cannot complete: {', '.join(dead)} is dead")
                    raise PSTimeoutError(
                        f"barrier {request.name!r} timed out after {request.timeout:.1f} s: "
                        f"{len(barrier.arrived) + 1} of {expected} workers arrived; waiting for "
                        f"{', '.join(missing)}")
                self._cond.wait(min(deadline - now, 0.25))

    # -- status --------------------------------------------------------------------------------

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        now = time.monotonic()
        with self._cond:
            reply = pb.StatusReply(cluster=self._cluster(now), uptime=now - self._started)
            servers = self._by_role(pb.SERVER)
            n = self._config.num_servers
            stats = [servers[r].stats if r in servers else pb.ServerStats() for r in range(n)]
            reply.server_stats.extend(stats)
            for name in sorted(self._tables):
                table = self._tables[name]
                status = pb.TableStatus(spec=table.placement.spec, ready=table.ready)
                held = {r: {t.name: t for t in stats[r].tables} for r in range(n)}
                blocks = [0] * n
                for server in table.placement.block_servers:
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
        """Start serving (non-blocking) and report SERVING on the health service."""
        self._server.start()
        self._health.set("", rpc.health_pb2.HealthCheckResponse.SERVING)
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` seconds pass); True if it stopped."""
        # grpc returns True when the wait timed out.
        return not self._server.wait_for_termination(timeout)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds to finish."""
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
