"""``paramserver launch``: a whole job on this machine — a scheduler, N servers and W workers.

Each worker runs the user's command with ``PARAMSERVER_SCHEDULER``, ``PARAMSERVER_RANK`` and
``PARAMSERVER_NUM_WORKERS`` in its environment. Every job is protected without any flag: by
default the launcher makes a job secret for it (or takes ``--job-secret-file``'s), hands it to the
scheduler and servers only (``PARAMSERVER_JOB_SECRET``), and gives each worker only the token of
its role in ``PARAMSERVER_TOKEN`` (``worker``, or ``participant`` in a federated job; see
:mod:`paramserver.roles`); the launcher's own calls (the final checkpoint) are control calls.
With a token given instead (``--token-file`` / ``PARAMSERVER_TOKEN``), every process gets that
one token, allowed everything (the mode before roles). TLS files are handed over by path in ``PARAMSERVER_TLS_CERT``,
``PARAMSERVER_TLS_KEY`` and ``PARAMSERVER_TLS_CA``: the scheduler and servers serve TLS with them,
and every process verifies its peers with them. Every line a process prints is prefixed with its
role and rank. The launcher exits with the first failing worker's exit code (0 when all succeed),
and on every path — success, a failing worker, a dead server, Ctrl-C, SIGTERM — it stops every
process it started (each runs in its own process group, so their children go too).

Even ``kill -9`` of the launcher leaves nothing behind: on Linux every child asks the kernel for
SIGKILL when the launcher dies (``PR_SET_PDEATHSIG``), and a small watchdog process, which outlives
the launcher, then stops the children's whole process groups (their own children included) and
removes the launcher's temporary directory. Should the watchdog die too, the next launch removes
the temporary directories of launchers that are gone.

The supervision (:func:`run_job`: start order, readiness, restarts, exit codes, the final
checkpoint, interrupts) does not know where processes run: a spawner starts them. Here it is
``_LocalSpawner`` (this machine); :mod:`paramserver.ray` gives one that starts them as Ray actors.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from paramserver import shm
from paramserver import roles
from paramserver.config import (
    SECRET_ENV,
    SECRET_VALUE_ENV,
    TLS_ENV,
    TOKEN_ENV,
    FederatedConfig,
    Security,
    load_security,
)
from paramserver.rpc import MALLOC_ENV

__all__ = ["LaunchConfig", "LaunchError", "launch", "run_job", "job_environment",
           "worker_environment",
           "process_environment", "node_command", "line_writer"]


@dataclass(frozen=True)
class LaunchConfig:
    """What ``paramserver launch`` starts.

    Attributes:
        command: the worker command and its arguments.
        num_servers: servers to start.
        num_workers: copies of ``command`` to start.
        host: interface every node binds (loopback by default).
        port: scheduler port (0: any free port).
        heartbeat_interval / heartbeat_timeout: passed to the scheduler (seconds).
        recover_grace: passed to a restarted scheduler (see
            :class:`paramserver.SchedulerConfig`; 0: 3 x ``heartbeat_timeout``).
        startup_timeout: seconds allowed for the scheduler and servers to come up.
        grace: seconds between SIGTERM and SIGKILL when stopping processes.
        server_threads: gRPC handler threads per server.
        env: extra environment variables for every process.
        checkpoint_dir / checkpoint_every / keep / resume: passed to the scheduler (see
            :class:`paramserver.SchedulerConfig`). With a checkpoint directory, the launcher takes
            a final checkpoint when every worker has finished, and when it is interrupted
            (Ctrl-C, SIGTERM) while the job is running: then before it stops any process (a
            second interrupt abandons it), and it exits with 128 + the signal's number.
        final_checkpoint_timeout: seconds allowed for that final checkpoint.
        max_restarts: times each process (the scheduler, each server, each worker) is restarted
            after it dies, with a backoff of 0.5 s doubling up to 10 s; 0: a death ends the job.
            A restarted server takes its rank back and loads its tables from the newest
            checkpoint; a restarted scheduler continues from the state it keeps in the
            checkpoint directory (so restarting it needs ``checkpoint_dir``); a restarted worker
            runs the command again with its rank.
        token: one token handed to every process and allowed everything; empty: per-role
            credentials derived from ``job_secret``.
        job_secret: the job secret (control plane only); empty: a random one made for this job
            (unless ``token`` is given).
        tls_cert / tls_key: paths of the PEM certificate and key the scheduler and servers serve
            TLS with (also presented by every process for mutual TLS); "" for none.
        tls_ca: path of the PEM CA certificates every process verifies its peers with.
        tls_client_auth: mutual TLS: the scheduler and servers require client certificates.
        sync: the job's consistency model, ``"async"``, ``"bsp"`` or ``"ssp:S"``.
        on_worker_failure: synchronous jobs: ``"fail"`` (a dead worker fails the job's steps,
            and the launcher stops the job) or ``"shrink"`` (the other workers go on without it,
            and the job's exit code is that of the workers that remain).
        transport: ``"auto"``: workers send through shared memory to the servers (all on this
            machine); ``"grpc"``: through gRPC only (servers refuse shared memory, workers get
            ``PARAMSERVER_TRANSPORT=grpc``).
        federated: a federated job's rounds, passed to the scheduler (None: not federated);
            each worker process hosts participants (see docs/federated.md).
    """

    command: list[str]
    num_servers: int = 1
    num_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    recover_grace: float = 0.0
    startup_timeout: float = 60.0
    grace: float = 5.0
    server_threads: int = 16
    env: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: str = ""
    checkpoint_every: float = 0.0
    keep: int = 3
    resume: bool = False
    final_checkpoint_timeout: float = 120.0
    max_restarts: int = 0
    token: str = field(default="", repr=False)
    job_secret: str = field(default="", repr=False)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_auth: bool = False
    sync: str = "async"
    on_worker_failure: str = "fail"
    transport: str = "auto"
    federated: FederatedConfig | None = None

    def __post_init__(self) -> None:
        from paramserver.sync import FAILURE_POLICIES, Consistency

        Consistency.parse(self.sync)
        if self.on_worker_failure not in FAILURE_POLICIES:
            raise ValueError(f"--on-worker-failure must be one of {FAILURE_POLICIES}, got "
                             f"{self.on_worker_failure!r}")
        if self.transport not in ("auto", "grpc"):
            raise ValueError(f"--transport must be 'auto' or 'grpc', got {self.transport!r}")
        if not self.command:
            raise ValueError("launch needs a worker command after --")
        if self.num_servers < 1 or self.num_workers < 1:
            raise ValueError(f"need at least 1 server and 1 worker, got {self.num_servers} and "
                             f"{self.num_workers}")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every and --resume need --checkpoint-dir")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        Security(token=self.token)  # raises ValueError on a token gRPC metadata cannot carry
        if self.token and self.job_secret:
            raise ValueError("give either a job token (one token for every process) or a job "
                             "secret (per-role credentials), not both")


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class LaunchError(RuntimeError):
    """The job could not start (a node failed to come up in time)."""


#: Prefix of the launchers' temporary directories (ready files), under tempfile.gettempdir().
_TMP_PREFIX = "paramserver-launch-"
#: In each such directory: "PID START" of the launcher that owns it (see _process_start).
_OWNER_FILE = "launcher.pid"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), to tell it from a later
    process that reuses its pid; "" where /proc is missing; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (not Linux): the pid alone
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _clean_stale_dirs(parent: str) -> list[str]:
    """Remove this user's launcher directories whose launcher is gone (killed before it could
    clean up); return their paths. A directory without an owner file is left alone unless it is
    a minute old (its launcher writes the file right after creating it)."""
    removed: list[str] = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(_TMP_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
            owner = Path(entry.path, _OWNER_FILE)
            if owner.exists():
                pid, start = owner.read_text().split()
                if _process_start(int(pid)) == start:
                    continue  # its launcher still runs
            elif time.time() - entry.stat().st_mtime < 60:
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _die_with_launcher() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGKILL when the launcher dies (Linux), or None.

    Runs in the child between fork and exec, so it only calls what was looked up before the fork.
    If the launcher died before the prctl, the child's parent already changed: it kills itself.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    launcher = os.getpid()
    kill, getppid, getpid = os.kill, os.getppid, os.getpid

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if getppid() != launcher:
            kill(getpid(), signal.SIGKILL)
    return preexec


#: The watchdog (run as ``python -c``): reads the children's process group ids, one a line, on
#: stdin. "done" means the launcher stopped them itself. End of input without "done" means the
#: launcher died: SIGTERM to every group, SIGKILL after the grace period to what is left, then
#: remove the launcher's temporary directory. Only the standard library, so it starts fast.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
tmp, grace = sys.argv[1], float(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups, done = [], False
for line in sys.stdin:
    line = line.strip()
    if line == "done":
        done = True
        break
    groups.append(int(line))
if not done:
    def signal_all(sig):
        alive = []
        for group in groups:
            try:
                os.killpg(group, sig)
                alive.append(group)
            except (ProcessLookupError, PermissionError):
                pass
        return alive
    deadline = time.monotonic() + grace
    signal_all(signal.SIGTERM)
    while time.monotonic() < deadline and signal_all(0):
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)
"""


