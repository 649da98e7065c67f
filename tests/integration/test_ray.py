"""Jobs on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``, 3 nodes on this
machine, one cluster for the module): the servers on different nodes, the no-loss check (exact
sums) across them, exit codes of failing workers from the command line and from Python, Ctrl-C,
and a server whose node is removed mid-training restarted on another node, restored from the
checkpoint. After every job: no actor, placement group or process of the job is left.

Nodes: the head (the driver's node: the scheduler and, by the "trainer" resource, the workers)
and two nodes with the "ps_server" resource that only the servers ask for.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for
from tests.integration import noloss

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "paramserver[ray]")')
from ray.cluster_utils import Cluster  # noqa: E402

import paramserver.ray as psray  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PS = [sys.executable, "-m", "paramserver"]
OBJECT_STORE = 80 * 1024 * 1024
#: Servers ask for "ps_server" (only on the two non-head nodes), workers for "trainer" (head).
SERVERS_APART = psray.RayOptions(server_resources={"ps_server": 1}, server_cpus=0.5,
                                 server_memory=256 << 20, worker_cpus=0.5,
                                 worker_memory=128 << 20, worker_resources={"trainer": 1},
                                 placement_strategy="STRICT_SPREAD")
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0, "grace": 3.0}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    head = {"num_cpus": 2, "resources": {"trainer": 4}, "include_dashboard": False,
            "object_store_memory": OBJECT_STORE,
            # Detect a removed node within ~1.5 s instead of ~30 s.
            "_system_config": {"health_check_initial_delay_ms": 0,
                               "health_check_period_ms": 500,
                               "health_check_failure_threshold": 3}}
    made = Cluster(initialize_head=True, head_node_args=head)
    session = made.head_node.get_session_dir_path()
    try:
        for _ in range(2):
            made.add_node(num_cpus=2, resources={"ps_server": 2}, object_store_memory=OBJECT_STORE)
        made.wait_for_nodes()
        ray.init(address=made.address, log_to_driver=False, configure_logging=False)
        yield made
    finally:
        ray.shutdown()
        made.shutdown()
        # Nothing of the cluster is left: no raylet, GCS or worker of this session.
        wait_for(lambda: not _processes(lambda cmd, env: session in cmd), 30,
                 "the Ray cluster's processes to exit", interval=0.2)
        shutil.rmtree(session, ignore_errors=True)  # the session's sockets and logs
        latest = Path(session).parent / "session_latest"
        if latest.is_symlink() and os.readlink(latest) == session:
            latest.unlink()


def _processes(match) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if match(cmd, None) or match(cmd, proc.environ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _job_processes(token: str) -> list[psutil.Process]:
    """Processes of the job whose token or job secret is ``token`` (every process of a job has
    it in its environment), and any actor's watchdog (its temporary directory is ``paramserver-ray-*``)."""
    return _processes(lambda cmd, env: "paramserver-ray-" in cmd if env is None
                      else token in (env.get("PARAMSERVER_TOKEN"),
                                     env.get("PARAMSERVER_JOB_SECRET")))


def _assert_nothing_left(token: str) -> None:
    """No actor or placement group of a paramserver job, and no process of the job with
    ``token``."""
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith("paramserver-")]
    assert not actors, f"actors left behind: {actors}"
    groups = [g for g in ray.util.placement_group_table().values()
              if g["name"].startswith("paramserver-") and g["state"] != "REMOVED"]
    assert not groups, f"placement groups left behind: {groups}"
    wait_for(lambda: not _job_processes(token), 30, f"the processes of job {token} to exit",
             interval=0.2)


def _placements(output: str) -> dict[str, str]:
    """Role -> Ray node id (prefix) from the launcher's "X runs on Ray node N" lines (the last
    one of each role)."""
    return {m[0]: m[1] for m in re.findall(r"\[launch\] (\w+(?: \d+)?) runs on Ray node (\w+)",
                                           output)}


def _node_ids(cluster: Cluster) -> dict[str, object]:
    return {node.node_id: node for node in cluster.list_all_nodes()}


