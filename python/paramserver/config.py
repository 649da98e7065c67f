"""One configuration object per node kind, used by the CLI and the Python API alike.

Only the CLI and :func:`paramserver.connect` read flags, environment variables and files (with
:func:`load_security` for the job token and the TLS files); every class below them receives one of
these explicit values.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Security", "load_security", "TOKEN_ENV", "SECRET_ENV",
           "SECRET_VALUE_ENV", "TLS_ENV", "SchedulerConfig", "ServerConfig",
           "FederatedConfig",
           "ClientConfig", "DEFAULT_BLOCK_SIZE", "MIN_BLOCK_SIZE", "DEFAULT_MESSAGE_BYTES",
           "MAX_DIM", "MAX_BLOCK_SIZE", "MAX_TABLE_ELEMENTS", "MAX_NAME_BYTES"]

#: The environment variable holding the job token (set by ``paramserver launch`` for its children).
TOKEN_ENV = "PARAMSERVER_TOKEN"
#: The environment variable holding the path of the job secret file (control-plane nodes only).
SECRET_ENV = "PARAMSERVER_JOB_SECRET_FILE"
#: The environment variable holding the job secret itself (set by ``paramserver launch`` for the
#: scheduler and servers it starts; a file, :data:`SECRET_ENV`, is preferred by hand).
SECRET_VALUE_ENV = "PARAMSERVER_JOB_SECRET"

#: Largest default dense block: 256Ki float32 = 1 MiB, two to a ~2 MiB message.
DEFAULT_BLOCK_SIZE = 256 * 1024
#: Smallest default block: 16Ki float32 = 64 KiB, below which per-block overhead dominates.
MIN_BLOCK_SIZE = 16 * 1024
#: Largest embedding dim: 64Ki floats, a 256 KiB row (plus optimizer state). Rows of this width
#: already cost more per id than any message batch should; the cap stops a declaration of dim
#: 2.5e8 from allocating a gigabyte per row touched.
MAX_DIM = 64 * 1024
#: Largest dense block: 4Mi float32 = 16 MiB, so a block (and a pull of it) fits in a message.
MAX_BLOCK_SIZE = 4 * 1024 * 1024
#: Largest dense table: 2**40 elements (4 TiB of float32), far beyond any server set, within int64.
MAX_TABLE_ELEMENTS = 1 << 40
#: Longest table name, in UTF-8 bytes.
MAX_NAME_BYTES = 256
#: Target payload bytes of one gRPC message (measured here: 1-4 MB messages move 3-5x faster than
#: 16 MB+ in Python gRPC).
#: 2 MiB measured best for 16-64 MB pushes and pulls (benchmarks/bench_transport.py, messages sent
#: as parallel unary calls): 4 MiB was 15-30% slower, 1 MiB about the same or slightly slower.
DEFAULT_MESSAGE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Security:
    """How a node proves who it is and checks its peers: the job token and TLS.

    One value serves both directions of a node: the scheduler and the servers check incoming
    calls with it, and every node (servers are clients of the scheduler) uses it for its own
    calls. Build it from flags, environment and files with :func:`load_security`; the node classes
    only receive it. Secrets never appear in ``repr``.

    Attributes:
        token: the token this node's calls carry (``authorization: Bearer <token>``). Without
            ``job_secret`` it is also the one token incoming calls must carry (else
            UNAUTHENTICATED; the health service stays open), allowed every method. Empty: no
            authentication. Printable ASCII without spaces (it travels as gRPC metadata).
        job_secret: the job secret of a control-plane node (scheduler, server, the operator's
            control commands): incoming calls must carry one of the four role tokens derived
            from it and may call what their role allows (``paramserver.roles``); ``token``
            defaults to the control token. Never sent anywhere.
        tls_cert: PEM certificate chain of this node. A scheduler or server serves TLS with it;
            as a caller, the node presents it when the peer asks for a client certificate.
        tls_key: PEM private key of ``tls_cert``.
        tls_ca: PEM certificates of the CA that signed the peers' certificates: outgoing calls
            verify the peer against it (and against the host name or IP in its address). A node
            with ``tls_ca`` or ``tls_cert`` calls others over TLS only (system roots when no CA).
        tls_client_auth: mutual TLS: a scheduler or server refuses callers that do not present a
            certificate signed by ``tls_ca``.
    """

    token: str = field(default="", repr=False)
    job_secret: str = field(default="", repr=False)
    tls_cert: bytes = field(default=b"", repr=False)
    tls_key: bytes = field(default=b"", repr=False)
    tls_ca: bytes = field(default=b"", repr=False)
    tls_client_auth: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.token, str):
            raise TypeError(f"token must be a str, got {type(self.token).__name__}")
        bad = next((i for i, c in enumerate(self.token) if not "!" <= c <= "~"), None)
        if bad is not None:  # never echo the token itself
            raise ValueError(f"the job token must be printable ASCII without spaces (it travels "
                             f"as gRPC metadata); character {bad} of {len(self.token)} is not")
        if not isinstance(self.job_secret, str):
            raise TypeError(f"job_secret must be a str, got {type(self.job_secret).__name__}")
        if self.job_secret and not self.token:
            from paramserver.roles import CONTROL, derive_token
            object.__setattr__(self, "token", derive_token(self.job_secret, CONTROL))
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if not isinstance(getattr(self, name), bytes):
                raise TypeError(f"{name} must be PEM bytes, got "
                                f"{type(getattr(self, name)).__name__}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a TLS certificate needs its key and a key its certificate: give "
                             "both tls_cert and tls_key (--tls-cert and --tls-key), or neither")
        if self.tls_client_auth and not (self.tls_ca and self.tls_cert):
            raise ValueError("mutual TLS (tls_client_auth, --tls-client-auth) needs this node's "
                             "certificate and key and the CA that signs the callers' "
                             "certificates (--tls-ca)")

    @property
    def tls(self) -> bool:
        """True if this node's outgoing calls use TLS (a CA or a certificate is set)."""
        return bool(self.tls_ca or self.tls_cert)

    @property
    def protection(self) -> str:
        """How incoming calls are checked: ``none``, ``one token for all roles`` or ``per-role
        credentials``, with ``+ TLS`` / ``+ mutual TLS`` (logged by every node at start)."""
        from paramserver.roles import protection
        return protection(self.token, self.job_secret, bool(self.tls_cert),
                          self.tls_client_auth)

    def __str__(self) -> str:
        parts = ["per-role credentials" if self.job_secret
                 else "token" if self.token else "no token"]
        if self.tls_cert:
            parts.append("mutual TLS" if self.tls_client_auth else "TLS")
        elif self.tls_ca:
            parts.append("TLS client")
        return ", ".join(parts)


