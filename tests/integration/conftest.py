"""Fixtures that run real scheduler and server processes on loopback (port 0).

Every process is started in its own process group and killed at teardown, whatever the test did.
Heartbeats are fast (0.2 s, dead after 1.5 s) so failure detection is testable in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import wait_for

HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 1.5
PS = [sys.executable, "-m", "paramserver"]


@pytest.fixture(autouse=True, params=["shm", "grpc"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every integration test runs twice: its workers' data through shared memory (required:
    PARAMSERVER_TRANSPORT=shm, so a silent fallback fails the test) and through gRPC. Afterwards
    nothing may be left in /dev/shm but the segments of a process killed between creating and
    unlinking one (the next start sweeps those)."""
    monkeypatch.setenv("PARAMSERVER_TRANSPORT", request.param)
    yield request.param
    from paramserver import shm

    def held() -> dict[str, int]:
        # A name exists while its worker's attach is in flight (at most a call), or for good
        # once that worker was killed meanwhile (then the sweep removes it). Only this test
        # session's processes count: another run on the same machine has segments of its own.
        names = [n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.PREFIX)]
        return {n: shm.owner(n) for n in names
                if shm.alive(shm.owner(n)) and _of_this_session(shm.owner(n))}

    deadline = time.monotonic() + 15
    while held() and time.monotonic() < deadline:
        time.sleep(0.1)
    owners = {pid: _cmdline(pid) for pid in set(held().values())}
    assert not owners, f"live processes keep segments in {shm.SHM_DIR}: {owners}"
    shm.sweep()
    left = [n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.PREFIX)
            and (not shm.alive(shm.owner(n)) or _of_this_session(shm.owner(n)))]
    assert not left, f"segments left in {shm.SHM_DIR}: {left}"


#: Marks every process this test session starts (inherited through the environment), so the
#: segment checks above tell this session's processes from another run's on the same machine.
_SESSION_MARK = f"PARAMSERVER_TEST_SESSION={os.getpid()}-{time.time_ns()}"
os.environ[_SESSION_MARK.split("=")[0]] = _SESSION_MARK.split("=")[1]


