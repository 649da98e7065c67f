"""A job whose nodes are on different hosts: the scheduler, 2 servers and 2 workers each in a
Linux network namespace of its own (a private address on a bridge, loopback down), with a job
token. Shows that no code path assumes loopback and that ``--host`` / ``--advertise`` work as
docs/operations.md says: server 0 binds 0.0.0.0 and advertises its address, server 1 binds its
own address on a port the kernel picks. The pushes are the no-loss check (exact sums).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.integration import netns, noloss

ROOT = Path(__file__).resolve().parents[2]
PS = [sys.executable, "-m", "paramserver"]
TOKEN = "multihost-test-token-7f3a"
HOSTS = ["sched", "s0", "s1", "w0", "w1"]


@pytest.fixture
def hosts() -> Iterator[netns.Hosts]:
    with netns.hosts_or_skip(HOSTS) as made:
        yield made


def _node(hosts: netns.Hosts, host: str, args: list[str], tmp: Path, env: dict) -> dict:
    ready, log = tmp / f"{host}.json", tmp / f"{host}.log"
    with open(log, "w") as out:
        proc = hosts.popen(host, PS + args + ["--ready-file", str(ready)], stdout=out,
                           stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def up() -> dict | None:
        if proc.poll() is not None:
            raise RuntimeError(f"{host}: {args[0]} exited with {proc.returncode}:\n"
                               f"{log.read_text()}")
        return json.loads(ready.read_text()) if ready.exists() else None
    return wait_for(up, 60, f"{args[0]} in namespace {host} to be ready")


def _environments(hosts: netns.Hosts, tmp: Path, tls: bool) -> dict[str, dict[str, str]]:
    """Each host's environment: the token, and with ``tls`` its own certificate (naming only
    its address), key and the CA, as docs/operations.md sets up two machines."""
    base = dict(os.environ, PARAMSERVER_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    if not tls:
        return {host: base for host in HOSTS}
    from tests.integration import tls_certs

    ca, ca_cert, ca_key = tls_certs.make_ca(tmp)
    envs = {}
    for host in HOSTS:
        pair = tls_certs.issue(tmp, host, ca_cert, ca_key, ips=(hosts.addresses[host],))
        envs[host] = dict(base, PARAMSERVER_TLS_CERT=str(pair.cert),
                          PARAMSERVER_TLS_KEY=str(pair.key), PARAMSERVER_TLS_CA=str(ca.cert))
    return envs


@pytest.mark.parametrize("security", ["token", "mutual TLS and token"])
def test_a_job_across_network_namespaces_loses_nothing(hosts, tmp_path, security):
    tls = security != "token"
    envs = _environments(hosts, tmp_path, tls)
    mutual = ["--tls-client-auth"] if tls else []
    env = envs["w0"]
    ip = hosts.addresses
    sched = _node(hosts, "sched", ["scheduler", "--host", ip["sched"], "--port", "9090",
                                   "--num-servers", "2", "--num-workers", "2",
                                   "--heartbeat-interval", "0.2", *mutual], tmp_path,
                  envs["sched"])
    assert sched["address"] == f"{ip['sched']}:9090"
    s0 = _node(hosts, "s0", ["server", "--scheduler", sched["address"], "--rank", "0",
                             "--host", "0.0.0.0", "--port", "7000",
                             "--advertise", f"{ip['s0']}:7000", *mutual], tmp_path, envs["s0"])
    s1 = _node(hosts, "s1", ["server", "--scheduler", sched["address"], "--rank", "1",
                             "--host", ip["s1"], "--port", "0", *mutual], tmp_path, envs["s1"])
    assert s0["address"] == f"{ip['s0']}:7000"
    assert s1["address"].startswith(f"{ip['s1']}:") and not s1["address"].endswith(":0")

    # A caller without the job's token is refused, across hosts too.
    refused = hosts.run("w1", PS + ["status", "--scheduler", sched["address"]], timeout=60,
                        env={k: v for k, v in envs["w1"].items() if k != "PARAMSERVER_TOKEN"},
                        cwd=ROOT)
    assert refused.returncode == 1 and "authentication failed" in refused.stderr, refused
    if tls:  # and so is one with the token but without a certificate (mutual TLS)
        anonymous = {k: v for k, v in envs["w1"].items()
                     if k not in ("PARAMSERVER_TLS_CERT", "PARAMSERVER_TLS_KEY")}
        refused = hosts.run("w1", PS + ["status", "--scheduler", sched["address"],
                                        "--timeout", "3"], timeout=60, env=anonymous, cwd=ROOT)
        assert refused.returncode == 1 and "is unreachable" in refused.stderr, refused

    workers = [hosts.popen(host, [sys.executable, "-c", noloss.WORKER], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=dict(envs[host], PARAMSERVER_SCHEDULER=sched["address"],
                                    PARAMSERVER_RANK=str(rank), PARAMSERVER_NUM_WORKERS="2"))
               for rank, host in enumerate(["w0", "w1"])]
    outputs = []
    for proc in workers:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"worker exited {proc.returncode}:\n{out}\n{err}"
        outputs.append(out)
    lines = [line for line in outputs[0].splitlines() if line.startswith("NOLOSS ")]
    assert len(lines) == 1, outputs
    result = json.loads(lines[0].split(" ", 1)[1])
    # The workers reached the servers at their private addresses, as advertised.
    assert result["servers"] == sorted([s0["address"], s1["address"]])
    noloss.check(result, 2, f"network namespaces (scheduler, 2 servers, 2 workers on 5 hosts), "
                            f"{security}")

    status = hosts.run("w0", PS + ["status", "--scheduler", sched["address"], "--json"],
                       timeout=60, env=env, cwd=ROOT)
    assert status.returncode == 0, status.stderr
    nodes = json.loads(status.stdout)["nodes"]
    servers = {n["node_id"]: n["address"] for n in nodes if n["role"] == "server"}
    assert servers == {"server-0": s0["address"], "server-1": s1["address"]}
    table = next(t for t in json.loads(status.stdout)["tables"] if t["name"] == "a")
    assert all(n > 0 for n in table["blocks_per_server"])  # both hosts hold part of "a"