def test_an_unreachable_ray_address_is_named():
    """Runs without the cluster: a port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    done = subprocess.run(PS + ["launch", "--ray", address, "--", "true"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert f"cannot reach the Ray cluster at {address}" in done.stderr, done.stderr


def _train_noloss() -> dict | None:
    import paramserver as ps

    with ps.connect(timeout=60) as client:
        print(f"rank {client.rank} of {client.num_workers} connected", flush=True)
        return noloss.train(client)


def test_a_training_job_across_ray_nodes_loses_nothing(cluster):
    out = io.StringIO()
    results = psray.launch(_train_noloss, 2, 2, options=SERVERS_APART, out=out,
                           token="job-noloss", **FAST)
    output = out.getvalue()
    placed = _placements(output)
    nodes = _node_ids(cluster)
    head = cluster.head_node.node_id

    def node(role: str) -> str:
        return next(n for n in nodes if n.startswith(placed[role]))

    # The servers on two different nodes, neither the head; the scheduler and workers on it.
    assert node("server 0") != node("server 1") and head not in (node("server 0"),
                                                                 node("server 1"))
    assert node("scheduler") == head and node("worker 0") == head == node("worker 1")
    # Every node advertises the address Ray knows its node by, never loopback.
    ip = cluster.head_node.node_ip_address
    assert re.search(rf"\[server 1\] server-1 serving on {re.escape(ip)}:\d+", output), output
    assert "127.0.0.1" not in output
    for rank in (0, 1):
        assert f"[worker {rank}] rank {rank} of 2 connected" in output, output
    assert "[launch] all 2 workers finished" in output
    assert results[1] is None
    noloss.check(results[0], 2, "Ray, 3 nodes (servers on 2 nodes, STRICT_SPREAD)")
    _assert_nothing_left("job-noloss")


#: Rank 1 fails with 3; rank 0 fails with 1 a tenth of a second later (as a worker failing
#: because another did would). The launcher polls Ray every 0.2 s, so it often sees both at
#: once: it must still name the first, by when each exited.
def test_a_job_with_mutual_tls_on_ray_loses_nothing(cluster, tmp_path):
    """The TLS files travel by path to every node (here one file system); the certificate names
    the address the nodes bind, the IP Ray knows their node by."""
    from tests.integration import tls_certs

    ca, ca_cert, ca_key = tls_certs.make_ca(tmp_path)
    pair = tls_certs.issue(tmp_path, "node", ca_cert, ca_key,
                           ips=(cluster.head_node.node_ip_address,))
    out = io.StringIO()
    results = psray.launch(_train_noloss, 2, 2, options=SERVERS_APART, out=out,
                           tls_cert=str(pair.cert), tls_key=str(pair.key), tls_ca=str(ca.cert),
                           tls_client_auth=True, token="job-tls", **FAST)
    assert "mutual TLS" in out.getvalue()  # how each node says it serves
    noloss.check(results[0], 2, "Ray, 3 nodes, mutual TLS and token")
    _assert_nothing_left("job-tls")


FAILING_WORKER = r"""
import sys, time, paramserver as ps
with ps.connect(timeout=60) as client:
    client.barrier("up")
    print(f"rank {client.rank} up", flush=True)
    if client.rank == 0:
        time.sleep(0.1)
    sys.exit(3 if client.rank == 1 else 1)