#: Environment variables of the TLS files (paths), read by :func:`load_security` when no path is
#: given; ``paramserver launch`` sets them for its workers.
TLS_ENV = {"tls_cert": "PARAMSERVER_TLS_CERT", "tls_key": "PARAMSERVER_TLS_KEY",
           "tls_ca": "PARAMSERVER_TLS_CA"}

def _read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} file {os.fspath(path)}: "
                         f"{exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} file {os.fspath(path)} is not PEM (no '-----BEGIN' line)")
    return data


def _read_secret(path: str | os.PathLike[str], what: str) -> str:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what} file {os.fspath(path)}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not text:
        raise ValueError(f"{what} file {os.fspath(path)} is empty")
    return text


def load_security(*, token: str | None = None, token_file: str | os.PathLike[str] | None = None,
                  job_secret_file: str | os.PathLike[str] | None = None,
                  tls_cert: str | os.PathLike[str] | None = None,
                  tls_key: str | os.PathLike[str] | None = None,
                  tls_ca: str | os.PathLike[str] | None = None, tls_client_auth: bool = False,
                  environ: Mapping[str, str] | None = None) -> Security:
    """The :class:`Security` a user asked for at the edge (CLI flags, ``connect()`` arguments).

    The token is ``token`` if given, else the contents of ``token_file`` (surrounding whitespace
    stripped), else ``$PARAMSERVER_TOKEN`` from ``environ`` (default ``os.environ``), else none.
    The job secret is the contents of ``job_secret_file``, else of the file named by
    ``$PARAMSERVER_JOB_SECRET_FILE``, else ``$PARAMSERVER_JOB_SECRET``, else none; with a job secret the token is the control
    token derived from it (``$PARAMSERVER_TOKEN`` is then ignored; an explicit token or token
    file as well is an error).
    Each TLS file is the path given, else the path in ``$PARAMSERVER_TLS_CERT`` /
    ``$PARAMSERVER_TLS_KEY`` / ``$PARAMSERVER_TLS_CA``, else none; files are read here.

    Raises:
        ValueError: a file cannot be read, is empty or is not PEM; the token is not printable
            ASCII; a certificate without its key (or the reverse).
    """
    environ = os.environ if environ is None else environ
    secret = ""
    secret_path = job_secret_file if job_secret_file is not None else environ.get(SECRET_ENV, "")
    if secret_path:
        secret = _read_secret(secret_path, "job secret")
    elif job_secret_file is None:
        secret = environ.get(SECRET_VALUE_ENV, "").strip()
    if secret:
        if token is not None or token_file is not None:
            raise ValueError("give either the job secret (--job-secret-file) or a token "
                             "(--token-file), not both: a node with the job secret derives its "
                             "token")
        token = ""
    if token is None and token_file is not None:
        token = _read_secret(token_file, "token")
    if token is None:
        token = environ.get(TOKEN_ENV, "")
    pem, paths = {}, {}
    for name, given, what in (("tls_cert", tls_cert, "TLS certificate"),
                              ("tls_key", tls_key, "TLS key"), ("tls_ca", tls_ca, "TLS CA")):
        paths[name] = given if given is not None else environ.get(TLS_ENV[name], "")
        pem[name] = _read_pem(paths[name], what) if paths[name] else b""
    security = Security(token=token, job_secret=secret, tls_client_auth=tls_client_auth, **pem)
    # Check the files with Python's ssl now: gRPC reports a bad pair only at the first handshake.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        if paths["tls_cert"]:
            context.load_cert_chain(paths["tls_cert"], paths["tls_key"])
    except ssl.SSLError as exc:
        raise ValueError(f"TLS certificate {os.fspath(paths['tls_cert'])} and key "
                         f"{os.fspath(paths['tls_key'])} do not load as a pair: "
                         f"{exc.reason or exc}") from None
    try:
        if paths["tls_ca"]:
            context.load_verify_locations(cafile=paths["tls_ca"])
    except ssl.SSLError as exc:
        raise ValueError(f"TLS CA file {os.fspath(paths['tls_ca'])} holds no usable "
                         f"certificate: {exc.reason or exc}") from None
    return security


