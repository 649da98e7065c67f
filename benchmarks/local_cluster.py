"""A job on this machine for benchmarks: the scheduler in this process, servers as processes.

Servers must be separate processes (each holds the GIL while it parses requests); the scheduler is
on the control path only, so it can share the benchmark's process. Everything is stopped on every
path, including an exception during start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramserver as ps


class LocalCluster:
    """A scheduler and ``num_servers`` server processes; a context manager.

    Attributes:
        address: the scheduler's ``host:port``.
        server_pids: pid of each server, by rank.
    """

    def __init__(self, num_servers: int, num_workers: int = 0, server_args: tuple[str, ...] = (),
                 startup_timeout: float = 60.0, **scheduler_options: object) -> None:
        """``scheduler_options``: further :class:`paramserver.SchedulerConfig` fields
        (checkpoint_dir, resume, ...)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="paramserver-bench-")
        self._procs: list[subprocess.Popen] = []
        self.server_pids: list[int] = []
        self.scheduler = ps.Scheduler(ps.SchedulerConfig(
            port=0, num_servers=num_servers, num_workers=num_workers,
            **scheduler_options)).start()
        try:
            files = []
            for rank in range(num_servers):
                ready = Path(self._tmp.name) / f"server{rank}.json"
                files.append(ready)
                with open(Path(self._tmp.name) / f"server{rank}.log", "w") as log:
                    self._procs.append(subprocess.Popen(
                        [sys.executable, "-m", "paramserver", "server", "--scheduler",
                         self.address, "--rank", str(rank), "--ready-file", str(ready),
                         *server_args],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                        start_new_session=True))
            deadline = time.monotonic() + startup_timeout
            while not all(f.exists() for f in files):
                for rank, proc in enumerate(self._procs):
                    if proc.poll() is not None:
                        log = (Path(self._tmp.name) / f"server{rank}.log").read_text()
                        raise RuntimeError(f"server {rank} exited with {proc.returncode}:\n{log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"servers did not start within {startup_timeout} s")
                time.sleep(0.05)
            self.server_pids = [json.loads(f.read_text())["pid"] for f in files]
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        """The scheduler's ``host:port``."""
        return self.scheduler.address

    def stop(self) -> None:
        """Stop the servers (SIGTERM, then SIGKILL after 5 s) and the scheduler."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs = []
        self.scheduler.stop(grace=0)
        self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_processes(ctx: Any, target: Callable[..., None],
                  args_for: Callable[[int, Any], tuple[Any, ...]], count: int, timeout: float,
                  what: str = "worker") -> list[Any]:
    """Run ``count`` processes of ``target(*args_for(rank, results))`` (``ctx`` a multiprocessing
    context); each puts ``("ok", rank, value)`` or ``("error", rank, traceback)`` on ``results``.
    Returns the values by rank. Raises RuntimeError naming a failed, dead or late process; every
    process is stopped on every path."""
    results = ctx.Queue()
    procs: list[Any] = []
    try:
        for rank in range(count):
            p = ctx.Process(target=target, args=args_for(rank, results), daemon=True)
            p.start()
            procs.append(p)
        out: list[Any] = [None] * count
        deadline = time.monotonic() + timeout
        for _ in range(count):
            while True:
                try:
                    status, rank, value = results.get(timeout=1.0)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{what}s did not finish within {timeout:.0f} s")
                    dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                    if dead:
                        raise RuntimeError(f"a {what} died with exit code {dead[0].exitcode}")
            if status != "ok":
                raise RuntimeError(f"{what} {rank} failed:\n{value}")
            out[rank] = value
        for p in procs:
            p.join(timeout=30)
        return out
    finally:
        stop_processes(procs)


def stop_processes(procs: list[Any]) -> None:
    """Terminate multiprocessing processes still running (kill after 5 s) and reap them."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