"""


def test_a_failing_workers_exit_code_ends_the_job_from_the_command_line(cluster):
    proc = subprocess.run(
        PS + ["launch", "--ray", cluster.address, "--num-servers", "2", "--num-workers", "2",
              "--ray-server-resources", '{"ps_server": 1}', "--ray-server-cpus", "0.5",
              "--ray-worker-cpus", "0.5", "--ray-worker-resources", '{"trainer": 1}',
              "--heartbeat-interval", "0.2", "--",
              "python", "-c", FAILING_WORKER],
        capture_output=True, text=True, timeout=150, cwd=ROOT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PARAMSERVER_TOKEN="job-cli-fail"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "[launch] worker 1 failed with exit code 3; stopping the job" in output
    assert "[worker 0] rank 0 up" in output and "[worker 1] rank 1 up" in output
    _assert_nothing_left("job-cli-fail")


def _exit_on_rank_1() -> None:
    import paramserver as ps

    with ps.connect(timeout=60) as client:
        client.barrier("up")
        if client.rank == 1:
            raise SystemExit(4)
        time.sleep(120)  # until the launcher stops the job


def _roles_probe() -> dict:
    import os

    import numpy as np

    import paramserver as ps
    from paramserver.v1 import paramserver_pb2 as pb

    with ps.connect(timeout=60) as client:
        try:
            client._pool.call(0, "PrepareCut", pb.PrepareCutRequest(cut=5, lease=1e9), "attack")
            denied = ""
        except ps.PermissionDeniedError as exc:
            denied = str(exc)
        table = client.dense("w", (2,), ps.SGD(lr=1.0))
        table.push(np.ones(2, np.float32))
        return {"token": os.environ.get("PARAMSERVER_TOKEN", ""),
                "secret": os.environ.get("PARAMSERVER_JOB_SECRET", ""),
                "secret_file": os.environ.get("PARAMSERVER_JOB_SECRET_FILE", ""),
                "denied": denied, "values": table.pull().tolist()}


def test_ray_gives_the_secret_to_the_control_plane_and_workers_their_role_token(cluster):
    from paramserver.roles import derive_token

    secret = "job-ray-secret-5e1f"
    out = io.StringIO()
    [result] = psray.launch(_roles_probe, 2, 1, options=SERVERS_APART, out=out,
                            job_secret=secret, **FAST)
    assert result["token"] == derive_token(secret, "worker")
    assert result["secret"] == result["secret_file"] == ""
    assert "PrepareCut is not allowed to the worker role (allowed: control)" in result["denied"]
    assert result["values"] == [-1.0, -1.0]
    assert "protection: per-role credentials (job secret)" in out.getvalue()
    _assert_nothing_left(secret)
    _assert_nothing_left(result["token"])


def test_a_failing_worker_raises_from_python_naming_it(cluster):
    with pytest.raises(psray.RayJobError,
                       match=r"exit code 4: worker 1 failed with exit code 4") as info:
        psray.launch(_exit_on_rank_1, 1, 2, options=SERVERS_APART, out=io.StringIO(),
                     token="job-py-fail", **FAST)
    assert info.value.exit_code == 4
    _assert_nothing_left("job-py-fail")


SLOW_WORKER = r"""
import time, paramserver as ps
with ps.connect(timeout=60) as client:
    print(f"rank {client.rank} training", flush=True)
    time.sleep(120)
