"""The paramserver command: scheduler and server start and stop, status, launch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import paramserver as ps
from tests.conftest import wait_for
from tests.integration.conftest import PS, start_node

LAUNCH_TIMEOUT = 120


def test_scheduler_and_server_stop_cleanly_on_sigterm(tmp_path):
    sched, info = start_node(["scheduler", "--port", "0", "--num-servers", "1"],
                             tmp_path / "s.json", tmp_path / "s.log")
    server, sinfo = start_node(["server", "--scheduler", info["address"]], tmp_path / "v.json",
                               tmp_path / "v.log")
    try:
        assert sinfo["rank"] == 0 and sinfo["pid"] == server.pid
        for address in (info["address"], sinfo["address"]):  # the standard health service
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for proc in (server, sched):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        assert "stopping" in (tmp_path / "v.log").read_text()
    finally:
        for proc in (server, sched):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_server_without_scheduler_exits_with_error_naming_it(tmp_path):
    result = subprocess.run(PS + ["server", "--scheduler", "127.0.0.1:1", "--timeout", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "scheduler at 127.0.0.1:1 unreachable" in result.stderr


def test_status_reports_nodes_tables_and_traffic(cluster):
    with cluster.connect() as client:
        t = client.dense("layer.weight", shape=(64, 1000), optimizer=ps.Adam(lr=0.01),
                         block_size=10_000)
        for _ in range(3):
            t.push(np.ones((64, 1000), np.float32))
        t.pull()

        def status_json() -> dict:
            out = subprocess.run(PS + ["status", "--scheduler", cluster.scheduler, "--json"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            return json.loads(out)

        # Server statistics travel with heartbeats: wait until they show the pushes.
        status = wait_for(lambda: (s := status_json()) and
                          sum(x["push_requests"] for x in s["servers"]) >= 6 and s,
                          15, "status to show 3 pushes on 2 servers")
        roles = sorted((n["role"], n["rank"]) for n in status["nodes"])
        assert roles == [("server", 0), ("server", 1), ("worker", 0)]
        assert all(n["alive"] for n in status["nodes"])
        assert {n["address"] for n in status["nodes"] if n["role"] == "server"} == set(
            cluster.server_addresses)
        table = status["tables"][0]
        assert table["name"] == "layer.weight" and table["shape"] == [64, 1000]
        assert table["optimizer"]["name"] == "Adam" and table["optimizer"]["lr"] == 0.01
        assert table["blocks_per_server"] == [4, 3]  # 7 blocks of 10,000 balanced by bytes
        # Adam keeps 2 state values per element: values + state = 3 x 4 bytes per element.
        assert sum(table["bytes_per_server"]) == 64_000 * 12
        assert [s["push_requests"] for s in status["servers"]] == [3, 3]
        assert sum(s["bytes_in"] for s in status["servers"]) == 3 * 64_000 * 4
        text = subprocess.run(PS + ["status", "--scheduler", cluster.scheduler],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        assert "layer.weight" in text and "blocks s0:4 s1:3" in text and "worker-0" in text


def test_a_worker_waiting_for_a_wrong_scheduler_says_so_every_few_seconds():
    """A wrong PARAMSERVER_SCHEDULER is not a silent minute: the address, the time so far and
    the deadline are logged every 5 s until the worker gives up (membership.REPORT_EVERY)."""
    code = "import paramserver as ps; ps.connect(timeout=7)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PARAMSERVER_SCHEDULER="127.0.0.1:1"))
    assert result.returncode == 1 and "NodeUnavailableError" in result.stderr, result.stderr
    waiting = [line for line in result.stderr.splitlines() if "still waiting" in line]
    assert waiting, result.stderr  # at about 5 s
    pattern = (r"worker: still waiting for the scheduler at 127\.0\.0\.1:1 to answer its "
               r"registration: (\d+) s so far, giving up after 7 s \(is the address right\? "
               r"--scheduler / PARAMSERVER_SCHEDULER\)")
    so_far = [int(re.fullmatch(pattern, line).group(1)) for line in waiting]
    assert 5 <= so_far[0] <= 7, so_far


def test_a_worker_waiting_for_servers_says_so_every_few_seconds(tmp_path):
    """A scheduler whose servers never come: the worker says what it waits for, not silence."""
    sched, info = start_node(["scheduler", "--port", "0", "--num-servers", "1"],
                             tmp_path / "s.json", tmp_path / "s.log")
    try:
        code = "import paramserver as ps; ps.connect(timeout=7)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60,
                                env=dict(os.environ, PARAMSERVER_SCHEDULER=info["address"]))
    finally:
        sched.kill()
        sched.wait(10)
    assert result.returncode == 1 and "PSTimeoutError" in result.stderr, result.stderr
    assert "only 0 of 1 servers registered" in result.stderr
    waiting = [line for line in result.stderr.splitlines() if "still waiting" in line]
    assert waiting and re.fullmatch(
        rf"worker-0: still waiting for the job's servers to register with the scheduler at "
        rf"{re.escape(info['address'])}: \d+ s so far, giving up after 7 s", waiting[0]), \
        result.stderr


def test_status_of_unreachable_scheduler_is_an_error_not_a_hang():
    result = subprocess.run(PS + ["status", "--scheduler", "127.0.0.1:1", "--timeout", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "scheduler at 127.0.0.1:1" in result.stderr


def test_status_pointed_at_a_server_names_the_scheduler(cluster):
    """Not "Method not found!": the address is a server, and its scheduler is named."""
    server = cluster.server_addresses[0]
    for command in (["status"], ["checkpoint", "--timeout", "5"]):
        result = subprocess.run(PS + command + ["--scheduler", server], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1, result
        assert (f"{server} is a parameter server (server-0 at {server}), not the job's "
                f"scheduler; its scheduler is at {cluster.scheduler}: give --scheduler "
                f"{cluster.scheduler}") in result.stderr, result.stderr
        assert "Method not found" not in result.stderr
    with grpc.insecure_channel(server) as channel:  # the server keeps serving
        assert health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def launch(*args: str, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(PS + ["launch", "--heartbeat-interval", "0.2", *args], capture_output=True,
                          text=True, timeout=timeout)


WORKER_ENV = ("import os; print('ENV', os.environ['PARAMSERVER_RANK'], "
              "os.environ['PARAMSERVER_NUM_WORKERS'], os.environ['PARAMSERVER_SCHEDULER'])")


def test_launch_runs_workers_with_their_environment_and_prefixed_output():
    result = launch("--num-servers", "2", "--num-workers", "3", "--", sys.executable, "-c",
                    WORKER_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    envs = sorted(line for line in lines if " ENV " in line)
    assert [line.split()[:4] for line in envs] == [
        ["[worker", "0]", "ENV", "0"], ["[worker", "1]", "ENV", "1"], ["[worker", "2]", "ENV", "2"]]
    assert all(line.split()[4] == "3" for line in envs)
    assert len({line.split()[5] for line in envs}) == 1  # one scheduler address for all
    assert any(line.startswith("[server 1] server-1 serving on") for line in lines)
    assert "[launch] all 3 workers finished" in result.stdout


#: Rank 0 succeeds, rank 1 fails with 4, rank 2 fails with 5 only once rank 1 has exited (not
#: after a fixed sleep, which a loaded machine can outlast), so rank 1 is the first to fail.
_FAIL_IN_ORDER = """
import os, sys, time
rank, pid_file = int(os.environ["PARAMSERVER_RANK"]), sys.argv[1]
if rank == 1:
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    sys.exit(4)
if rank == 2:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(int(open(pid_file).read()), 0)  # rank 1 still there (or not started yet)
        except FileNotFoundError:
            pass
        except ProcessLookupError:
            sys.exit(5)
        time.sleep(0.02)
    print("rank 2: waited 60 s for rank 1 to exit", flush=True)
    sys.exit(99)
