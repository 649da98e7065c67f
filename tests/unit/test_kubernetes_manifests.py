"""The Kubernetes manifests (deploy/kubernetes) agree with the code and with each other: every
flag parses with the real command line, every PARAMSERVER_ variable is one paramserver reads,
ports and names line up between Services, pods and the addresses nodes dial, each rank comes
from the pod's ordinal or completion index, the credentials from a Secret per role, and the checkpoint
directory is on the shared claim. (tests/integration/test_kubernetes.py runs them.)"""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest

from tests import kubernetes as kube

pytest.importorskip("yaml", reason="PyYAML is part of the test extra")

from paramserver import cli  # noqa: E402
from paramserver.config import SECRET_VALUE_ENV, TLS_ENV, TOKEN_ENV  # noqa: E402

DOCS = kube.load()
SCHEDULER = kube.find(DOCS, "Deployment", "paramserver-scheduler")
SERVERS = kube.find(DOCS, "StatefulSet", "paramserver-server")
WORKERS = kube.find(DOCS, "Job", "paramserver-workers")
SCHEDULER_SERVICE = kube.find(DOCS, "Service", "paramserver-scheduler")
SERVER_SERVICE = kube.find(DOCS, "Service", "paramserver-server")
CLAIM = kube.find(DOCS, "PersistentVolumeClaim")
#: Sample values of what Kubernetes fills in (pod IP, ordinal, completion index).
FIELD_SAMPLES = {"status.podIP": "10.1.2.3",
                 "metadata.labels['apps.kubernetes.io/pod-index']": "1",
                 "metadata.annotations['batch.kubernetes.io/job-completion-index']": "1"}


