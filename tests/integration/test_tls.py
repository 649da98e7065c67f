"""TLS between every node: server authentication and mutual TLS, with a CA made in the test."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from tests.integration.conftest import PS, Cluster, kill, run_example, start_node
from tests.integration.tls_certs import Pair, issue, make_ca

TOKEN = "tls-job-token"


@dataclass(frozen=True)
class PKI:
    """A CA, a node certificate and a client certificate it signed, and a stranger's."""

    ca: Path
    node: Pair
    client: Pair
    other_ca: Path
    stranger: Pair  # signed by other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = make_ca(d)
    other, other_cert, other_key = make_ca(d, "another CA")
    return PKI(ca.cert, issue(d, "node", ca_cert, ca_key), issue(d, "client", ca_cert, ca_key),
               other.cert, issue(d, "stranger", other_cert, other_key))


def _tls_cluster(tmp_path: Path, pki: PKI, mutual: bool) -> Cluster:
    # The scheduler takes its files as flags, the server from the environment.
    flags = ["--tls-cert", str(pki.node.cert), "--tls-key", str(pki.node.key), "--tls-ca",
             str(pki.ca)] + (["--tls-client-auth"] if mutual else [])
    sched, info = start_node(["scheduler", "--port", "0", "--num-servers", "1"] + flags,
                             tmp_path / "s.json", tmp_path / "s.log",
                             env={"PARAMSERVER_TOKEN": TOKEN})
    assert "TLS" in (tmp_path / "s.log").read_text()
    cluster = Cluster(info["address"], sched)
    try:
        env = {"PARAMSERVER_TOKEN": TOKEN, "PARAMSERVER_TLS_CERT": str(pki.node.cert),
               "PARAMSERVER_TLS_KEY": str(pki.node.key), "PARAMSERVER_TLS_CA": str(pki.ca)}
        server, sinfo = start_node(["server", "--scheduler", cluster.scheduler]
                                   + (["--tls-client-auth"] if mutual else []),
                                   tmp_path / "v.json", tmp_path / "v.log", env=env)
        cluster.servers.append(server)
        cluster.server_addresses.append(sinfo["address"])
    except BaseException:
        kill(sched)
        raise
    return cluster


@pytest.fixture
def tls_job(tmp_path: Path, pki: PKI, request) -> Iterator[Cluster]:
    cluster = _tls_cluster(tmp_path, pki, mutual=request.param)
    try:
        yield cluster
    finally:
        for proc in cluster.servers + [cluster.scheduler_proc]:
            kill(proc)


def _exact_round_trip(client: ps.Client) -> None:
    t = client.dense("w", shape=(3,), optimizer=ps.SGD(lr=1.0), init=np.arange(3.0))
    t.push(np.ones(3, np.float32))
    np.testing.assert_array_equal(t.pull(), [-1.0, 0.0, 1.0])


@pytest.mark.parametrize("tls_job", [False], indirect=True)
def test_server_authentication(tls_job, pki, monkeypatch):
    for variable in ("PARAMSERVER_TLS_CA", "PARAMSERVER_TLS_CERT", "PARAMSERVER_TLS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    with tls_job.connect(token=TOKEN, tls_ca=pki.ca) as client:
        _exact_round_trip(client)
    # A plaintext client, and one that trusts another CA, cannot even register.
    for tls_ca in (None, pki.other_ca):
        with pytest.raises(ps.NodeUnavailableError, match=tls_job.scheduler):
            tls_job.connect(token=TOKEN, tls_ca=tls_ca, timeout=3.0)
    status = subprocess.run(PS + ["status", "--scheduler", tls_job.scheduler, "--json",
                                  "--tls-ca", str(pki.ca)],
                            env=dict(os.environ, PARAMSERVER_TOKEN=TOKEN), capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"role": "server"' in status.stdout


@pytest.mark.parametrize("tls_job", [False], indirect=True)
def test_the_cli_without_tls_against_a_tls_job_says_to_give_the_ca(tls_job, pki):
    """Not "Socket closed": the hint the Python client gives (rpc.tls_hint), on one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVER_TLS_")}
    for command in (["status"], ["checkpoint", "--timeout", "5"]):
        result = subprocess.run(PS + command + ["--scheduler", tls_job.scheduler],
                                env=dict(env, PARAMSERVER_TOKEN=TOKEN), capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1, result
        assert tls_job.scheduler in result.stderr, result.stderr
        assert ("this node calls in plaintext: if the scheduler serves TLS, give --tls-ca "
                "(PARAMSERVER_TLS_CA)") in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # Trusting another CA: the other hint.
    result = subprocess.run(PS + ["status", "--scheduler", tls_job.scheduler, "--tls-ca",
                                  str(pki.other_ca)], env=dict(env, PARAMSERVER_TOKEN=TOKEN),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "this node calls over TLS" in result.stderr, result.stderr


@pytest.mark.parametrize("tls_job", [True], indirect=True)
def test_mutual_tls_needs_a_client_certificate_from_the_ca(tls_job, pki, monkeypatch):
    for variable in ("PARAMSERVER_TLS_CA", "PARAMSERVER_TLS_CERT", "PARAMSERVER_TLS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    with tls_job.connect(token=TOKEN, tls_ca=pki.ca, tls_cert=pki.client.cert,
                         tls_key=pki.client.key) as client:
        _exact_round_trip(client)
    for pair in (None, pki.stranger):
        with pytest.raises(ps.NodeUnavailableError, match=tls_job.scheduler):
            tls_job.connect(token=TOKEN, tls_ca=pki.ca, timeout=3.0,
                            tls_cert=pair and pair.cert, tls_key=pair and pair.key)


@pytest.mark.parametrize("tls_job", [True], indirect=True)
def test_tls_does_not_replace_the_token(tls_job, pki, monkeypatch):
    monkeypatch.delenv("PARAMSERVER_TOKEN", raising=False)
    with pytest.raises(ps.AuthenticationError, match="authentication failed"):
        tls_job.connect(tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key,
                        timeout=5.0)


def test_launch_runs_a_whole_job_over_mutual_tls(pki):
    worker = ("import numpy as np, paramserver as ps\n"
              "with ps.connect() as c:\n"
              "    t = c.dense('w', (4,), ps.SGD(lr=1.0))\n"
              "    c.barrier()\n"
              "    t.push(np.ones(4, np.float32))\n"
              "    c.barrier()\n"
              "    print('VALUES', t.pull().tolist(), flush=True)\n")
    proc = run_example(PS + ["launch", "--num-servers", "2", "--num-workers", "2",
                             "--tls-cert", str(pki.node.cert), "--tls-key", str(pki.node.key),
                             "--tls-ca", str(pki.ca), "--tls-client-auth", "--",
                             sys.executable, "-c", worker], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    values = [line.split("VALUES ")[1] for line in proc.stdout.splitlines() if "VALUES " in line]
    assert values == ["[-2.0, -2.0, -2.0, -2.0]"] * 2


def test_a_certificate_with_the_wrong_key_is_a_one_line_error(pki):
    result = subprocess.run(PS + ["scheduler", "--port", "0", "--num-servers", "1",
                                  "--tls-cert", str(pki.node.cert), "--tls-key",
                                  str(pki.client.key)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "do not load as a pair" in result.stderr and str(pki.node.cert) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    missing = subprocess.run(PS + ["status", "--scheduler", "127.0.0.1:1", "--tls-ca",
                                   str(pki.ca) + ".missing"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and "cannot read TLS CA file" in missing.stderr