"""


def test_launch_exits_with_the_first_failing_workers_code(tmp_path):
    result = launch("--num-servers", "1", "--num-workers", "3", "--", sys.executable, "-c",
                    _FAIL_IN_ORDER, str(tmp_path / "rank1.pid"))
    assert result.returncode == 4, result.stdout
    assert "[launch] worker 1 failed with exit code 4" in result.stdout


def test_launch_with_a_missing_command_fails_clearly():
    result = launch("--num-workers", "1", "--", "/nonexistent/worker")
    assert result.returncode == 127
    assert "cannot run '/nonexistent/worker'" in result.stdout


def _descendants_after(proc: subprocess.Popen, count: int) -> list[psutil.Process]:
    parent = psutil.Process(proc.pid)
    return wait_for(lambda: (kids := parent.children(recursive=True)) and len(kids) >= count
                    and kids, 60, f"{count} processes under the launcher")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_launch_stops_every_process_on_interrupt(tmp_path, sig, code):
    # Workers that would run for a minute, each with a child of its own.
    worker = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen(PS + ["launch", "--num-servers", "2", "--num-workers", "2", "--",
                                  sys.executable, "-c", worker],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # scheduler + 2 servers + 2 workers + 2 grandchildren + the watchdog
        kids = _descendants_after(proc, 8)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == code, out
        assert "interrupted; stopping every process" in out
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launch_stops_everything_when_a_server_dies():
    worker = "import time; print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen(PS + ["launch", "--num-servers", "2", "--num-workers", "1", "--",
                                  sys.executable, "-c", worker],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kids = _descendants_after(proc, 5)  # scheduler, 2 servers, the worker, the watchdog
        server = next(k for k in kids if "server" in k.cmdline() and "--rank" in k.cmdline()
                      and k.cmdline()[k.cmdline().index("--rank") + 1] == "1")
        os.kill(server.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 137, out
        assert "server 1 exited with code 137 while workers were running" in out
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _is_watchdog(process: psutil.Process) -> bool:
    try:
        return "import os, shutil, signal, sys, time" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


_SLEEPER = "import time; time.sleep(60)"


def _launched_job(launcher: subprocess.Popen, nodes: int,
                  grandchildren: int) -> tuple[list, list, psutil.Process] | None:
    """(the launcher's children but the watchdog, the workers' children, the watchdog) once the
    launcher has ``nodes`` such children and the watchdog, every one of them past its exec, and
    the workers' ``grandchildren`` children run their own command; else None. Taken from the
    process tree, not by counting descendants: a process between fork and exec still shows its
    parent's command line, and a busy machine makes that window long."""
    try:
        parent = psutil.Process(launcher.pid)
        own = parent.cmdline()
        direct = parent.children()
        if any(_cmdline(k) in ([], own) for k in direct):
            return None  # not past its exec yet
        watchdogs = [k for k in direct if _is_watchdog(k)]
        children = [k for k in direct if not _is_watchdog(k)]
        below = [g for k in children for g in k.children()]
        if (len(watchdogs), len(children), len(below)) != (1, nodes, grandchildren) or any(
                _cmdline(g)[-1:] != [_SLEEPER] for g in below):
            return None
        return children, below, watchdogs[0]
    except psutil.NoSuchProcess:
        return None


