"""One configuration object per node kind, used by the CLI and the Python API alike.

Only the CLI (and :func:`paramserver.connect` for ``PARAMSERVER_SCHEDULER``) reads flags and
environment variables; every class below them receives one of these explicit values.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulerConfig", "ServerConfig", "ClientConfig", "DEFAULT_BLOCK_SIZE",
           "MIN_BLOCK_SIZE", "DEFAULT_MESSAGE_BYTES"]

#: Largest default dense block: 256Ki float32 = 1 MiB, two to a ~2 MiB message.
DEFAULT_BLOCK_SIZE = 256 * 1024
#: Smallest default block: 16Ki float32 = 64 KiB, below which per-block overhead dominates.
MIN_BLOCK_SIZE = 16 * 1024
#: Target payload bytes of one gRPC message (PERF.md: 1-4 MB messages move 3-5x faster than 16 MB+).
#: 2 MiB measured best for 16-64 MB pushes and pulls (benchmarks/bench_transport.py, messages sent
#: as parallel unary calls): 4 MiB was 15-30% slower, 1 MiB about the same or slightly slower.
DEFAULT_MESSAGE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class SchedulerConfig:
    """Settings of the scheduler.

    Attributes:
        host: interface to bind (``127.0.0.1`` for a local job, ``0.0.0.0`` for a cluster).
        port: TCP port; 0 picks a free one (read it from :attr:`Scheduler.address`).
        num_servers: servers the job expects; workers wait until all have registered.
        num_workers: workers the job expects (barriers wait for all); 0 takes it from the first
            worker that registers with a job size.
        heartbeat_interval: seconds between heartbeats that nodes are told to send.
        heartbeat_timeout: seconds without a heartbeat after which a node is marked dead.
        max_threads: gRPC handler threads (barriers hold one each while waiting).
        checkpoint_dir: directory of the job's checkpoints ("" : none; ``client.checkpoint()``
            then fails, and export from the running job uses a temporary directory).
        checkpoint_every: seconds between periodic checkpoints (0: none).
        keep: complete checkpoints kept in ``checkpoint_dir``; older ones are deleted once a
            newer one is complete (0: keep all).
        resume: start from the newest complete checkpoint in ``checkpoint_dir`` (falling back
            past corrupt ones); a fresh job if there is none.
        recover: continue a running job after this scheduler's predecessor died: load the job's
            tables, placement and size from the state the scheduler keeps in
            ``checkpoint_dir``; the servers (which kept their tables) and workers register again
            by themselves.
    """

    host: str = "127.0.0.1"
    port: int = 0
    num_servers: int = 1
    num_workers: int = 0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    max_threads: int = 64
    checkpoint_dir: str = ""
    checkpoint_every: float = 0.0
    keep: int = 3
    resume: bool = False
    recover: bool = False

    def __post_init__(self) -> None:
        if self.num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {self.num_servers}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"need 0 < heartbeat_interval < heartbeat_timeout, got "
                f"{self.heartbeat_interval} and {self.heartbeat_timeout}")
        if self.checkpoint_every < 0 or self.keep < 0:
            raise ValueError(f"checkpoint_every and keep must be >= 0, got "
                             f"{self.checkpoint_every} and {self.keep}")
        if (self.checkpoint_every or self.resume or self.recover) and not self.checkpoint_dir:
            raise ValueError("checkpoint_every, resume and recover need a checkpoint_dir")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one parameter server.

    Attributes:
        scheduler: ``host:port`` of the scheduler.
        host: interface to bind; also the address advertised to workers unless ``advertise`` is set.
        port: TCP port; 0 picks a free one.
        advertise: ``host:port`` workers should use, when it differs from host/port (NAT, 0.0.0.0).
        rank: requested rank (-1: the scheduler assigns the next free one).
        threads: gRPC handler threads (concurrent requests).
        apply_threads: threads the core uses inside one large request.
        timeout: seconds to wait for the scheduler at start and on each control call.
        replace: take ``rank`` over even if its holder still looks alive (a supervisor restarting
            a server it knows is dead); the old incarnation is fenced.
        fault_drop_reply_every: test-only fault injection: after applying every N-th write,
            drop its reply (the client sees UNAVAILABLE and retries). 0 (default): never.
    """

    scheduler: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str = ""
    rank: int = -1
    threads: int = 16
    apply_threads: int = 2
    timeout: float = 30.0
    replace: bool = False
    fault_drop_reply_every: int = 0


@dataclass(frozen=True)
class ClientConfig:
    """Settings of a worker's client.

    Attributes:
        scheduler: ``host:port`` of the scheduler.
        rank: requested worker rank (-1: the scheduler assigns one).
        num_workers: job size this worker expects (0: unknown).
        timeout: seconds allowed for each remote call (and for waiting on servers, tables, barriers
            unless a call says otherwise).
        message_bytes: target payload bytes per gRPC message; a larger request is cut into
            messages of about this size, sent as parallel calls.
        replace: take ``rank`` over even if its holder still looks alive (a supervisor
            restarting a worker it knows is dead).
    """

    scheduler: str
    rank: int = -1
    num_workers: int = 0
    timeout: float = 60.0
    message_bytes: int = DEFAULT_MESSAGE_BYTES
    replace: bool = False
