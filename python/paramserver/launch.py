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
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from paramserver.config import TLS_ENV, TOKEN_ENV, Security

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


class _Proc:
    """One child process whose output is copied line by line behind a prefix."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], out: IO[str],
                 lock: threading.Lock) -> None:
        self.name = name
        self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True, text=True, errors="replace",
                                      bufsize=1)
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

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="paramserver-launch-") as tmp:
            deadline = time.monotonic() + config.startup_timeout
            ready = Path(tmp, "scheduler.json")
            procs.append(_Proc("scheduler", node + [
                "scheduler", "--host", config.host, "--port", str(config.port),
                "--num-servers", str(config.num_servers), "--num-workers", str(config.num_workers),
                "--heartbeat-interval", str(config.heartbeat_interval),
                "--heartbeat-timeout", str(config.heartbeat_timeout),
                "--ready-file", str(ready)] + client_auth, base_env, out, lock))
            scheduler = _wait_ready(procs[0], ready, deadline)["address"]
            servers = []
            for rank in range(config.num_servers):
                ready = Path(tmp, f"server-{rank}.json")
                servers.append((_Proc(f"server {rank}", node + [
                    "server", "--scheduler", scheduler, "--host", config.host, "--rank", str(rank),
                    "--threads", str(config.server_threads), "--ready-file", str(ready)]
                    + client_auth,
                    base_env, out, lock), ready))
                procs.append(servers[-1][0])
            for proc, ready in servers:
                _wait_ready(proc, ready, deadline)
            say(f"scheduler at {scheduler}, {config.num_servers} servers ready; starting "
                f"{config.num_workers} workers: {' '.join(config.command)}")
            workers = []
            for rank in range(config.num_workers):
                env = dict(base_env, PARAMSERVER_SCHEDULER=scheduler, PARAMSERVER_RANK=str(rank),
                           PARAMSERVER_NUM_WORKERS=str(config.num_workers))
                workers.append(_Proc(f"worker {rank}", list(config.command), env, out, lock))
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