class _Watchdog:
    """The watchdog process of one launch (see ``_WATCHDOG``)."""

    def __init__(self, tmp: str, grace: float) -> None:
        self._popen = subprocess.Popen([sys.executable, "-I", "-c", _WATCHDOG, tmp, str(grace)],
                                       stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True,
                                       text=True)

    def watch(self, pgid: int) -> None:
        """Have the watchdog stop process group ``pgid`` if the launcher dies."""
        assert self._popen.stdin is not None
        self._popen.stdin.write(f"{pgid}\n")
        self._popen.stdin.flush()

    def release(self) -> None:
        """The launcher stopped everything itself: let the watchdog exit without acting."""
        try:
            assert self._popen.stdin is not None
            self._popen.stdin.write("done\n")
            self._popen.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self._popen.wait(5.0)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()


class _Proc:
    """One child process whose output is copied line by line behind a prefix.

    ``ready_file``: where the node writes its JSON once serving (None for workers).
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], out: IO[str],
                 lock: threading.Lock, watchdog: _Watchdog | None = None,
                 ready_file: Path | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.ready_file = ready_file
        self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True, text=True, errors="replace",
                                      bufsize=1, preexec_fn=_die_with_launcher(), cwd=cwd)
        if watchdog is not None:
            watchdog.watch(self.popen.pid)  # its own session: the group id is its pid
        self._thread = threading.Thread(target=self._pump, args=(out, lock), daemon=True,
                                        name=f"launch-{name}")
        self._thread.start()
        #: When the process exited (time.time()), noted by a thread blocked in waitpid: the
        #: launcher polls, and two workers that exit within one poll are told apart by it.
        self.exited_at: float | None = None
        threading.Thread(target=self._note_exit, daemon=True, name=f"launch-wait-{name}").start()

    def _note_exit(self) -> None:
        self.popen.wait()
        if self.exited_at is None:
            self.exited_at = time.time()

    def _pump(self, out: IO[str], lock: threading.Lock) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with lock:
                out.write(f"[{self.name}] {line if line.endswith(chr(10)) else line + chr(10)}")
                out.flush()

    def exit_code(self) -> int | None:
        """The exit code once the process has exited (128+S if killed by signal S), else None."""
        code = self.popen.poll()
        if code is not None and self.exited_at is None:
            self.exited_at = time.time()  # reaped here before the waiting thread woke
        if code is not None and code < 0:
            return 128 - code  # killed by a signal: the shell's convention
        return code

    def ready_info(self) -> dict | None:
        """The JSON the node wrote once serving, or None while it has not."""
        if self.ready_file is not None and self.ready_file.exists():
            return json.loads(self.ready_file.read_text())
        return None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process's whole group (its children too)."""
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True if it has."""
        try:
            self.popen.wait(max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def join_output(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the last of the output to be copied."""
        self._thread.join(timeout)


