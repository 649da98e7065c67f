"""Surviving failures, with real processes: lost replies, fenced incarnations, a SIGKILLed server
or scheduler during training, and restarted workers (a server restarted without a checkpoint:
test_checkpoint_integrity.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver import rpc
from paramserver.status import fetch_status
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from tests.conftest import wait_for
from tests.integration.conftest import PS, kill, start_node

ROOT = Path(__file__).resolve().parents[2]


def test_lost_replies_are_retried_and_applied_exactly_once(cluster_factory):
    """Each server drops the reply of every 3rd write it applies (a test-only fault): the client
    retries those, and the servers answer the repeats from their reply cache. Every push adds
    exactly 1 to every element and row, so any double apply would show."""
    cluster = cluster_factory(2, server_args=("--fault-drop-reply-every", "3"))
    with cluster.connect(message_bytes=64 * 1024) as client:
        client.dense("w", (100_000,), ps.SGD(lr=1.0))  # several messages per server
        e = client.embedding("e", 4, ps.SGD(lr=1.0))
        ids = np.arange(50)
        for _ in range(30):
            client.push({"w": -np.ones(100_000, np.float32),
                         "e": (ids, -np.ones((50, 4), np.float32))})
        got = client.push_pull({"w": -np.ones(100_000, np.float32)})["w"]
        np.testing.assert_array_equal(got, np.full(100_000, 31, np.float32))
        np.testing.assert_array_equal(e.pull(ids), np.full((50, 4), 30, np.float32))


def _register(address: str, request: pb.RegisterRequest) -> pb.RegisterReply:
    channel = rpc.make_channel(address, ps.Security())
    try:
        return pb_grpc.SchedulerStub(channel).Register(request, timeout=10)
    finally:
        channel.close()


def test_an_older_incarnation_is_fenced_and_stops(cluster):
    """A second registration of server-1 with --replace supersedes the running one: the old
    incarnation's heartbeats are refused without refreshing anything, it stops serving and exits,
    and its late Deregister does not mark the new incarnation as gone."""
    before = fetch_status(cluster.scheduler)
    old = next(n for n in before["nodes"] if n["node_id"] == "server-1")
    reply = _register(cluster.scheduler, pb.RegisterRequest(
        role=pb.SERVER, address=cluster.server_addresses[1], requested_rank=1, replace=True,
        pid=os.getpid(), hostname="test"))
    assert reply.rank == 1 and reply.incarnation and reply.incarnation != old["incarnation"]
    assert reply.view_version > before["view_version"]
    # The old server learns it was superseded at its next heartbeat and exits on its own.
    cluster.servers[1].wait(timeout=30)
    assert cluster.servers[1].returncode == 0
    channel = rpc.make_channel(cluster.scheduler, ps.Security())
    try:
        stub = pb_grpc.SchedulerStub(channel)
        hb = stub.Heartbeat(pb.HeartbeatRequest(node_id="server-1",
                                                incarnation=old["incarnation"]), timeout=10)
        assert hb.superseded
        stub.Deregister(pb.DeregisterRequest(node_id="server-1", incarnation=old["incarnation"]),
                        timeout=10)
    finally:
        channel.close()
    node = next(n for n in fetch_status(cluster.scheduler)["nodes"] if n["node_id"] == "server-1")
    assert node["incarnation"] == reply.incarnation and not node["left"] and node["restarts"] == 1
    assert node["pid"] == os.getpid()


def test_a_call_to_a_dead_server_names_it_after_the_timeout(cluster):
    with cluster.connect(timeout=3) as client:
        w = client.dense("w", (100_000,), ps.SGD(lr=1.0))
        kill(cluster.servers[0])
        with pytest.raises(ps.NodeUnavailableError,
                           match=r"server-0 at .* is unreachable.*retried for 3\.0 s.*"
                                 r"\[scheduler: server-0 is (alive|dead \(missed heartbeats\))"):
            w.push(np.ones(100_000, np.float32))


#: The token of the launched jobs below, so the test can ask their scheduler for status.
TOKEN = "recovery-test-token"
SECURITY = ps.Security(token=TOKEN)


def _launch(args: list[str], script: list[str]) -> subprocess.Popen:
    return subprocess.Popen(PS + ["launch", *args, "--", sys.executable, *script],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env=dict(os.environ, PARAMSERVER_TOKEN=TOKEN))


def _kill_job(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _follow(proc: subprocess.Popen, until: str, lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if until in line:
            return
    raise AssertionError(f"the job ended before printing {until!r}:\n{''.join(lines)}")


def _result(lines: list[str]) -> dict:
    found = [json.loads(line.split("RESULT ", 1)[1]) for line in lines if "RESULT {" in line]
    assert len(found) == 1, "".join(lines)
    return found[0]


def _finish(proc: subprocess.Popen, lines: list[str], timeout: float = 300) -> int:
    out, _ = proc.communicate(timeout=timeout)
    lines.extend(out.splitlines(keepends=True))
    return proc.returncode


MLP = [str(ROOT / "examples" / "mlp.py"), "--dataset", "digits", "--epochs", "400"]


def _pid_of(scheduler: str, node_id: str) -> int:
    return next(n["pid"] for n in fetch_status(scheduler, security=SECURITY)["nodes"]
                if n["node_id"] == node_id)


@pytest.mark.slow
def test_training_survives_a_killed_server(tmp_path):
    """2 servers and 2 workers train the MLP with --checkpoint-every 2; server 1 is SIGKILLed
    mid-training. The launcher restarts it, it restores its shards from the newest checkpoint,
    the workers follow it to its new address, and the job ends with the accuracy of an
    uninterrupted run: at most 3 points below the lower of two uninterrupted runs. Asynchronous
    runs differ by about 1 point among themselves, and the restored server rolls back up to 2 s of
    its half of the model while the other half keeps its updates, which has cost up to 1.1 points
    more (CI: 97.1% against 98.2%). Exact restore values are asserted by
    test_a_server_restarted_mid_push_stream_is_followed."""
    common = ["--num-servers", "2", "--num-workers", "2", "--checkpoint-every", "2",
              "--max-restarts", "2"]
    # Two uninterrupted runs: asynchronous runs differ by about 1 point among themselves on the
    # 450-example digits test set (seen: 97.6-98.7%), so the reference is the lower of two.
    references = []
    for name in ("a1", "a2"):
        baseline = _launch(common + ["--checkpoint-dir", str(tmp_path / name)], MLP)
        base_lines: list[str] = []
        assert _finish(baseline, base_lines) == 0, "".join(base_lines)
        references.append(_result(base_lines)["test_accuracy"])

    proc = _launch(common + ["--checkpoint-dir", str(tmp_path / "b")], MLP)
    lines: list[str] = []
    try:
        _follow(proc, "starting 2 workers", lines)
        scheduler = lines[-1].split("scheduler at ", 1)[1].split(",", 1)[0]
        _follow(proc, "epoch 60/400", lines)
        wait_for(lambda: fetch_status(scheduler, security=SECURITY)["checkpoint"]["last_version"]
                 >= 1, 60, "a first checkpoint")
        os.kill(_pid_of(scheduler, "server-1"), signal.SIGKILL)
        node = wait_for(lambda: next(
            (n for n in fetch_status(scheduler, security=SECURITY)["nodes"]
             if n["node_id"] == "server-1"
             and n["restarts"] == 1 and n["restore_state"].startswith("restored")), None), 60,
            "server-1 to be restarted and restored")
        assert node["alive"]
        code = _finish(proc, lines)
    finally:
        _kill_job(proc)
    output = "".join(lines)
    assert code == 0, output
    assert "server 1 exited with code 137; restarting it" in output
    assert "restored" in output and "rolled back" in output
    # At most 3 points below the uninterrupted runs (a better result is not a failure).
    accuracy = _result(lines)["test_accuracy"]
    assert accuracy >= min(references) - 0.03, (accuracy, references)


@pytest.mark.slow
def test_training_survives_a_killed_scheduler(tmp_path):
    proc = _launch(["--num-servers", "2", "--num-workers", "2", "--checkpoint-dir",
                    str(tmp_path / "c"), "--max-restarts", "1"], MLP)
    lines: list[str] = []
    try:
        _follow(proc, "epoch 40/400", lines)
        os.kill(_scheduler_pid(), signal.SIGKILL)
        code = _finish(proc, lines)
    finally:
        _kill_job(proc)
    output = "".join(lines)
    assert code == 0, output
    assert "scheduler exited with code 137; restarting it" in output
    assert "scheduler restarted at" in output
    assert _result(lines)["test_accuracy"] > 0.9


def _scheduler_pid() -> int:
    import psutil

    launcher_children = psutil.Process(os.getpid()).children(recursive=True)
    for child in launcher_children:
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "scheduler" in cmd and "-m" in cmd and "paramserver" in cmd:
            return child.pid
    raise AssertionError("no scheduler process found")


_FLAKY = """
import os, sys, numpy as np, paramserver as ps
marker = sys.argv[1] + f".{os.environ['PARAMSERVER_RANK']}"
with ps.connect() as c:
    x = c.dense("x", 10, ps.SGD(lr=1.0))
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)          # the first run of each worker dies before pushing
    x.push(-np.ones(10, np.float32))
    c.barrier("done")
    if c.rank == 0:
        print("RESULT", float(x.pull()[0]))
