"""``paramserver launch``: a whole job on this machine — a scheduler, N servers and W workers.

Each worker runs the user's command with ``PARAMSERVER_SCHEDULER``, ``PARAMSERVER_RANK`` and
``PARAMSERVER_NUM_WORKERS`` in its environment. Every process gets the job token in
``PARAMSERVER_TOKEN``: the one given, or a random one made for this job, so a local job is
protected without any flag. TLS files are handed over by path in ``PARAMSERVER_TLS_CERT``,
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

from paramserver.config import TLS_ENV, TOKEN_ENV, Security
from paramserver.rpc import MALLOC_ENV

__all__ = ["LaunchConfig", "launch"]


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
        startup_timeout: seconds allowed for the scheduler and servers to come up.
        grace: seconds between SIGTERM and SIGKILL when stopping processes.
        server_threads: gRPC handler threads per server.
        env: extra environment variables for every process.
        token: the job token handed to every process; empty: a random token made for this job.
        tls_cert / tls_key: paths of the PEM certificate and key the scheduler and servers serve
            TLS with (also presented by every process for mutual TLS); "" for none.
        tls_ca: path of the PEM CA certificates every process verifies its peers with.
        tls_client_auth: mutual TLS: the scheduler and servers require client certificates.
    """

    command: list[str]
    num_servers: int = 1
    num_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    startup_timeout: float = 60.0
    grace: float = 5.0
    server_threads: int = 16
    env: dict[str, str] = field(default_factory=dict)
    token: str = field(default="", repr=False)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_auth: bool = False

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("launch needs a worker command after --")
        if self.num_servers < 1 or self.num_workers < 1:
            raise ValueError(f"need at least 1 server and 1 worker, got {self.num_servers} and "
                             f"{self.num_workers}")
        Security(token=self.token)  # raises ValueError on a token gRPC metadata cannot carry


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
    """One child process whose output is copied line by line behind a prefix."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], out: IO[str],
                 lock: threading.Lock, watchdog: _Watchdog | None = None) -> None:
        self.name = name
        self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True, text=True, errors="replace",
                                      bufsize=1, preexec_fn=_die_with_launcher())
        if watchdog is not None:
            watchdog.watch(self.popen.pid)  # its own session: the group id is its pid
        self._thread = threading.Thread(target=self._pump, args=(out, lock), daemon=True,
                                        name=f"launch-{name}")
        self._thread.start()

    def _pump(self, out: IO[str], lock: threading.Lock) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with lock:
                out.write(f"[{self.name}] {line if line.endswith(chr(10)) else line + chr(10)}")
                out.flush()

    def exit_code(self) -> int | None:
        code = self.popen.poll()
        if code is not None and code < 0:
            return 128 - code  # killed by a signal: the shell's convention
        return code

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def join_output(self, timeout: float) -> None:
        self._thread.join(timeout)


def _wait_ready(proc: _Proc, ready_file: Path, deadline: float) -> dict:
    while True:
        if ready_file.exists():
            return json.loads(ready_file.read_text())
        code = proc.exit_code()
        if code is not None:
            raise LaunchError(f"{proc.name} exited with code {code} before it was ready")
        if time.monotonic() > deadline:
            raise LaunchError(f"{proc.name} was not ready within the startup timeout")
        time.sleep(0.02)


def launch(config: LaunchConfig, out: IO[str] | None = None) -> int:
    """Run a job to completion and return the launcher's exit code (see module doc).

    Blocks until every worker has exited, a worker fails, a server or the scheduler dies, or the
    process is interrupted; always stops every child before returning.
    """
    out = out or sys.stdout
    lock = threading.Lock()
    procs: list[_Proc] = []
    base_env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Workers run with this interpreter's environment first on PATH, so `python` in the worker
    # command is the Python (and the paramserver) that runs the launcher.
    base_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + base_env.get("PATH", "")
    # N processes each starting one BLAS/OpenMP thread per core oversubscribe the machine (seen:
    # 2.7x slower training on 2 cores); like torchrun, default to one thread per process.
    for var in _THREAD_VARIABLES:
        base_env.setdefault(var, "1")
    # Megabyte messages without a page fault per 4 KiB (rpc.tune_malloc): the launcher's decision
    # for the processes it starts, made through glibc's own variables, never from the library.
    if base_env.get("PARAMSERVER_TUNE_MALLOC", "1") != "0" and not any(
            var in base_env for var in MALLOC_ENV):
        base_env.update(MALLOC_ENV)
    base_env.update(config.env)
    # The token travels by environment, never on a command line (visible to every user in ps).
    base_env[TOKEN_ENV] = config.token or secrets.token_urlsafe(32)
    for name, variable in TLS_ENV.items():
        base_env[variable] = getattr(config, name)
    client_auth = ["--tls-client-auth"] if config.tls_client_auth else []
    node = [sys.executable, "-m", "paramserver"]

    def say(message: str) -> None:
        with lock:
            out.write(f"[launch] {message}\n")
            out.flush()

    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    for path in _clean_stale_dirs(tempfile.gettempdir()):
        say(f"removed {path}, left by a launcher that was killed")
    watchdog: _Watchdog | None = None
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as tmp:
            Path(tmp, _OWNER_FILE).write_text(f"{os.getpid()} {_process_start(os.getpid())}")
            watchdog = _Watchdog(tmp, config.grace)
            deadline = time.monotonic() + config.startup_timeout
            ready = Path(tmp, "scheduler.json")
            procs.append(_Proc("scheduler", node + [
                "scheduler", "--host", config.host, "--port", str(config.port),
                "--num-servers", str(config.num_servers), "--num-workers", str(config.num_workers),
                "--heartbeat-interval", str(config.heartbeat_interval),
                "--heartbeat-timeout", str(config.heartbeat_timeout),
                "--ready-file", str(ready)] + client_auth, base_env, out, lock, watchdog))
            scheduler = _wait_ready(procs[0], ready, deadline)["address"]
            servers = []
            for rank in range(config.num_servers):
                ready = Path(tmp, f"server-{rank}.json")
                servers.append((_Proc(f"server {rank}", node + [
                    "server", "--scheduler", scheduler, "--host", config.host, "--rank", str(rank),
                    "--threads", str(config.server_threads), "--ready-file", str(ready)]
                    + client_auth,
                    base_env, out, lock, watchdog), ready))
                procs.append(servers[-1][0])
            for proc, ready in servers:
                _wait_ready(proc, ready, deadline)
            say(f"scheduler at {scheduler}, {config.num_servers} servers ready; starting "
                f"{config.num_workers} workers: {' '.join(config.command)}")
            workers = []
            for rank in range(config.num_workers):
                env = dict(base_env, PARAMSERVER_SCHEDULER=scheduler, PARAMSERVER_RANK=str(rank),
                           PARAMSERVER_NUM_WORKERS=str(config.num_workers))
                workers.append(_Proc(f"worker {rank}", list(config.command), env, out, lock,
                                     watchdog))
            procs.extend(workers)
            return _supervise(procs[:1 + config.num_servers], workers, say)
    except LaunchError as exc:
        say(f"error: {exc}")
        return 1
    except FileNotFoundError as exc:
        say(f"error: cannot run {exc.filename!r}: {exc.strerror}")
        return 127
    except KeyboardInterrupt:
        say("interrupted; stopping every process")
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        _stop_all(procs, config.grace)
        if watchdog is not None:
            watchdog.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(nodes: list[_Proc], workers: list[_Proc], say) -> int:
    while True:
        for proc in nodes:
            code = proc.exit_code()
            if code is not None:
                say(f"{proc.name} exited with code {code} while workers were running; "
                    f"stopping the job")
                return code or 1
        codes = [w.exit_code() for w in workers]
        failed = [(w, c) for w, c in zip(workers, codes) if c not in (None, 0)]
        if failed:
            worker, code = failed[0]
            say(f"{worker.name} failed with exit code {code}; stopping the job")
            return code
        if all(c == 0 for c in codes):
            say(f"all {len(workers)} workers finished")
            return 0
        time.sleep(0.05)


def _stop_all(procs: list[_Proc], grace: float) -> None:
    live = [p for p in procs if p.popen.poll() is None]
    for proc in reversed(live):  # workers first, the scheduler last
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        # The group may hold grandchildren even after the leader exited: kill it whole.
        proc.signal(signal.SIGKILL)
        try:
            proc.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        proc.join_output(2.0)