def job_environment(config: LaunchConfig) -> dict[str, str]:
    """The variables the scheduler and servers get on top of their machine's environment:
    ``config.env``, the TLS paths and the job's credential: the one token given
    (``PARAMSERVER_TOKEN``), else the job secret (``PARAMSERVER_JOB_SECRET``: the one given, or a
    random one made here). Workers get :func:`worker_environment` of it."""
    env = dict(config.env)
    if config.transport == "grpc":
        env["PARAMSERVER_TRANSPORT"] = "grpc"
    # Credentials travel by environment, never on a command line (visible to every user in ps).
    # Set even when empty: they override what the launcher's own environment may hold.
    env[SECRET_ENV] = ""
    env[TOKEN_ENV] = config.token
    env[SECRET_VALUE_ENV] = "" if config.token else (config.job_secret
                                                      or secrets.token_urlsafe(32))
    for name, variable in TLS_ENV.items():
        env[variable] = getattr(config, name)
    return env


def worker_environment(job_env: dict[str, str], federated: bool) -> dict[str, str]:
    """``job_env`` for a worker: without the job secret, with the token of its role
    (``participant`` in a federated job, else ``worker``) in ``PARAMSERVER_TOKEN``. With one
    token for the job, ``job_env`` as it is."""
    env = dict(job_env)
    secret = env.get(SECRET_VALUE_ENV, "")
    env[SECRET_VALUE_ENV] = env[SECRET_ENV] = ""  # never to a worker
    if secret:
        env[TOKEN_ENV] = roles.derive_token(secret, roles.PARTICIPANT if federated
                                            else roles.WORKER)
    return env