"""


def test_ctrl_c_stops_every_actor(cluster):
    proc = subprocess.Popen(
        PS + ["launch", "--ray", cluster.address, "--num-servers", "2", "--num-workers", "2",
              "--ray-server-resources", '{"ps_server": 1}', "--ray-server-cpus", "0.5",
              "--ray-worker-cpus", "0.5", "--ray-worker-resources", '{"trainer": 1}', "--",
              "python", "-c", SLOW_WORKER],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        stdin=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, PARAMSERVER_TOKEN="job-ctrl-c"))
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if sum("training" in x for x in lines) == 2:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        lines.append(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    output = "".join(lines)
    assert proc.returncode == 130, output
    assert "[launch] interrupted; stopping every process" in output
    _assert_nothing_left("job-ctrl-c")


def test_servers_that_cannot_be_placed_fail_the_job_naming_what_they_need(cluster):
    """3 servers, one per node (STRICT_SPREAD), but only 2 nodes have "ps_server"."""
    with pytest.raises(psray.RayJobError,
                       match=r"exit code 1: error: Ray could not place the 3 servers' bundles "
                             r"\(\{'CPU': 0\.5, 'memory': .*'ps_server': 1\.0\} each, "
                             r"STRICT_SPREAD\) within 4 s"):
        psray.launch(_train_noloss, 3, 1, options=SERVERS_APART, out=io.StringIO(),
                     startup_timeout=4, token="job-unplaced", **FAST)
    _assert_nothing_left("job-unplaced")


def _fail_node(cluster: Cluster, node) -> None:
    """The node dies as a machine does: every process on it at once (its Ray processes, the
    actors' worker processes and what they started), then the cluster forgets it."""
    raylets = [info.process.pid for info in node.all_processes.get("raylet", [])]
    assert raylets, "the node has no raylet"
    doomed = []
    for pid in raylets:
        root = psutil.Process(pid)
        doomed += [root] + root.children(recursive=True)
    # The actors' folders (named on their watchdogs' command lines) would go with the machine;
    # on this one they are removed by hand.
    folders = {arg for proc in doomed for arg in _cmdline(proc)
               if Path(arg).name.startswith("paramserver-ray-")}
    for proc in doomed:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)
    assert folders, "no actor of the job ran on the node"
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _train_through_node_loss(flags: str) -> dict | None:
    """The no-loss pushes, paused halfway: after every worker's first half, rank 0 takes a
    checkpoint, says so (flags/ready) and every worker waits for flags/go (the test removes the
    node of server 1 in between). The second half goes to the restarted server, restored from
    that checkpoint, so the sums are exact again."""
    import paramserver as ps

    def pause(client) -> None:
        if client.rank == 0:
            client.checkpoint({"half": True})
        client.barrier("checkpointed")
        if client.rank == 0:
            Path(flags, "ready").write_text("1")
        deadline = time.monotonic() + 120
        while not Path(flags, "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never said go")
            time.sleep(0.05)

    with ps.connect(timeout=120) as client:
        result = noloss.train(client, pause_at=noloss.STEPS // 2, pause=pause)
        if result is not None:
            server = next(n for n in client.status()["nodes"] if n["node_id"] == "server-1")
            result.update(restarts=server["restarts"], restore_state=server["restore_state"])
        return result


@pytest.mark.timeout(240)
def test_a_server_whose_node_is_removed_restarts_elsewhere_and_the_job_finishes(cluster,
                                                                              tmp_path):
    """Runs last: it removes a node (and runs once per transport: a node removed by the first
    run is replaced first). The servers are placed with SPREAD so that the bundle of the lost
    node can move to the other server node."""
    while len(cluster.list_all_nodes()) < 3:
        cluster.add_node(num_cpus=2, resources={"ps_server": 2}, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    options = psray.RayOptions(server_resources={"ps_server": 1}, server_cpus=0.5,
                               worker_cpus=0.5, worker_resources={"trainer": 1},
                               placement_strategy="SPREAD")
    flags = tmp_path / "flags"
    flags.mkdir()
    out = io.StringIO()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["results"] = psray.launch(
                _train_through_node_loss, 2, 2, args=(str(flags),), options=options, out=out,
                checkpoint_dir=str(tmp_path / "ckpt"), max_restarts=2,
                token="job-node-loss", **FAST)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: (flags / "ready").exists() or "error" in outcome, 120,
             "the first half and its checkpoint")
    assert "error" not in outcome, f"{outcome['error']}\n{out.getvalue()}"
    # What _assert_nothing_left looks for is there while the job runs: its 5 processes (at
    # least: a worker's command may have children) and the actors' 5 watchdogs.
    assert len(_job_processes("job-node-loss")) >= 10
    before = _placements(out.getvalue())
    nodes = _node_ids(cluster)
    lost = next(n for n in nodes if n.startswith(before["server 1"]))
    assert lost != cluster.head_node.node_id
    _fail_node(cluster, nodes[lost])
    (flags / "go").write_text("1")
    thread.join(200)
    output = out.getvalue()
    assert not thread.is_alive(), f"the job did not end:\n{output}"
    assert "error" not in outcome, f"{outcome['error']}\n{output}"
    assert "[launch] server 1: its Ray actor died" in output, output
    assert "[launch] server 1 restarted" in output, output
    after = _placements(output)
    assert not lost.startswith(after["server 1"])  # on another node now
    result = outcome["results"][0]
    assert result["restarts"] == 1 and result["restore_state"].startswith("restored"), (
        json.dumps(result) + output)
    noloss.check(result, 2, "Ray, server node removed after a checkpoint at step 12, restored")
    _assert_nothing_left("job-node-loss")
    print("NODE-LOSS " + json.dumps({"restore_state": result["restore_state"]}))
