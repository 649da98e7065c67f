"""A node's membership in a job: registration with the scheduler, heartbeats, departure.

Used by servers and workers alike. Registration retries while the scheduler is unreachable (nodes of
a job may start in any order) until ``timeout``, then fails naming the scheduler's address.

Every registration gets an incarnation id from the scheduler; heartbeats and the departure carry it,
and the scheduler refuses those of an older incarnation of the same rank. A node whose scheduler no
longer knows it (the scheduler restarted) registers again by itself with its rank; a node told it
was superseded (a newer incarnation took its rank) stops heartbeating and calls ``on_superseded``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from paramserver import rpc
from paramserver.config import Security
from paramserver.errors import NodeUnavailableError, PSTimeoutError
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc

__all__ = ["Membership"]

log = logging.getLogger(__name__)

#: Seconds between the log lines of a node still waiting for its scheduler to answer.
REPORT_EVERY = 5.0

_ROLE_NAMES = {pb.SERVER: "server", pb.WORKER: "worker"}


@contextlib.contextmanager
def waiting_for(who: str, what: str, timeout: float, hint: str = "") -> Iterator[None]:
    """While the block runs, log every :data:`REPORT_EVERY` seconds that ``who`` is still
    waiting for ``what``, for how long so far and when it gives up (``timeout`` seconds)."""
    start = time.monotonic()
    done = threading.Event()

    def report() -> None:
        while not done.wait(REPORT_EVERY):
            log.warning("%s: still waiting for %s: %.0f s so far, giving up after %.0f s%s", who,
                        what, time.monotonic() - start, timeout, hint)

    threading.Thread(target=report, name="ps-waiting", daemon=True).start()
    try:
        yield
    finally:
        done.set()


class Membership:
    """Registers one node with the scheduler and keeps it alive with heartbeats.

    Args:
        scheduler: ``host:port`` of the scheduler.
        role: ``pb.SERVER`` or ``pb.WORKER``.
        address: the ``host:port`` a server serves on ("" for workers).
        requested_rank: rank to ask for, -1 for any.
        num_workers: job size a worker expects (0: unknown).
        timeout: seconds to keep trying to reach the scheduler, and the deadline of each call.
        stats: called before each heartbeat for a server's statistics (None for workers).
        security: the job token (and TLS) for the calls to the scheduler.
        transport: workers: called before each heartbeat for how their data travels (shown by
            ``paramserver status``).

    Raises (from the constructor):
        NodeUnavailableError: the scheduler stayed unreachable for ``timeout`` seconds.
        TableMismatchError: the rank is held by a live node, or the job is full.
        AuthenticationError: the scheduler refused this node's token.
    """

    def __init__(self, scheduler: str, role: int, *, address: str = "", requested_rank: int = -1,
                 num_workers: int = 0, timeout: float = 30.0,
                 stats: Callable[[], pb.ServerStats] | None = None, replace: bool = False,
                 on_superseded: Callable[[], None] | None = None,
                 security: Security = Security(),
                 transport: Callable[[], str] | None = None) -> None:
        self.scheduler = scheduler
        self._transport = transport
        self._timeout = timeout
        self._stats = stats
        self._on_superseded = on_superseded
        self._security = security
        self._channel = rpc.make_channel(scheduler, security)
        self.stub = pb_grpc.SchedulerStub(self._channel)
        self._request = pb.RegisterRequest(role=role, address=address,
                                           requested_rank=requested_rank,
                                           num_workers=num_workers, pid=os.getpid(),
                                           hostname=socket.gethostname(), replace=replace)
        self.reply = self._register(self._request)
        self.rank: int = self.reply.rank
        self.node_id: str = self.reply.node_id
        self.incarnation: str = self.reply.incarnation
        self.reregistrations = 0
        self.superseded = False
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._beat, name=f"ps-heartbeat-{self.node_id}",
                                        daemon=True)
        self._thread.start()

    def _register(self, request: pb.RegisterRequest) -> pb.RegisterReply:
        """Register, retrying until the timeout; meanwhile say every few seconds what is awaited
        (a wrong address or a scheduler not up yet is never a silent minute)."""
        with waiting_for(_ROLE_NAMES.get(request.role, "node"),
                         f"the scheduler at {self.scheduler} to answer its registration",
                         self._timeout, " (is the address right? --scheduler / "
                                        "PARAMSERVER_SCHEDULER)"):
            return self._register_until_timeout(request)

    def _register_until_timeout(self, request: pb.RegisterRequest) -> pb.RegisterReply:
        deadline = time.monotonic() + self._timeout
        delay = 0.05
        while True:
            try:
                return self.stub.Register(request, timeout=max(0.1, deadline - time.monotonic()),
                                          wait_for_ready=True)
            except grpc.RpcError as error:
                code = error.code()
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._channel.close()
                    raise rpc.translate(error, "register", "scheduler", self.scheduler) from None
                if time.monotonic() + delay >= deadline:
                    self._channel.close()
                    raise NodeUnavailableError(
                        f"scheduler at {self.scheduler} unreachable: could not register within "
                        f"{self._timeout:.1f} s ({error.details()}"
                        f"{rpc.tls_hint(self._security)})") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _beat(self) -> None:
        interval = self.reply.heartbeat_interval
        warned = False
        while not self._stop.wait(interval):
            request = pb.HeartbeatRequest(node_id=self.node_id, incarnation=self.incarnation)
            if self._stats is not None:
                request.stats.CopyFrom(self._stats())
            if self._transport is not None:
                request.transport = self._transport()
            try:
                reply = self.stub.Heartbeat(request, timeout=max(interval, 1.0))
                if reply.superseded:
                    log.error("%s (incarnation %s) was superseded by a newer incarnation of its "
                              "rank; stopping", self.node_id, self.incarnation)
                    self.superseded = True
                    if self._on_superseded is not None:
                        self._on_superseded()
                    return
                if not reply.known:
                    self._reregister()
                warned = False
            except grpc.RpcError as error:
                if not warned:
                    log.warning("heartbeat of %s to scheduler at %s failed: %s", self.node_id,
                                self.scheduler, error.details())
                    warned = True
            except ValueError:  # the channel was closed under us during shutdown
                return

    def _reregister(self) -> None:
        """The scheduler does not know this node (it restarted): register again, same rank."""
        log.warning("scheduler at %s no longer knows %s (was it restarted?); registering again",
                    self.scheduler, self.node_id)
        request = pb.RegisterRequest()
        request.CopyFrom(self._request)
        request.requested_rank = self.rank
        request.incarnation = self.incarnation
        try:
            reply = self.stub.Register(request, timeout=max(1.0, self.reply.heartbeat_interval))
        except grpc.RpcError as error:
            log.warning("registering %s again failed: %s", self.node_id, error.details())
            return
        self.reply, self.incarnation = reply, reply.incarnation
        self.reregistrations += 1
        log.warning("%s registered again (incarnation %s)", self.node_id, self.incarnation)

    def call(self, method: str, request: object, *, timeout: float | None = None,
             what: str | None = None) -> object:
        """Call scheduler RPC ``method`` with a deadline; errors name the scheduler's address.
        While the scheduler is unreachable (restarting) the call is retried until the deadline."""
        timeout = timeout or self._timeout
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                return rpc.call(getattr(self.stub, method), request,
                                timeout=max(0.1, deadline - time.monotonic()),
                                what=what or method, node="scheduler", address=self.scheduler)
            except NodeUnavailableError as exc:
                if getattr(exc, "answered", False) or time.monotonic() + delay >= deadline:
                    raise  # the scheduler answered (a node it knows is dead): no retry
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def cluster(self, wait_for_servers: bool = False, timeout: float | None = None) -> pb.ClusterView:
        """The scheduler's view of the job; optionally wait until every server has registered."""
        timeout = self._timeout if timeout is None else timeout
        try:
            if not wait_for_servers:
                return self.stub.GetCluster(pb.ClusterRequest(), timeout=timeout + 5.0)
            with waiting_for(self.node_id, f"the job's servers to register with the scheduler "
                             f"at {self.scheduler}", timeout):
                return self.stub.GetCluster(
                    pb.ClusterRequest(wait_for_servers=True, timeout=timeout),
                    timeout=timeout + 5.0)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise PSTimeoutError(f"waiting for servers at scheduler {self.scheduler}: "
                                     f"{error.details()}") from None
            raise rpc.translate(error, "get cluster", "scheduler", self.scheduler) from None

    def close(self, deregister: bool = True) -> None:
        """Stop heartbeats and (by default) tell the scheduler this node left cleanly."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=5.0)
        if deregister and not self.superseded:
            try:
                self.stub.Deregister(pb.DeregisterRequest(node_id=self.node_id,
                                                          incarnation=self.incarnation),
                                     timeout=2.0)
            except grpc.RpcError:
                pass  # the scheduler may already be gone at the end of a job
        self._channel.close()