def process_environment(job_env: dict[str, str]) -> dict[str, str]:
    """The whole environment of a job's process started on this machine: this process's
    environment, this interpreter first on ``PATH``, one BLAS/OpenMP thread and the malloc
    settings unless set, then ``job_env``. Used by the local launcher and, on each node, by the
    Ray launcher's actors."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Workers run with this interpreter's environment first on PATH, so `python` in the worker
    # command is the Python (and the paramserver) that runs the launcher.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # N processes each starting one BLAS/OpenMP thread per core oversubscribe the machine (seen:
    # 2.7x slower training on 2 cores); like torchrun, default to one thread per process.
    for var in _THREAD_VARIABLES:
        env.setdefault(var, "1")
    # Megabyte messages without a page fault per 4 KiB (rpc.tune_malloc): the launcher's decision
    # for the processes it starts, made through glibc's own variables, never from the library.
    merged = dict(env, **job_env)
    if merged.get("PARAMSERVER_TUNE_MALLOC", "1") != "0" and not any(
            var in merged for var in MALLOC_ENV):
        env.update(MALLOC_ENV)
    env.update(job_env)
    return env


def node_command() -> list[str]:
    """The command of a scheduler or server on this machine: ``python -m paramserver``."""
    return [sys.executable, "-m", "paramserver"]


class _LocalSpawner:
    """Starts the job's processes on this machine (see :class:`_Job` for the interface)."""

    def __init__(self, command: list[str], tmp: Path, out: IO[str], lock: threading.Lock,
                 watchdog: _Watchdog | None) -> None:
        self._command = command
        self._tmp = tmp
        self._out = out
        self._lock = lock
        self._watchdog = watchdog
        self._starts = 0

    def spawn_node(self, name: str, role: str, rank: int, args: list[str],
                   job_env: dict[str, str]) -> _Proc:
        """Start ``paramserver ARGS --ready-file F`` as ``name``."""
        self._starts += 1
        ready = self._tmp / f"{name.replace(' ', '-')}.{self._starts}.json"
        return _Proc(name, node_command() + args + ["--ready-file", str(ready)],
                     process_environment(job_env), self._out, self._lock, self._watchdog,
                     ready_file=ready)

    def spawn_worker(self, name: str, rank: int, job_env: dict[str, str]) -> _Proc:
        """Start the worker command as ``name``."""
        return _Proc(name, list(self._command), process_environment(job_env), self._out,
                     self._lock, self._watchdog)

    def poll(self) -> None:
        """Nothing to refresh: a local process is asked directly."""

    def host(self, configured: str) -> str:
        """The ``--host`` of the scheduler and servers: the configured one."""
        return configured

    def stop(self, procs: list[_Proc], grace: float) -> None:
        """Stop ``procs``: SIGTERM to each group (last first), SIGKILL after ``grace``."""
        _stop_all(procs, grace)


def _wait_ready(job: _Job, proc, deadline: float) -> dict:
    while True:
        job.spawner.poll()
        info = proc.ready_info()
        if info is not None:
            return info
        code = proc.exit_code()
        if code is not None:
            raise LaunchError(f"{proc.name} exited with code {code} before it was ready")
        if time.monotonic() > deadline:
            raise LaunchError(f"{proc.name} was not ready within the startup timeout"
                              f"{getattr(proc, 'waiting_for', '')}")
        time.sleep(0.02)