@dataclass(frozen=True)
class FederatedConfig:
    """Settings of a federated job's rounds (``--federated``; see docs/federated.md).

    Attributes:
        clients_per_round: participants selected per round (K); a round closes when K updates
            (or, with fewer live participants, every selected one's) have arrived.
        min_updates: updates a round needs to be applied when it reaches its timeout; with fewer
            it is abandoned (the model stays as it was) and the next round starts.
        round_timeout: seconds a round stays open.
        rounds: rounds to run, then the job is finished (0: no limit).
        min_participants: live participants needed before a round opens (0: clients_per_round);
            e.g. every participant of a simulation, so that the first round's selection is fair
            too. Once min_updates participants have been live for a round timeout, a round
            opens with them.
        seed: seed of the participant selection (fair: the least-often selected live
            participants first, ties broken by this seeded generator).
        dp_clip: DP-FedAvg clipping norm C (0: off): each update's delta is scaled to an L2
            norm of at most C over all tables.
        dp_noise: DP-FedAvg noise multiplier sigma: Gaussian noise of standard deviation
            ``sigma * C / n`` is added to the mean of the n counted updates (needs dp_clip).
    """

    clients_per_round: int = 10
    min_updates: int = 1
    round_timeout: float = 300.0
    rounds: int = 0
    min_participants: int = 0
    seed: int = 0
    dp_clip: float = 0.0
    dp_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(f"--clients-per-round must be >= 1, got {self.clients_per_round}")
        if not 1 <= self.min_updates <= self.clients_per_round:
            raise ValueError(f"--min-updates must be in [1, --clients-per-round "
                             f"{self.clients_per_round}], got {self.min_updates}")
        if not self.round_timeout > 0:
            raise ValueError(f"--round-timeout must be > 0 seconds, got {self.round_timeout}")
        if self.min_participants < 0:
            raise ValueError(f"--min-participants must be >= 0, got {self.min_participants}")
        if self.rounds < 0:
            raise ValueError(f"--rounds must be >= 0 (0: no limit), got {self.rounds}")
        if self.dp_clip < 0 or self.dp_noise < 0:
            raise ValueError(f"--dp-clip and --dp-noise must be >= 0, got {self.dp_clip} and "
                             f"{self.dp_noise}")
        if self.dp_noise and not self.dp_clip:
            raise ValueError("--dp-noise needs --dp-clip: the noise is scaled to the clipping "
                             "norm")


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
            by themselves. The nodes that state lists (every node the predecessor had answered
            a registration) count as alive for ``recover_grace`` seconds without a heartbeat,
            and a call from one of them is served as from that node, so a worker's barrier or a
            checkpoint right after the restart does not fail on a node that has not yet
            reported back.
        recover_grace: seconds the nodes of a recovered job get to report back (heartbeat or
            registration) before they are called dead; 0 (default): 3 x ``heartbeat_timeout``.
        security: the job token (and TLS) incoming calls are checked against.
        sync: the job's consistency model: ``"async"`` (default), ``"bsp"`` or ``"ssp:S"`` (see
            :mod:`paramserver.sync`). The synchronous ones need ``num_workers``.
        on_worker_failure: synchronous jobs, when a worker dies: ``"fail"`` (its steps fail with
            an error naming it) or ``"shrink"`` (the others go on without it).
        federated: a federated job's rounds (None: not a federated job).
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
    recover_grace: float = 0.0
    security: Security = Security()
    sync: str = "async"
    on_worker_failure: str = "fail"
    federated: FederatedConfig | None = None

    def __post_init__(self) -> None:
        from paramserver.sync import FAILURE_POLICIES, Consistency

        consistency = Consistency.parse(self.sync)  # ValueError naming the accepted forms
        if self.federated is not None and consistency.synchronous:
            raise ValueError(f"a federated job has its own rounds: --sync {consistency} does "
                             f"not apply (leave --sync at async)")
        if consistency.synchronous and not self.num_workers:
            raise ValueError(f"a {consistency} job needs its number of workers (--num-workers): "
                             f"every step waits for all of them")
        if self.on_worker_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_worker_failure must be one of {FAILURE_POLICIES}, got "
                             f"{self.on_worker_failure!r}")
        if self.num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {self.num_servers}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        _check_port(self.port)
        _check_positive("max_threads", self.max_threads)
        _check_security(self.security)
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"need 0 < heartbeat_interval < heartbeat_timeout, got "
                f"{self.heartbeat_interval} and {self.heartbeat_timeout}")
        if self.recover_grace < 0:
            raise ValueError(f"recover_grace must be >= 0, got {self.recover_grace}")
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
        security: the job token (and TLS) of incoming calls and of this server's calls to the
            scheduler.
        max_memory: bytes of table values and optimizer state this server may hold (0: no
            limit). A table creation or a request creating embedding rows that would pass it is
            refused with RESOURCE_EXHAUSTED naming the table, and changes nothing.
        transport: ``"auto"`` (default): workers on this host may send through shared memory;
            ``"grpc"``: never (every worker uses gRPC).
    """

    scheduler: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str = ""
    rank: int = -1
    threads: int = 16
    apply_threads: int = 2
    timeout: float = 30.0
    security: Security = Security()
    max_memory: int = 0
    replace: bool = False
    fault_drop_reply_every: int = 0
    transport: str = "auto"

    def __post_init__(self) -> None:
        _check_address("scheduler", self.scheduler)
        _check_transport(self.transport, ("auto", "grpc"))
        if self.advertise:
            _check_address("advertise", self.advertise)
        _check_port(self.port)
        if self.rank < -1:
            raise ValueError(f"rank must be >= 0, or -1 for any, got {self.rank}")
        _check_positive("threads", self.threads)
        _check_positive("apply_threads", self.apply_threads)
        _check_positive("timeout", self.timeout)
        if self.max_memory < 0:
            raise ValueError(f"max_memory must be >= 0 bytes (0: no limit), got "
                             f"{self.max_memory}")
        _check_security(self.security)


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
        security: the job token (and TLS) attached to every call to the scheduler and servers.
        sync: the consistency model this worker expects (``"async"``, ``"bsp"``, ``"ssp:S"``);
            connecting to a job with another one fails. "" : take the job's.
        transport: how data travels to the servers: ``"auto"`` (default) through shared memory
            with servers on this host that accept it and gRPC with the others; ``"grpc"``
            always gRPC; ``"shm"`` shared memory or an error naming why it is not possible.
    """

    scheduler: str
    rank: int = -1
    num_workers: int = 0
    timeout: float = 60.0
    message_bytes: int = DEFAULT_MESSAGE_BYTES
    security: Security = Security()
    replace: bool = False
    sync: str = ""
    transport: str = "auto"

    def __post_init__(self) -> None:
        _check_address("scheduler", self.scheduler)
        _check_transport(self.transport, ("auto", "grpc", "shm"))
        if self.rank < -1:
            raise ValueError(f"rank must be >= 0, or -1 for any, got {self.rank}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: unknown), got {self.num_workers}")
        _check_positive("timeout", self.timeout)
        _check_positive("message_bytes", self.message_bytes)
        _check_security(self.security)
        if self.sync:
            from paramserver.sync import Consistency
            Consistency.parse(self.sync)  # ValueError naming the accepted forms


def _check_transport(transport: str, allowed: tuple[str, ...]) -> None:
    if transport not in allowed:
        raise ValueError(f"transport must be one of {', '.join(map(repr, allowed))}, got "
                         f"{transport!r}")


def _check_positive(name: str, value: float) -> None:
    # `not value > 0` also refuses NaN.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535] (0: any free port), got {port!r}")


def _check_address(name: str, address: str) -> None:
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{name} must be 'host:port' with a port in [1, 65535], got {address!r}")


def _check_security(security: Security) -> None:
    if not isinstance(security, Security):
        raise TypeError(f"security must be a paramserver.Security, got "
                        f"{type(security).__name__}")