def _values(c: dict) -> dict[str, str]:
    """What each of a container's variables holds in a pod (samples for fields and secrets)."""
    out = {}
    for name, entry in kube.env(c).items():
        if "value" in entry:
            out[name] = entry["value"]
        elif "fieldRef" in entry["valueFrom"]:
            out[name] = FIELD_SAMPLES[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            out[name] = "secret"
    return out


def _args(workload: dict) -> list[str]:
    c = kube.container(workload)
    return kube.argv(c, _values(c))


def _parse(workload: dict):
    args = _args(workload)
    assert args[0] == "paramserver", args
    try:
        return cli._parser().parse_args(args[1:])
    except SystemExit:
        pytest.fail(f"{workload['metadata']['name']}: `{shlex.join(args)}` does not parse "
                    f"with the paramserver command line (see the error above)")


def _variables_read_by_paramserver() -> set[str]:
    """The PARAMSERVER_ variables the package reads: os.environ lookups and the token and TLS
    variables of paramserver.config."""
    read = {TOKEN_ENV, SECRET_VALUE_ENV, *TLS_ENV.values()}
    pattern = re.compile(r"(?:environ\.get\(|environ\[|_env_int\()\s*\"(PARAMSERVER_[A-Z_]+)\"")
    for path in (kube.ROOT / "python" / "paramserver").glob("*.py"):
        read |= set(pattern.findall(path.read_text()))
    return read


def test_the_kustomization_lists_every_manifest_and_they_hold_one_job():
    listed = sorted(p.name for p in kube.DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    import yaml
    kustomization = yaml.safe_load((kube.DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == listed
    assert sorted((d["kind"], d["metadata"]["name"]) for d in DOCS) == [
        ("Deployment", "paramserver-scheduler"), ("Job", "paramserver-workers"),
        ("PersistentVolumeClaim", "paramserver-checkpoints"),
        ("Service", "paramserver-scheduler"), ("Service", "paramserver-server"),
        ("StatefulSet", "paramserver-server")]


def test_every_flag_parses_with_the_paramserver_command_line():
    scheduler, server = _parse(SCHEDULER), _parse(SERVERS)
    assert scheduler.cmd == "scheduler" and server.cmd == "server"
    # The scheduler's flags also make a valid configuration (as `paramserver scheduler` does).
    config = cli._cmd_scheduler_config(scheduler)
    assert config["checkpoint_dir"] and config["recover"] is False  # no state: a fresh job
    assert server.replace and server.max_memory > 0
    # The workers run an example of this repository with arguments it accepts.
    command = _args(WORKERS)
    assert command[0] == "python" and (kube.ROOT / command[1]).is_file()
    spec = importlib.util.spec_from_file_location("manifest_worker", kube.ROOT / command[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parse_args(command[2:])


def test_every_variable_is_defined_and_read_by_paramserver():
    read = _variables_read_by_paramserver()
    assert {"PARAMSERVER_SCHEDULER", "PARAMSERVER_RANK", "PARAMSERVER_NUM_WORKERS",
            "PARAMSERVER_REPLACE", "PARAMSERVER_TOKEN"} <= read  # the scan itself works
    for workload in (SCHEDULER, SERVERS, WORKERS):
        c = kube.container(workload)
        names = set(kube.env(c))
        unknown = {n for n in names if n.startswith("PARAMSERVER_")} - read
        assert not unknown, f"{workload['metadata']['name']}: paramserver never reads {unknown}"
        undefined = kube.references(c) - names
        assert not undefined, f"{workload['metadata']['name']}: $({undefined}) is not defined"
    workers = kube.env(kube.container(WORKERS))
    assert {"PARAMSERVER_SCHEDULER", "PARAMSERVER_RANK", "PARAMSERVER_NUM_WORKERS"} <= set(workers)


def test_ports_and_addresses_agree():
    sched = kube.container(SCHEDULER)
    sched_args = _args(SCHEDULER)
    port = int(kube.flag(sched_args, "--port"))
    assert kube.flag(sched_args, "--host") == "0.0.0.0"  # reachable from other pods
    assert [p["containerPort"] for p in sched["ports"]] == [port]
    assert sched["readinessProbe"]["grpc"]["port"] == port
    (service_port,) = SCHEDULER_SERVICE["spec"]["ports"]
    assert kube.named_port(sched, service_port["targetPort"]) == port
    address = f"{SCHEDULER_SERVICE['metadata']['name']}:{service_port['port']}"
    # Servers and workers dial the scheduler's Service.
    assert kube.flag(_args(SERVERS), "--scheduler") == address
    assert kube.env(kube.container(WORKERS))["PARAMSERVER_SCHEDULER"]["value"] == address

    server = kube.container(SERVERS)
    server_args = _args(SERVERS)
    server_port = int(kube.flag(server_args, "--port"))
    assert kube.flag(server_args, "--host") == "0.0.0.0"
    assert [p["containerPort"] for p in server["ports"]] == [server_port]
    assert server["readinessProbe"]["grpc"]["port"] == server_port
    (headless,) = SERVER_SERVICE["spec"]["ports"]
    assert kube.named_port(server, headless["targetPort"]) == server_port
    # Each server advertises its own pod IP and the port it binds.
    raw = kube.flag(kube.container(SERVERS)["args"], "--advertise")
    assert raw == f"$(POD_IP):{server_port}"
    assert kube.env(server)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_each_rank_comes_from_the_pods_ordinal_or_completion_index():
    scheduler = _parse(SCHEDULER)
    server = kube.container(SERVERS)
    rank_variable = re.fullmatch(r"\$\((\w+)\)", kube.flag(server["args"], "--rank")).group(1)
    assert (kube.env(server)[rank_variable]["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.labels['apps.kubernetes.io/pod-index']")
    assert SERVERS["spec"]["replicas"] == scheduler.num_servers
    assert SERVERS["spec"]["serviceName"] == SERVER_SERVICE["metadata"]["name"]

    spec = WORKERS["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == scheduler.num_workers
    worker = kube.env(kube.container(WORKERS))
    assert int(worker["PARAMSERVER_NUM_WORKERS"]["value"]) == scheduler.num_workers
    assert (worker["PARAMSERVER_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.annotations['batch.kubernetes.io/job-completion-index']")


def test_the_control_plane_gets_the_job_secret_and_workers_only_their_role_token():
    """Separate Secrets per role: the scheduler and servers read the job secret, the workers
    the worker token derived from it, and neither sees the other's."""
    for workload in (SCHEDULER, SERVERS):
        c = kube.container(workload)
        env = kube.env(c)
        assert "PARAMSERVER_TOKEN" not in env
        assert env[SECRET_VALUE_ENV]["valueFrom"] == {"secretKeyRef": {
            "name": "paramserver-job-secret", "key": "secret"}}
    c = kube.container(WORKERS)
    env = kube.env(c)
    assert SECRET_VALUE_ENV not in env and "PARAMSERVER_JOB_SECRET_FILE" not in env
    assert env["PARAMSERVER_TOKEN"]["valueFrom"] == {"secretKeyRef": {
        "name": "paramserver-worker-token", "key": "token"}}
    for workload in (SCHEDULER, SERVERS, WORKERS):
        assert not any("--token-file" in a or "secret" in a
                       for a in kube.container(workload).get("args", []))


def test_the_checkpoint_directory_is_on_the_shared_claim():
    assert "ReadWriteMany" in CLAIM["spec"]["accessModes"]
    directory = kube.flag(_args(SCHEDULER), "--checkpoint-dir")
    mounts = []
    for workload in (SCHEDULER, SERVERS):
        volumes = {v["name"]: v for v in kube.pod_spec(workload)["volumes"]}
        (mount,) = [m for m in kube.container(workload)["volumeMounts"]
                    if directory.startswith(m["mountPath"].rstrip("/") + "/")]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == CLAIM["metadata"]["name"]
        mounts.append(mount["mountPath"])
    assert mounts[0] == mounts[1]  # every server writes into the same directory


def test_selectors_match_their_pods():
    for workload in (SCHEDULER, SERVERS):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service, workload in ((SCHEDULER_SERVICE, SCHEDULER), (SERVER_SERVICE, SERVERS)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["selector"] != {}