@pytest.mark.parametrize("watchdog_too", [False, True])
def test_kill_9_of_the_launcher_leaves_no_process_behind(tmp_path, watchdog_too):
    # Workers that would run for a minute, each with a child of its own.
    worker = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"{_SLEEPER!r}]); print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen(PS + ["launch", "--num-servers", "2", "--num-workers", "2", "--",
                                  sys.executable, "-c", worker],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TMPDIR=str(tmp_path)), start_new_session=True)
    kids: list[psutil.Process] = []
    try:
        # The launcher's own children (scheduler, 2 servers, 2 workers), each worker's child and
        # the watchdog, all running their own commands.
        direct, below, watchdog = wait_for(
            lambda: _launched_job(proc, 5, 2), 120, "the scheduler, 2 servers, 2 workers, the "
            "workers' 2 children and the watchdog under the launcher, each past its exec")
        kids = direct + below + [watchdog]
        assert len(list(tmp_path.glob("paramserver-launch-*"))) == 1
        if watchdog_too:  # the kernel alone (PR_SET_PDEATHSIG) must stop the direct children
            watchdog.kill()
            wait_for(lambda: _dead(watchdog), 30, "the watchdog to die")
        proc.kill()
        proc.wait(30)
        expected = direct if watchdog_too else kids
        gone, alive = psutil.wait_procs(expected, timeout=30)
        assert not alive, f"left behind: {alive}"
        if not watchdog_too:  # the watchdog also removed the launcher's directory
            wait_for(lambda: not list(tmp_path.glob("paramserver-launch-*")), 30,
                     "the watchdog to remove the launcher's directory")
    finally:
        for k in kids:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by the launcher
    except psutil.NoSuchProcess:
        return True


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return []


def test_the_next_launch_removes_directories_of_killed_launchers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "paramserver-launch-stale"
    stale.mkdir()
    (stale / "launcher.pid").write_text(f"{dead.pid} 1")
    (stale / "scheduler.json").write_text("{}")
    live = tmp_path / "paramserver-launch-live"  # a running launcher's: this test process
    live.mkdir()
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (live / "launcher.pid").write_text(f"{os.getpid()} {start}")
    result = subprocess.run(PS + ["launch", "--", sys.executable, "-c", "pass"],
                            env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed {stale}, left by a launcher that was killed" in result.stdout
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paramserver-launch-live"]


def test_malloc_is_tuned_by_the_launcher_not_by_the_library(cluster):
    probe = ("import os, paramserver as ps, paramserver.rpc as rpc\n"
             "with ps.connect(timeout=20) as c:\n"
             "    c.dense('w', (2,), ps.SGD()).pull()\n"
             "print('TUNED', rpc._MALLOC_TUNED, os.environ.get('MALLOC_MMAP_THRESHOLD_'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           env=dict(env, PARAMSERVER_SCHEDULER=cluster.scheduler), timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert "TUNED False None" in plain.stdout  # connect() left the process's malloc alone
    launched = subprocess.run(PS + ["launch", "--", sys.executable, "-c", probe], env=env,
                              capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert f"TUNED False {32 * 1024 * 1024}" in launched.stdout
    opted_out = subprocess.run(PS + ["launch", "--", sys.executable, "-c", probe],
                               env=dict(env, PARAMSERVER_TUNE_MALLOC="0"), capture_output=True,
                               text=True, timeout=LAUNCH_TIMEOUT)
    assert "TUNED False None" in opted_out.stdout, opted_out.stdout + opted_out.stderr
