"""The Kubernetes manifests of deploy/kubernetes, run: each pod (the scheduler, 2 servers, 2
workers) is a process in a network namespace of its own, started as the kubelet starts its
container: the manifest's command line with ``$(VAR)`` expanded from the container's environment
(the pod IP, the StatefulSet ordinal and the Job completion index filled in, the job secret and
the worker token from their "Secrets"), the scheduler's Service name resolving to the scheduler pod, and the claim's mount path
mapped to one directory shared by the pods. No cluster is needed; what Kubernetes itself does
(scheduling, probes, restarts) is not exercised.

The workers' command (the MLP example) must reach its target accuracy; the probes' ports answer
the gRPC health check without a token; a scheduler pod restarted with the same command continues
the job (``--recover-if-present``) and both servers register again at their pod IPs; and a server
pod replaced after a checkpoint takes its rank over and restores from the claim.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from paramserver.roles import derive_token
from tests import kubernetes as kube
from tests.conftest import wait_for
from tests.integration import netns

pytest.importorskip("yaml", reason="PyYAML is part of the test extra")

SECRET = "kubernetes-test-secret-1c9e"
#: The worker role's token (what the paramserver-worker-token Secret holds); the operator's
#: status and checkpoint calls below use it too (a worker may ask for both).
TOKEN = derive_token(SECRET, "worker")
#: The value of each Secret the manifests name.
SECRETS = {("paramserver-job-secret", "secret"): SECRET,
           ("paramserver-worker-token", "token"): TOKEN}
#: A gRPC readiness probe, as the kubelet makes it: Health/Check of service "" at argv[1].
PROBE = r"""
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
"""
PODS = ["scheduler", "server-0", "server-1", "worker-0", "worker-1"]


@pytest.fixture
def hosts() -> Iterator[netns.Hosts]:
    with netns.hosts_or_skip(PODS) as made:
        yield made


class _Pods:
    """Starts the manifests' containers as the kubelet would, one namespace per pod."""

    def __init__(self, hosts: netns.Hosts, tmp: Path) -> None:
        self.hosts = hosts
        self.tmp = tmp
        self.volume = tmp / "claim"  # the PersistentVolumeClaim, shared by every pod
        self.volume.mkdir()
        docs = kube.load()
        self.scheduler = kube.container(kube.find(docs, "Deployment", "paramserver-scheduler"))
        self.server = kube.container(kube.find(docs, "StatefulSet", "paramserver-server"))
        self.worker = kube.container(kube.find(docs, "Job", "paramserver-workers"))
        service = kube.find(docs, "Service", "paramserver-scheduler")
        hosts.name_hosts({service["metadata"]["name"]: hosts.addresses["scheduler"]})

    def start(self, pod: str, container: dict, index: int = 0) -> subprocess.Popen:
        fields = {"status.podIP": self.hosts.addresses[pod],
                  "metadata.labels['apps.kubernetes.io/pod-index']": str(index),
                  "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index)}
        values = {}
        for name, entry in kube.env(container).items():
            if "value" in entry:
                values[name] = entry["value"]
            elif "fieldRef" in entry["valueFrom"]:
                values[name] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                values[name] = SECRETS[(ref["name"], ref["key"])]
        argv = kube.argv(container, values)
        for mount in container.get("volumeMounts", []):
            argv = [a.replace(mount["mountPath"], str(self.volume)) for a in argv]
        # The image's PATH (paramserver, python) is this interpreter's environment.
        env = dict(os.environ, **values, PYTHONUNBUFFERED="1",
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        log = open(self.tmp / f"{pod}.log", "a")
        try:
            # The image's WORKDIR holds examples/, as this checkout does.
            return self.hosts.popen(pod, argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=kube.ROOT)
        finally:
            log.close()

    def log(self, pod: str) -> str:
        return (self.tmp / f"{pod}.log").read_text()


def test_the_manifests_run_a_job_across_pods(hosts, tmp_path):
    pods = _Pods(hosts, tmp_path)
    # Kubernetes starts the pods in no particular order: the workers and servers first here.
    workers = [pods.start(f"worker-{i}", pods.worker, i) for i in range(2)]
    servers = [pods.start(f"server-{i}", pods.server, i) for i in range(2)]
    scheduler = pods.start("scheduler", pods.scheduler)
    for i, proc in enumerate(workers):
        try:
            code = proc.wait(240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker-{i} did not finish:\n{pods.log(f'worker-{i}')}")
        assert code == 0, f"worker-{i} exited {code}:\n{pods.log(f'worker-{i}')}"
    results = [json.loads(line.split("RESULT ", 1)[1])
               for line in pods.log("worker-0").splitlines() if "RESULT {" in line]
    assert len(results) == 1 and results[0]["test_accuracy"] >= 0.9, pods.log("worker-0")
    print("KUBERNETES " + json.dumps({k: results[0][k] for k in ("dataset", "test_accuracy",
                                                                 "num_workers", "num_servers")}))
    checkpoints = tmp_path / "claim" / "job"
    assert (checkpoints / "scheduler-state.json").is_file()

    # The readiness probes: the kubelet asks the gRPC health service on each probe's port,
    # without the token.
    probes = {"scheduler": pods.scheduler, "server-0": pods.server, "server-1": pods.server}
    for pod, container in probes.items():
        target = f"{hosts.addresses[pod]}:{container['readinessProbe']['grpc']['port']}"
        done = hosts.run("worker-0", [sys.executable, "-c", PROBE, target], timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PARAMSERVER_TOKEN"})
        assert done.stdout.strip() == "SERVING", (pod, done.stdout, done.stderr)

    # The scheduler pod is replaced: the same command continues the job from the claim.
    os.killpg(scheduler.pid, signal.SIGKILL)
    scheduler.wait(10)
    pods.start("scheduler", pods.scheduler)
    wait_for(lambda: "recovering it (--recover-if-present)" in pods.log("scheduler"), 60,
             "the restarted scheduler to recover the job")

    def servers_back() -> dict | None:
        done = hosts.run("worker-0", [sys.executable, "-m", "paramserver", "status",
                                      "--scheduler", "paramserver-scheduler:9090", "--json"],
                         timeout=60, env=dict(os.environ, PARAMSERVER_TOKEN=TOKEN))
        if done.returncode:
            return None
        nodes = json.loads(done.stdout)["nodes"]
        alive = {n["node_id"]: n["address"] for n in nodes
                 if n["role"] == "server" and n["alive"] and not n["left"]}
        return alive if len(alive) == 2 else None

    alive = wait_for(servers_back, 60, "both servers to register with the new scheduler")
    assert alive == {f"server-{i}": f"{hosts.addresses[f'server-{i}']}:7000" for i in range(2)}

    # A checkpoint onto the claim, then server-1's pod is replaced (same ordinal, same command):
    # it takes its rank over at once and restores its tables from the claim.
    ps = [sys.executable, "-m", "paramserver"]
    env = dict(os.environ, PARAMSERVER_TOKEN=TOKEN)
    done = hosts.run("worker-0", ps + ["checkpoint", "--scheduler", "paramserver-scheduler:9090",
                                       "--json"], timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    version = json.loads(done.stdout)["version"]
    os.killpg(servers[1].pid, signal.SIGKILL)
    servers[1].wait(10)
    pods.start("server-1", pods.server, 1)

    def restored() -> dict | None:
        status = hosts.run("worker-0", ps + ["status", "--scheduler",
                                             "paramserver-scheduler:9090", "--json"],
                           timeout=60, env=env)
        if status.returncode:
            return None
        node = next(n for n in json.loads(status.stdout)["nodes"] if n["node_id"] == "server-1")
        return node if node["restore_state"].startswith("restored") else None

    node = wait_for(restored, 60, "the replaced server-1 to restore from the claim")
    assert node["restore_state"] == f"restored from checkpoint {version}", node
    assert node["restarts"] >= 1 and node["alive"]
