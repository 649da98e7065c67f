"""The job token: every RPC of the scheduler and the servers needs it; health stays open."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import paramserver as ps
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import DenseItem, iter_requests
from tests.integration.conftest import PS, Cluster, kill, run_example, start_node

TOKEN = "job-token-0123456789abcdef"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Cluster]:
    """A scheduler and one server started with the token: the scheduler from
    ``$PARAMSERVER_TOKEN``, the server from ``--token-file``."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    sched, info = start_node(["scheduler", "--port", "0", "--num-servers", "1"],
                             tmp_path / "s.json", tmp_path / "s.log",
                             env={"PARAMSERVER_TOKEN": TOKEN})
    cluster = Cluster(info["address"], sched)
    try:
        server, sinfo = start_node(["server", "--scheduler", cluster.scheduler, "--token-file",
                                    str(token_file)], tmp_path / "v.json", tmp_path / "v.log",
                                   env={"PARAMSERVER_TOKEN": ""})
        cluster.servers.append(server)
        cluster.server_addresses.append(sinfo["address"])
        yield cluster
    finally:
        for proc in cluster.servers + [sched]:
            kill(proc)


def test_the_right_token_works_and_values_are_exact(secured):
    with secured.connect(token=TOKEN) as client:
        t = client.dense("w", shape=(3,), optimizer=ps.SGD(lr=1.0), init=np.arange(3.0))
        t.push(np.ones(3, np.float32))
        np.testing.assert_array_equal(t.pull(), [-1.0, 0.0, 1.0])
    # A request cut into many messages (parallel calls) carries the token on each.
    with secured.connect(token=TOKEN, message_bytes=4096) as client:
        big = client.dense("big", shape=(20_000,), optimizer=ps.SGD(lr=1.0), block_size=256)
        big.push(np.full(20_000, 2.0, np.float32))
        np.testing.assert_array_equal(big.pull(), np.full(20_000, -2.0, np.float32))


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_a_missing_or_wrong_token_is_refused_as_authentication_failed(secured, token,
                                                                      monkeypatch):
    monkeypatch.delenv("PARAMSERVER_TOKEN", raising=False)
    with pytest.raises(ps.AuthenticationError, match="authentication failed") as info:
        secured.connect(token=token, timeout=5.0)
    assert secured.scheduler in str(info.value)
    assert ("wrong job token" if token else "no job token") in str(info.value)
    assert TOKEN not in str(info.value)


def test_a_server_refuses_data_calls_without_the_token(secured):
    with secured.connect(token=TOKEN) as client:
        t = client.dense("w", shape=(4,), optimizer=ps.SGD(lr=1.0), init=np.zeros(4))
        block = np.full(4, 5.0, np.float32)
        _, messages = iter_requests(pb.ASSIGN, [DenseItem("w", [0], [4], [block])], 1 << 20, "")
        message = next(messages)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with grpc.insecure_channel(secured.server_addresses[0]) as channel:
                exchange = channel.unary_unary("/paramserver.v1.ParameterServer/Exchange")
                with pytest.raises(grpc.RpcError) as info:
                    exchange(message, timeout=10, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.ParameterServerStub(channel).Stats(pb.StatsRequest(), timeout=10,
                                                              metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        np.testing.assert_array_equal(t.pull(), np.zeros(4))  # the refused assign changed nothing


def test_the_health_service_stays_open(secured):
    for address in [secured.scheduler] + secured.server_addresses:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_status_and_a_server_need_the_token(secured, tmp_path):
    env = dict(os.environ, PARAMSERVER_TOKEN="")
    refused = subprocess.run(PS + ["status", "--scheduler", secured.scheduler], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "authentication failed" in refused.stderr and TOKEN not in refused.stderr
    env["PARAMSERVER_TOKEN"] = TOKEN
    ok = subprocess.run(PS + ["status", "--scheduler", secured.scheduler, "--json"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert '"role": "server"' in ok.stdout
    # A server with a wrong token cannot join: it exits at once (no retry for 30 s).
    (tmp_path / "wrong").write_text("not-the-token")
    server = subprocess.run(PS + ["server", "--scheduler", secured.scheduler, "--token-file",
                                  str(tmp_path / "wrong")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert server.returncode == 1
    assert "authentication failed" in server.stderr and "wrong job token" in server.stderr


def test_a_missing_or_empty_token_file_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").write_text("\n")
    for path, why in ((tmp_path / "empty", "is empty"), (tmp_path / "none", "cannot read")):
        result = subprocess.run(PS + ["status", "--scheduler", "127.0.0.1:1", "--token-file",
                                      str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert why in result.stderr and str(path) in result.stderr
        assert "Traceback" not in result.stderr


def test_launch_protects_each_job_with_its_own_random_token():
    # Each worker: the token it was given must work, and a wrong one must be refused.
    worker = ("import os, paramserver as ps\n"
              "token = os.environ['PARAMSERVER_TOKEN']\n"
              "try:\n"
              "    ps.connect(token='wrong', timeout=5.0)\n"
              "except ps.AuthenticationError:\n"
              "    refused = True\n"
              "with ps.connect() as c:\n"
              "    c.dense('w', (2,), ps.SGD()).pull()\n"
              "print('TOKEN', len(token), refused, hash(token) & 0xffffffff, flush=True)\n")
    env = dict(os.environ)
    env.pop("PARAMSERVER_TOKEN", None)
    seen = []
    for _ in range(2):
        proc = run_example(PS + ["launch", "--num-servers", "1", "--num-workers", "1", "--",
                                 sys.executable, "-c", worker], timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = next(x for x in proc.stdout.splitlines() if "TOKEN " in x).split("TOKEN ")[1]
        length, refused, digest = line.split()
        assert int(length) >= 32 and refused == "True"
        seen.append(digest)
    assert seen[0] != seen[1]


def test_binding_beyond_loopback_without_a_token_warns(caplog):
    caplog.set_level(logging.WARNING, logger="paramserver.rpc")
    with ps.Scheduler(ps.SchedulerConfig(host="0.0.0.0", port=0)):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "paramserver.rpc"]
    assert len(warnings) == 1 and "without a job token" in warnings[0]
    assert "0.0.0.0:0" in warnings[0]
    caplog.clear()
    with ps.Scheduler(ps.SchedulerConfig(host="0.0.0.0", port=0,
                                         security=ps.Security(token=TOKEN))):
        pass
    with ps.Scheduler(ps.SchedulerConfig(host="127.0.0.1", port=0)):
        pass
    assert not [r for r in caplog.records if r.name == "paramserver.rpc"]