"""


def test_launch_restarts_a_failed_worker(tmp_path):
    script = tmp_path / "flaky.py"
    script.write_text(_FLAKY)
    proc = subprocess.run(PS + ["launch", "--num-workers", "2", "--max-restarts", "1", "--",
                                sys.executable, str(script), str(tmp_path / "ran")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("exited with code 3; restarting it") == 2
    assert "RESULT 2.0" in proc.stdout
    # Without restarts the same failure ends the job with the worker's code.
    for marker in tmp_path.glob("ran.*"):
        marker.unlink()
    proc = subprocess.run(PS + ["launch", "--num-workers", "2", "--", sys.executable, str(script),
                                str(tmp_path / "ran")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3


def test_view_version_grows_with_membership_changes(cluster):
    v0 = fetch_status(cluster.scheduler)["view_version"]
    with cluster.connect():
        v1 = fetch_status(cluster.scheduler)["view_version"]
    v2 = fetch_status(cluster.scheduler)["view_version"]
    assert v0 < v1 < v2


def test_a_server_restarted_mid_push_stream_is_followed(cluster_factory, tmp_path):
    """Pushes keep flowing while server 1 is killed and a new incarnation restores from the
    checkpoint at another address: every push call returns; server 1 lost exactly the pushes it
    applied after the checkpoint (3, plus any the stream completed before the kill), and every
    push of the stream after the restore reached both servers once."""
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)))
    with cluster.connect(timeout=30) as client:
        w = client.dense("w", (50_000,), ps.SGD(lr=1.0))
        for _ in range(5):
            w.push(-np.ones(50_000, np.float32))
        client.checkpoint()
        for _ in range(3):  # lost on server 1 when it restores the checkpoint
            w.push(-np.ones(50_000, np.float32))
        errors: list[BaseException] = []
        done = threading.Event()

        def pusher() -> None:
            try:
                while not done.is_set():
                    w.push(-np.ones(50_000, np.float32))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=pusher)
        thread.start()
        kill(cluster.servers[1])
        proc, _ = start_node(["server", "--scheduler", cluster.scheduler, "--rank", "1",
                              "--replace"], tmp_path / "s1b.json", tmp_path / "s1b.log")
        cluster.servers.append(proc)
        wait_for(lambda: next(n for n in client.status()["nodes"]
                              if n["node_id"] == "server-1")["restore_state"].startswith(
                                  "restored"), 60, "server-1 restored")
        done.set()
        thread.join(60)
        assert not errors, errors
        values = w.pull()
        layout = client.table("w")._ref.layout
        on_1 = np.concatenate([np.arange(*layout.block_range(b))
                               for b, s in enumerate(layout.block_servers) if s == 1])
        on_0 = np.setdiff1d(np.arange(50_000), on_1)
        # Server 0 kept every push; server 1 lost those between the checkpoint and its restore.
        assert len(np.unique(values[on_0])) == 1 and len(np.unique(values[on_1])) == 1
        assert values[on_0][0] - values[on_1][0] >= 3 and values[on_1][0] >= 5


def test_status_shows_restarts_and_rolled_back_updates_in_text(cluster_factory, tmp_path):
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)))
    with cluster.connect(timeout=30) as client:
        w = client.dense("w", (50_000,), ps.SGD(lr=1.0))
        client.checkpoint()
        for _ in range(5):
            w.push(-np.ones(50_000, np.float32))
        wait_for(lambda: fetch_status(cluster.scheduler)["servers"][1]["push_requests"] >= 5, 30,
                 "a heartbeat carrying server-1's 5 pushes")
        kill(cluster.servers[1])
        proc, _ = start_node(["server", "--scheduler", cluster.scheduler, "--rank", "1",
                              "--replace"], tmp_path / "s1b.json", tmp_path / "s1b.log")
        cluster.servers.append(proc)
        wait_for(lambda: next(n for n in client.status()["nodes"]
                              if n["node_id"] == "server-1")["rolled_back"] > 0, 60,
                 "the rollback to be counted")
        owners = np.repeat(client.table("w")._ref.layout.block_servers,
                           [len(range(*client.table("w")._ref.layout.block_range(b)))
                            for b in range(len(client.table("w")._ref.layout.block_servers))])
        values = w.pull()
        assert (values[owners == 1] == 0).all() and (values[owners == 0] == 5).all()
    text = subprocess.run(PS + ["status", "--scheduler", cluster.scheduler], capture_output=True,
                          text=True, timeout=60).stdout
    line = next(line for line in text.splitlines() if line.strip().startswith("server-1"))
    assert "restored from checkpoint 1" in line and "updates rolled back" in line


_BARRIER_CROWD = """
import os, sys, threading, time, paramserver as ps
first, count, release = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
errors = []