def launch(config: LaunchConfig, out: IO[str] | None = None) -> int:
    """Run a job on this machine to completion and return the launcher's exit code (see module
    doc).

    Blocks until every worker has exited, a worker fails, a server or the scheduler dies, or the
    process is interrupted; always stops every child before returning.
    """
    out = out or sys.stdout
    lock = threading.Lock()
    say = line_writer(out, lock)
    shm.sweep()  # shared-memory segments a killed job left in /dev/shm
    for path in _clean_stale_dirs(tempfile.gettempdir()):
        say(f"removed {path}, left by a launcher that was killed")
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as tmp:
        Path(tmp, _OWNER_FILE).write_text(f"{os.getpid()} {_process_start(os.getpid())}")
        watchdog = _Watchdog(tmp, config.grace)
        try:
            spawner = _LocalSpawner(config.command, Path(tmp), out, lock, watchdog)
            return run_job(config, spawner, say)
        finally:
            watchdog.release()


def line_writer(out: IO[str], lock: threading.Lock) -> Callable[[str], None]:
    """``say(message)``: write ``[launch] message`` to ``out`` as one line, under ``lock``."""
    def say(message: str) -> None:
        with lock:
            out.write(f"[launch] {message}\n")
            out.flush()
    return say


def run_job(config: LaunchConfig, spawner, say: Callable[[str], None]) -> int:
    """Run a job whose processes ``spawner`` starts (on this machine, or as Ray actors) and
    return its exit code: 0 when every worker exits 0, the first failing worker's code, the
    code of a scheduler or server that dies (or 1), 127 for a command that cannot run, 1 when
    the job cannot start, 128+S on signal S (SIGINT, SIGTERM: handled when called from the main
    thread). Takes the final checkpoint (see :class:`LaunchConfig`), and always stops every
    process with ``spawner.stop`` before returning."""
    client_auth = ["--tls-client-auth"] if config.tls_client_auth else []
    job_env = job_environment(config)
    # The launcher's own calls (the final checkpoint) are control calls: the job's token or the
    # control token of its secret, and its TLS settings.
    security = load_security(tls_cert=config.tls_cert or None,
                             tls_key=config.tls_key or None, tls_ca=config.tls_ca or None,
                             environ={k: job_env[k] for k in (TOKEN_ENV, SECRET_VALUE_ENV)})
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = ({sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    job: _Job | None = None
    try:
        job = _Job(config, spawner, job_env, say, client_auth)
        job.start()
        say(f"scheduler at {job.scheduler}, {config.num_servers} servers ready; starting "
            f"{config.num_workers} workers: {' '.join(config.command)}")
        for rank in range(config.num_workers):
            job.start_worker(rank)
        code = job.supervise()
        if code == 0 and config.checkpoint_dir:
            _final_checkpoint(job.scheduler, security, config, say, "the job finished")
        return code
    except LaunchError as exc:
        say(f"error: {exc}")
        return 1
    except FileNotFoundError as exc:
        say(f"error: cannot run {exc.filename!r}: {exc.strerror}")
        return 127
    except KeyboardInterrupt:
        say("interrupted; stopping every process")
        if job is not None and job.scheduler and config.checkpoint_dir and all(
                p.exit_code() is None for p in job.nodes()):
            # Taken while the workers still run: a cut of a running job is consistent (a
            # worker's push is held and retried around it), whereas a worker stopped first can
            # die in the middle of a push to several servers, leaving it half applied.
            try:
                _final_checkpoint(job.scheduler, security, config, say, "interrupted")
            except KeyboardInterrupt:
                say("interrupted again: the final checkpoint is abandoned")
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        if job is not None:
            spawner.stop(job.all_procs(), config.grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Job:
    """The processes of one launched job, by role and rank, and their supervision.

    ``spawner`` starts them where they run: ``spawn_node(name, role, rank, args, job_env)`` (a
    scheduler or server: ``paramserver ARGS``, ready when its ready file is written),
    ``spawn_worker(name, rank, job_env)``, ``poll()`` (refresh what the handles report),
    ``host(configured)`` (the ``--host`` of nodes) and ``stop(procs, grace)``. A handle has
    ``name``, ``exit_code()``, ``ready_info()`` and ``signal(sig)``.
    """

    def __init__(self, config: LaunchConfig, spawner, env: dict[str, str], say,
                 client_auth: list[str]) -> None:
        self.config = config
        self.spawner = spawner
        self._client_auth = client_auth
        self._env = env
        self._say = say
        self.scheduler = ""
        self.scheduler_proc = None
        self.servers: dict[int, object] = {}
        self.workers: dict[int, object] = {}
        self._retired: list = []
        self._restarts: dict[str, int] = {}
        # --on-worker-failure shrink (synchronous jobs): failed workers the job goes on without.
        self._shrink = config.sync != "async" and config.on_worker_failure == "shrink"
        self._shrunk: list = []

    def nodes(self) -> list:
        """The scheduler and the servers."""
        return ([self.scheduler_proc] if self.scheduler_proc else []) + list(self.servers.values())

    def all_procs(self) -> list:
        """Every process started and not yet reaped, scheduler first, workers last."""
        return self._retired + self.nodes() + list(self.workers.values())

    def start(self) -> None:
        """Start the scheduler and every server; wait until all are serving."""
        deadline = time.monotonic() + self.config.startup_timeout
        self._start_scheduler(self.config.port, deadline)
        pending = [self._spawn_server(rank) for rank in range(self.config.num_servers)]
        for proc in pending:
            _wait_ready(self, proc, deadline)

    def _start_scheduler(self, port: int, deadline: float, recover: bool = False) -> None:
        config = self.config
        args = ["scheduler", "--host", self.spawner.host(config.host), "--port", str(port),
                "--num-servers", str(config.num_servers), "--num-workers", str(config.num_workers),
                "--heartbeat-interval", str(config.heartbeat_interval),
                "--heartbeat-timeout", str(config.heartbeat_timeout),
                "--sync", config.sync,
                "--on-worker-failure", config.on_worker_failure] + _checkpoint_args(config) \
            + _federated_args(config.federated)
        if recover:
            args = [a for a in args if a != "--resume"] + ["--recover"]
            if config.recover_grace:
                args += ["--recover-grace", repr(config.recover_grace)]
        self.scheduler_proc = self.spawner.spawn_node("scheduler", "scheduler", 0,
                                                      args + self._client_auth, self._env)
        self.scheduler = _wait_ready(self, self.scheduler_proc, deadline)["address"]

    def _spawn_server(self, rank: int, replace: bool = False):
        proc = self.spawner.spawn_node(f"server {rank}", "server", rank, [
            "server", "--scheduler", self.scheduler, "--host", self.spawner.host(self.config.host),
            "--rank", str(rank), "--threads", str(self.config.server_threads),
            "--transport", self.config.transport]
            + (["--replace"] if replace else []) + self._client_auth, self._env)
        self.servers[rank] = proc
        return proc

    def start_worker(self, rank: int, restart: bool = False) -> None:
        """Run the worker command as ``rank`` (again, after it died, with ``restart``)."""
        env = dict(worker_environment(self._env, self.config.federated is not None),
                   PARAMSERVER_SCHEDULER=self.scheduler, PARAMSERVER_RANK=str(rank),
                   PARAMSERVER_NUM_WORKERS=str(self.config.num_workers))
        if restart:
            env["PARAMSERVER_REPLACE"] = "1"
        self.workers[rank] = self.spawner.spawn_worker(f"worker {rank}", rank, env)

    def _may_restart(self, name: str, code: int) -> bool:
        used = self._restarts.get(name, 0)
        if used >= self.config.max_restarts:
            return False
        self._restarts[name] = used + 1
        delay = min(10.0, 0.5 * 2 ** used)
        self._say(f"{name} exited with code {code}; restarting it in {delay:.1f} s (restart "
                  f"{used + 1} of {self.config.max_restarts})")
        time.sleep(delay)
        return True

    def supervise(self) -> int:
        """Wait for the workers; restart what dies while restarts remain. Returns the exit code."""
        while True:
            self.spawner.poll()
            proc = self.scheduler_proc
            code = proc.exit_code() if proc else None
            if code is not None:
                if not self.config.checkpoint_dir or not self._may_restart("scheduler", code):
                    self._say(f"scheduler exited with code {code} while workers were running; "
                              f"stopping the job")
                    return code or 1
                self._retired.append(proc)
                port = int(self.scheduler.rsplit(":", 1)[1])
                self._start_scheduler(port, time.monotonic() + self.config.startup_timeout,
                                      recover=True)
                self._say(f"scheduler restarted at {self.scheduler}")
            for rank, proc in list(self.servers.items()):
                code = proc.exit_code()
                if code is None:
                    continue
                if not self._may_restart(proc.name, code):
                    self._say(f"{proc.name} exited with code {code} while workers were running; "
                              f"stopping the job")
                    return code or 1
                self._retired.append(proc)
                new = self._spawn_server(rank, replace=True)
                _wait_ready(self, new, time.monotonic() + self.config.startup_timeout)
                self._say(f"{new.name} restarted")
            codes = {rank: w.exit_code() for rank, w in self.workers.items()}
            for rank, code in codes.items():
                if code not in (None, 0) and self._may_restart(self.workers[rank].name, code):
                    self._retired.append(self.workers[rank])
                    self.start_worker(rank, restart=True)
                    codes[rank] = None
            failed = [(self.workers[r], c) for r, c in codes.items() if c not in (None, 0)]
            # The first to fail is the likely cause (the others may have failed because of it).
            failed.sort(key=lambda item: getattr(item[0], "exited_at", None) or float("inf"))
            if failed and self._shrink and len(failed) < len(codes):
                for worker, code in failed:
                    if worker not in self._shrunk:
                        self._shrunk.append(worker)
                        self._say(f"{worker.name} failed with exit code {code}; the other "
                                  f"workers go on without it (--on-worker-failure shrink)")
                failed = []
                codes = {r: c for r, c in codes.items()
                         if self.workers[r] not in self._shrunk}
            if failed:
                worker, code = failed[0]
                self._say(f"{worker.name} failed with exit code {code}; stopping the job")
                return code
            if all(c == 0 for c in codes.values()):
                if self._shrunk:
                    self._say(f"{len(codes)} workers finished; {len(self._shrunk)} failed and "
                              f"the job went on without them")
                else:
                    self._say(f"all {len(self.workers)} workers finished")
                return 0
            time.sleep(0.05)


def _federated_args(federated: FederatedConfig | None) -> list[str]:
    """The scheduler flags of a federated job's rounds."""
    if federated is None:
        return []
    args = ["--federated", "--clients-per-round", str(federated.clients_per_round),
            "--min-updates", str(federated.min_updates),
            "--round-timeout", repr(federated.round_timeout), "--rounds", str(federated.rounds),
            "--selection-seed", str(federated.seed),
            "--min-participants", str(federated.min_participants)]
    if federated.dp_clip:
        args += ["--dp-clip", repr(federated.dp_clip), "--dp-noise", repr(federated.dp_noise)]
    return args


def _checkpoint_args(config: LaunchConfig) -> list[str]:
    if not config.checkpoint_dir:
        return []
    args = ["--checkpoint-dir", config.checkpoint_dir, "--checkpoint-every",
            str(config.checkpoint_every), "--keep", str(config.keep)]
    return args + (["--resume"] if config.resume else [])


def _final_checkpoint(scheduler: str, security: Security, config: LaunchConfig, say,
                      why: str) -> None:
    """Checkpoint the job's final state (the scheduler and servers are still up); a failure is
    reported, not fatal: the periodic checkpoints are still there."""
    from paramserver.coordinator import checkpoint_reply_to_dict
    from paramserver.errors import ParamServerError
    from paramserver.status import call_scheduler
    from paramserver.v1 import paramserver_pb2 as pb

    timeout = config.final_checkpoint_timeout
    try:
        reply = call_scheduler(scheduler, "Checkpoint", pb.CheckpointRequest(timeout=timeout),
                               timeout=timeout + 5.0, what="final checkpoint", security=security)
        info = checkpoint_reply_to_dict(reply)
        say(f"{why}: final checkpoint {info['version']} written to {info['path']}")
    except ParamServerError as exc:
        say(f"{why}: the final checkpoint failed: {exc}")


def _stop_all(procs: list[_Proc], grace: float) -> None:
    live = [p for p in procs if p.exit_code() is None]
    for proc in reversed(live):  # workers first, the scheduler last
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        proc.wait(deadline - time.monotonic())
    for proc in procs:
        # The group may hold grandchildren even after the leader exited: kill it whole.
        proc.signal(signal.SIGKILL)
        proc.wait(5.0)
        proc.join_output(2.0)