def _of_this_session(pid: int) -> bool:
    """Whether ``pid`` was started by this test session (or is it); unknown counts as ours."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return _SESSION_MARK.encode() in f.read().split(b"\0")
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return "?"


def start_node(args: list[str], ready_file: Path, log: Path,
               file_size_limit: int | None = None,
               env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """Start ``paramserver ARGS --ready-file F`` (with ``env`` added to the environment); wait
    for F; return the process and F's JSON. ``file_size_limit`` (bytes) sets RLIMIT_FSIZE in
    the node: a real "disk full" for its writes (CPython ignores SIGXFSZ, so the write fails
    with EFBIG)."""
    def limit() -> None:
        if file_size_limit is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    out = open(log, "w")
    proc = subprocess.Popen(PS + args + ["--ready-file", str(ready_file)], stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, **(env or {})),
                            preexec_fn=limit)
    out.close()

    def ready() -> dict | None:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{log.read_text()}")
        return json.loads(ready_file.read_text()) if ready_file.exists() else None

    return proc, wait_for(ready, 30, f"{args[0]} to write {ready_file}")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill a node's whole process group and reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class Cluster:
    """A running scheduler and servers; ``scheduler`` is its ``host:port``."""

    scheduler: str
    scheduler_proc: subprocess.Popen
    servers: list[subprocess.Popen] = field(default_factory=list)
    server_addresses: list[str] = field(default_factory=list)
    log_dir: Path | None = None

    def stop(self) -> None:
        """Kill every node of this cluster now (SIGKILL)."""
        _stop_cluster(self)

    def connect(self, **kwargs):
        import paramserver as ps
        kwargs.setdefault("timeout", 20.0)
        return ps.connect(self.scheduler, **kwargs)


def _start_cluster(tmp_path: Path, num_servers: int, num_workers: int = 0,
                   scheduler_args: tuple[str, ...] = (),
                   server_file_size_limit: int | None = None,
                   server_args: tuple[str, ...] = ()) -> Cluster:
    sched, info = start_node(
        ["scheduler", "--port", "0", "--num-servers", str(num_servers),
         "--num-workers", str(num_workers),
         "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
         "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), *scheduler_args],
        tmp_path / "scheduler.json", tmp_path / "scheduler.log")
    cluster = Cluster(info["address"], sched)
    try:
        for rank in range(num_servers):
            proc, sinfo = start_node(["server", "--scheduler", cluster.scheduler, "--rank",
                                      str(rank), *server_args], tmp_path / f"server-{rank}.json",
                                     tmp_path / f"server-{rank}.log", server_file_size_limit)
            cluster.servers.append(proc)
            cluster.server_addresses.append(sinfo["address"])
    except BaseException:
        _stop_cluster(cluster)
        raise
    return cluster


def _stop_cluster(cluster: Cluster) -> None:
    for proc in cluster.servers + [cluster.scheduler_proc]:
        kill(proc)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A scheduler and 2 servers, workers unspecified."""
    c = _start_cluster(tmp_path, 2)
    try:
        yield c
    finally:
        _stop_cluster(c)


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator:
    """Start clusters of any size: ``cluster_factory(num_servers, num_workers, scheduler_args=(),
    server_file_size_limit=None)``; ``stop_cluster(c)`` ends one early."""
    started: list[Cluster] = []

    def make(num_servers: int = 2, num_workers: int = 0, scheduler_args: tuple[str, ...] = (),
             server_file_size_limit: int | None = None,
             server_args: tuple[str, ...] = ()) -> Cluster:
        sub = tmp_path / f"c{len(started)}"
        sub.mkdir()
        started.append(_start_cluster(sub, num_servers, num_workers, scheduler_args,
                                      server_file_size_limit, server_args))
        started[-1].log_dir = sub
        return started[-1]

    try:
        yield make
    finally:
        for c in started:
            _stop_cluster(c)


def spawn_worker(cluster: Cluster, code: str, rank: int, num_workers: int) -> subprocess.Popen:
    """Start ``code`` as worker ``rank`` without waiting (read its output with communicate())."""
    env = dict(os.environ, PARAMSERVER_SCHEDULER=cluster.scheduler, PARAMSERVER_RANK=str(rank),
               PARAMSERVER_NUM_WORKERS=str(num_workers))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_workers(cluster: Cluster, code: str, num_workers: int,
                timeout: float = 120) -> list[str]:
    """Run ``code`` as workers 0..num_workers-1 at once; fail the test if any fails; stdouts."""
    procs = [spawn_worker(cluster, code, rank, num_workers) for rank in range(num_workers)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


def run_example(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command (an example, usually under ``paramserver launch``); fail the test with its
    output so far if it does not finish within ``timeout`` seconds."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        pytest.fail(f"{' '.join(args)} did not finish within {timeout} s; output so far:\n"
                    f"{output}")


def launch_example(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``paramserver launch --num-servers 2 --num-workers 2 -- python SCRIPT ARGS``."""
    return run_example(PS + ["launch", "--num-servers", "2", "--num-workers", "2", "--",
                             sys.executable, str(script), *args], timeout)


def example_result(proc: subprocess.CompletedProcess[str]) -> dict:
    """The JSON of the one ``RESULT {...}`` line an example prints (on rank 0), parsed as strict
    JSON (no NaN or Infinity)."""
    results = [line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines()
               if "RESULT {" in line]
    assert len(results) == 1, (f"expected one RESULT line (rank 0), found {len(results)}:\n"
                               f"{proc.stdout}\n{proc.stderr}")
    return json.loads(results[0], parse_constant=_not_json)


def _not_json(constant: str) -> None:
    """json.loads accepts NaN and Infinity, which are not JSON: a RESULT line must not hold them."""
    raise AssertionError(f"the RESULT line holds {constant}, which is not JSON")