def worker(rank):
    try:
        with ps.connect(rank=rank, num_workers=128, timeout=120) as c:
            if rank == 127:  # the last worker arrives only when the test says so
                while not os.path.exists(release):
                    time.sleep(0.05)
            c.barrier("crowd", timeout=120)
    except BaseException as exc:
        errors.append(f"{rank}: {exc!r}")

threads = [threading.Thread(target=worker, args=(r,)) for r in range(first, first + count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("ERRORS", errors)
sys.exit(1 if errors else 0)
"""


@pytest.mark.slow
def test_128_workers_wait_in_a_barrier_while_heartbeats_stay_on_time(cluster_factory, tmp_path):
    """127 workers wait in a barrier on a scheduler with 64 handler threads; while they wait,
    every node keeps being seen alive (its heartbeats get through); then the last one arrives and
    all 128 pass."""
    cluster = cluster_factory(1, 128, scheduler_args=("--heartbeat-interval", "0.5",
                                                      "--heartbeat-timeout", "5"))
    release = tmp_path / "release"
    procs = [subprocess.Popen([sys.executable, "-c", _BARRIER_CROWD, str(first), "64",
                               str(release)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, PARAMSERVER_SCHEDULER=cluster.scheduler))
             for first in (0, 64)]
    try:
        def arrived() -> bool:
            nodes = fetch_status(cluster.scheduler, timeout=30)["nodes"]
            return sum(n["role"] == "worker" for n in nodes) == 128
        wait_for(arrived, 120, "128 workers to register")
        for _ in range(8):  # ~8 status polls over a few seconds of waiting, each all alive
            nodes = fetch_status(cluster.scheduler, timeout=30)["nodes"]
            dead = [n["node_id"] for n in nodes if not n["alive"]]
            assert not dead, dead
            threading.Event().wait(0.4)
        release.touch()
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert all(p.returncode == 0 for p in procs), outputs
