"""Per-role credentials (``--job-secret-file``): every RPC admits only the roles of
``paramserver.roles.METHOD_ROLES``; a caller outside them gets PERMISSION_DENIED and changes
nothing. The attacks are the ones a worker's token allowed while one token opened everything:
closing the servers' write gates with a huge PrepareCut lease, dropping a table the scheduler still
lists, a participant committing its own unclipped federated update, registering as a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

import paramserver as ps
from paramserver import roles
from paramserver.federated import Participant
from paramserver.v1 import paramserver_pb2 as pb
from tests.conftest import wait_for
from tests.integration.conftest import PS, run_example

SECRET = "the-job-secret-0123456789"
SERVER = "/paramserver.v1.ParameterServer/"
SCHEDULER = "/paramserver.v1.Scheduler/"


def _token(role: str) -> str:
    return roles.derive_token(SECRET, role)


@pytest.fixture
def secret_args(tmp_path: Path) -> tuple[str, ...]:
    path = tmp_path / "job-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return ("--job-secret-file", str(path))


@pytest.fixture
def roles_cluster(cluster_factory, secret_args):
    """A scheduler and 2 servers protected per role."""
    return cluster_factory(2, scheduler_args=secret_args, server_args=secret_args)


def _raw(address: str, method: str, request: bytes | object, role: str,
         timeout: float = 10.0) -> object:
    """Call ``method`` at ``address`` with ``role``'s token; the reply's bytes."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 100 << 20)]) as channel:
        call = channel.unary_unary(method)
        return call(data, timeout=timeout,
                    metadata=(("authorization", f"Bearer {_token(role)}"),))


def _denied(address: str, method: str, request: bytes | object, role: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        _raw(address, method, request, role)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    return info.value.details()


def test_a_worker_cannot_close_the_write_gates_with_a_huge_prepare_cut(roles_cluster):
    with roles_cluster.connect(token=_token("worker"), timeout=5.0) as client:
        t = client.dense("w", (4,), ps.SGD(lr=1.0), init=np.zeros(4), block_size=2)
        for address in roles_cluster.server_addresses:
            why = _denied(address, SERVER + "PrepareCut",
                          pb.PrepareCutRequest(cut=99, lease=1e9), "worker")
            assert why == ("PrepareCut is not allowed to the worker role (allowed: control)")
        t.push(np.ones(4, np.float32))  # the gates are open: no PSTimeoutError
        np.testing.assert_array_equal(t.pull(), -np.ones(4))


def test_a_worker_cannot_drop_a_table_the_scheduler_lists(roles_cluster):
    with roles_cluster.connect(token=_token("worker")) as client:
        t = client.dense("w", (4,), ps.SGD(lr=1.0), init=np.arange(4.0), block_size=2)
        for address in roles_cluster.server_addresses:
            _denied(address, SERVER + "DropTable", pb.DropTableRequest(name="w"), "worker")
            _denied(address, SERVER + "CreateTable", pb.CreateTableRequest(
                spec=pb.TableSpec(name="x", kind=pb.TableSpec.EMBEDDING, dim=2)), "worker")
        np.testing.assert_array_equal(t.pull(), np.arange(4.0))
        t.push(np.ones(4, np.float32))
        np.testing.assert_array_equal(t.pull(), np.arange(4.0) - 1)
        stats = [client._pool.call(r, "Stats", pb.StatsRequest(), "stats")
                 for r in range(2)]
        assert [[x.name for x in s.tables] for s in stats] == [["w"], ["w"]]


def test_every_control_only_method_is_denied_to_the_other_roles(roles_cluster):
    """Each method the table gives to control only, called by a worker, a participant and a
    reader: PERMISSION_DENIED naming the method, and nothing changed (the table is as before and
    a push still goes through)."""
    control_only = sorted(m for m, allowed in roles.METHOD_ROLES.items()
                          if allowed == {roles.CONTROL})
    assert len(control_only) == 9
    with roles_cluster.connect(token=_token("worker"), timeout=5.0) as client:
        t = client.dense("w", (4,), ps.SGD(lr=1.0), init=np.arange(4.0), block_size=2)
        for method in control_only:
            for role in ("worker", "participant", "reader"):
                why = _denied(roles_cluster.server_addresses[0], method, b"", role)
                assert why.startswith(method.rsplit("/", 1)[1]) and role in why
        np.testing.assert_array_equal(t.pull(), np.arange(4.0))
        t.push(np.ones(4, np.float32))
        np.testing.assert_array_equal(t.pull(), np.arange(4.0) - 1)


def test_a_worker_token_cannot_register_a_server(roles_cluster):
    request = pb.RegisterRequest(role=pb.SERVER, address="127.0.0.1:1", requested_rank=0,
                                 replace=True)
    for role in ("worker", "participant", "reader"):
        with pytest.raises(grpc.RpcError) as info:
            _raw(roles_cluster.scheduler, SCHEDULER + "Register", request, role)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "registering as a server" in info.value.details() or "Register" in \
            info.value.details()
    # Nor speak for a registered server: its departure or its heartbeats.
    why = _denied(roles_cluster.scheduler, SCHEDULER + "Deregister",
                  pb.DeregisterRequest(node_id="server-0"), "worker")
    assert why.startswith("deregistering a server is not allowed to the worker role")
    _denied(roles_cluster.scheduler, SCHEDULER + "Heartbeat",
            pb.HeartbeatRequest(node_id="server-1"), "participant")
    with roles_cluster.connect(token=_token("worker")) as client:
        servers = [n for n in client.status()["nodes"] if n["role"] == "server"]
        assert sorted(n["address"] for n in servers) == sorted(roles_cluster.server_addresses)
        assert all(n["alive"] and not n["left"] for n in servers)


def test_a_reader_reads_but_cannot_write(roles_cluster, tmp_path):
    with roles_cluster.connect(token=_token("worker")) as client:
        client.dense("w", (6,), ps.SGD(lr=1.0), init=np.arange(6.0), block_size=2)
    # A reader's tools: status and a pull through the data path. Registering (connect()) is a
    # worker's; a reader's token is refused there by name.
    env = dict(os.environ, PARAMSERVER_TOKEN=_token("reader"))
    status = subprocess.run(PS + ["status", "--scheduler", roles_cluster.scheduler, "--json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    with pytest.raises(ps.PermissionDeniedError, match="Register is not allowed to the reader"):
        roles_cluster.connect(token=_token("reader"), timeout=5.0)
    for op, allowed in ((pb.PULL, True), (pb.LOOKUP, True), (pb.PUSH, False),
                        (pb.PUSH_PULL, False), (pb.ASSIGN, False)):
        message = _message(op, "w", [] if op in (pb.PULL, pb.LOOKUP)
                           else [np.full(2, 9.0, np.float32)])
        for address in roles_cluster.server_addresses:  # block 0 is on one of them
            try:
                _raw(address, SERVER + "Exchange", message, "reader")
                assert allowed, f"op {op} was allowed to a reader"
            except grpc.RpcError as exc:
                if allowed:  # the server without block 0 refuses it, but not for the role
                    assert exc.code() != grpc.StatusCode.PERMISSION_DENIED, exc.details()
                else:
                    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()
                    assert "not allowed to the reader role" in exc.details()
    with roles_cluster.connect(token=_token("worker")) as client:
        np.testing.assert_array_equal(client.table("w").pull(), np.arange(6.0))
        emb = client.embedding("e", 4, ps.SGD(lr=1.0))
        expected = emb.pull(np.array([7], np.uint64))  # creates row 7 (a worker's pull)
    # A reader's PULL of embedding rows reads as LOOKUP: unseen ids get their initial values and
    # no row is created, so a reader cannot grow a server's memory.
    from paramserver.partition import server_of_ids
    from paramserver.wire import SparseItem, iter_requests
    ids = np.arange(100, 164, dtype=np.uint64)
    owner = server_of_ids(ids, len(roles_cluster.server_addresses))
    for rank, address in enumerate(roles_cluster.server_addresses):
        _, messages = iter_requests(pb.PULL, [SparseItem("e", ids[owner == rank], 4)], 1 << 20, "")
        _raw(address, SERVER + "Exchange", bytes(next(iter(messages))), "reader")
    rows = sum(t.rows for address in roles_cluster.server_addresses
               for t in pb.ServerStats.FromString(_raw(address, SERVER + "Stats", pb.StatsRequest(),
                                                       "reader")).tables if t.name == "e")
    assert rows == 1, f"a reader's pull created {rows - 1} embedding rows"
    with roles_cluster.connect(token=_token("worker")) as client:
        np.testing.assert_array_equal(client.table("e").pull(np.array([7], np.uint64)), expected)
    # A checkpoint into a directory of the caller's choosing (files written where the caller
    # says, on every server's machine): the control plane's only.
    request = pb.CheckpointRequest(dir=str(tmp_path / "elsewhere"), timeout=60)
    for role in ("reader", "worker"):
        why = _denied(roles_cluster.scheduler, SCHEDULER + "Checkpoint", request, role)
        assert "a checkpoint into a directory of the caller's choosing" in why
    assert not (tmp_path / "elsewhere").exists()
    reply = pb.CheckpointReply.FromString(_raw(roles_cluster.scheduler, SCHEDULER + "Checkpoint",
                                               request, "control", timeout=60))
    assert reply.version == 1 and (tmp_path / "elsewhere").is_dir()


def _message(op: int, table: str, data: list) -> bytes:
    """One Exchange message of ``op`` on block 0 (2 elements) of ``table``."""
    from paramserver.wire import DenseItem, iter_requests
    _, messages = iter_requests(op, [DenseItem(table, [0], [2], data)], 1 << 20, "")
    return bytes(next(iter(messages)))


def test_a_participant_cannot_commit_its_own_unclipped_update(cluster_factory, secret_args):
    """--federated --dp-clip 0.1: participant a submits a delta of norm 4000, then sends
    FederatedRound COMMIT to the servers itself: refused, and the round is applied by the
    scheduler with a's update clipped (the model moves by at most 0.1)."""
    c = cluster_factory(2, scheduler_args=secret_args + (
        "--federated", "--dp-clip", "0.1", "--clients-per-round", "2", "--min-updates", "2",
        "--round-timeout", "60"), server_args=secret_args)
    with c.connect(token=_token("participant")) as client:
        # A participant initializes the table with given values (ASSIGN while not ready).
        client.dense("w", (400,), ps.SGD(lr=1.0), init=np.zeros(400), block_size=100)
        a, b = (Participant(client, ["w"], name=n) for n in ("a", "b"))
        model = a.fetch(timeout=20)
        assert model.round == 1
        a.submit({"w": model.values["w"] + 200.0}, num_examples=1)  # a delta of norm 4000
        commit = pb.RoundControlRequest(
            action=pb.RoundControlRequest.COMMIT, round=1,
            counted=[pb.RoundCounted(participant="a", weight=1.0, scale=1.0)])
        for address in c.server_addresses:
            why = _denied(address, SERVER + "FederatedRound", commit, "participant")
            assert why == ("FederatedRound is not allowed to the participant role (allowed: "
                           "control)")
        np.testing.assert_array_equal(client.pull(["w"])["w"], np.zeros(400))
        # Writing the model directly is refused too: a PUSH, and an ASSIGN now that w is ready.
        for op in (pb.PUSH, pb.ASSIGN):
            for address in c.server_addresses:
                with pytest.raises(grpc.RpcError) as info:
                    _raw(address, SERVER + "Exchange",
                         _message(op, "w", [np.full(2, 9.0, np.float32)]), "participant")
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ps.federated.status(client)["state"] == "open"
        model_b = b.fetch(timeout=20)
        b.submit({"w": model_b.values["w"] + 1.0}, num_examples=1)
        wait_for(lambda: ps.federated.status(client)["version"] >= 1, 30, "round 1 applied")
        moved = float(np.linalg.norm(client.pull(["w"])["w"]))
        # both deltas point the same way, so their clipped mean has norm 0.1: not 283
        assert 0.1 - 1e-4 <= moved <= 0.1 + 1e-4, moved


def test_launch_gives_workers_their_role_token_and_never_the_secret(tmp_path):
    """Under `paramserver launch` (no credentials given): the worker's token is the worker role's,
    the secret is not in its environment, a control call with it is refused, and the launcher's
    own final checkpoint (a control call) succeeds."""
    worker = ("import os, numpy as np, paramserver as ps\n"
              "from paramserver.v1 import paramserver_pb2 as pb\n"
              "assert not os.environ.get('PARAMSERVER_JOB_SECRET')\n"
              "assert not os.environ.get('PARAMSERVER_JOB_SECRET_FILE')\n"
              "with ps.connect() as c:\n"
              "    t = c.dense('w', (2,), ps.SGD(lr=1.0))\n"
              "    t.push(np.array([1.0, 2.0], np.float32))\n"
              "    try:\n"
              "        c._pool.call(0, 'PrepareCut', pb.PrepareCutRequest(cut=7, lease=1e9),\n"
              "                     'attack')\n"
              "    except ps.PermissionDeniedError as exc:\n"
              "        print('DENIED', exc, flush=True)\n"
              "    t.push(np.array([1.0, 2.0], np.float32))\n"
              "    print('VALUES', t.pull().tolist(), flush=True)\n")
    proc = run_example(PS + ["launch", "--num-servers", "1", "--num-workers", "1",
                             "--checkpoint-dir", str(tmp_path / "ckpt"), "--",
                             sys.executable, "-c", worker], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PrepareCut is not allowed to the worker role (allowed: control)" in proc.stdout
    assert "VALUES [-2.0, -4.0]" in proc.stdout
    assert "protection: per-role credentials (job secret)" in proc.stdout
    assert "the job finished: final checkpoint 1 written to" in proc.stdout
    assert (tmp_path / "ckpt" / "ckpt-0000000001").is_dir()


def test_an_unauthenticated_or_wrong_role_message_is_refused_before_it_is_received(
        roles_cluster):
    """60 MB messages with a wrong token, and with a reader's token to a control-only method:
    refused on the metadata, so the server never assembles them. Its peak RSS grows by a few MB,
    not by the messages (it grew by ~185 MB after one such message when the refusal was a unary
    handler, which receives the whole request first)."""
    address = roles_cluster.server_addresses[0]
    pid = roles_cluster.servers[0].pid

    def peak_kb() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    payload = b"\x01" * (60 << 20)
    before = peak_kb()
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 100 << 20)]) as channel:
        for method, metadata, code in (
                ("Exchange", (("authorization", "Bearer wrong"),),
                 grpc.StatusCode.UNAUTHENTICATED),
                ("Exchange", (), grpc.StatusCode.UNAUTHENTICATED),
                ("Restore", (("authorization", f"Bearer {_token('reader')}"),),
                 grpc.StatusCode.PERMISSION_DENIED),
                ("Exchange", (("authorization", "Bearer wrong"),),
                 grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(SERVER + method)(payload, timeout=30, metadata=metadata)
            assert info.value.code() == code, info.value.details()
    grown = peak_kb() - before
    assert grown < 32 * 1024, f"the server's peak RSS grew by {grown} kB"


def test_the_token_command_derives_a_roles_token_for_manual_starts(secret_args, tmp_path):
    for role in roles.ROLES:
        done = subprocess.run(PS + ["token", "--role", role, *secret_args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == _token(role)
    # A node given the secret and a token as well is refused at start, naming both flags.
    (tmp_path / "token").write_text("tok")
    done = subprocess.run(PS + ["status", "--scheduler", "127.0.0.1:1", "--token-file",
                                str(tmp_path / "token"), *secret_args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--job-secret-file" in done.stderr
    assert "--token-file" in done.stderr and SECRET not in done.stderr


def test_with_mutual_tls_a_role_may_come_from_the_client_certificate(tmp_path, secret_args):
    """Per-role credentials and mutual TLS: a worker whose certificate names
    ``paramserver-role:worker`` needs no token and may do a worker's calls only; a certificate
    naming no role, without a token, is refused as unauthenticated."""
    from tests.integration.conftest import kill, start_node
    from tests.integration.tls_certs import issue, make_ca

    ca, ca_cert, ca_key = make_ca(tmp_path)
    node = issue(tmp_path, "node", ca_cert, ca_key)
    worker = issue(tmp_path, "worker", ca_cert, ca_key, uris=("paramserver-role:worker",))
    nameless = issue(tmp_path, "nameless", ca_cert, ca_key)
    tls = {"PARAMSERVER_TLS_CERT": str(node.cert), "PARAMSERVER_TLS_KEY": str(node.key),
           "PARAMSERVER_TLS_CA": str(ca.cert), "PARAMSERVER_TOKEN": ""}
    sched, info = start_node(["scheduler", "--port", "0", "--num-servers", "1",
                              "--tls-client-auth", *secret_args], tmp_path / "s.json",
                             tmp_path / "s.log", env=tls)
    procs = [sched]
    try:
        assert "role from the certificate" in (tmp_path / "s.log").read_text()
        server, sinfo = start_node(["server", "--scheduler", info["address"],
                                    "--tls-client-auth", *secret_args], tmp_path / "v.json",
                                   tmp_path / "v.log", env=tls)
        procs.append(server)
        with ps.connect(info["address"], token="", tls_ca=str(ca.cert),
                        tls_cert=str(worker.cert), tls_key=str(worker.key),
                        timeout=10.0) as client:
            t = client.dense("w", (4,), ps.SGD(lr=1.0), init=np.arange(4.0))
            t.push(np.ones(4, np.float32))
            np.testing.assert_array_equal(t.pull(), np.arange(4.0) - 1)
            with pytest.raises(ps.PermissionDeniedError,
                               match="PrepareCut is not allowed to the worker role"):
                client._pool.call(0, "PrepareCut", pb.PrepareCutRequest(cut=3, lease=1e9),
                                  "attack")
            t.push(np.ones(4, np.float32))  # the gates stayed open
            np.testing.assert_array_equal(t.pull(), np.arange(4.0) - 2)
        with pytest.raises(ps.AuthenticationError, match="certificate names no role"):
            ps.connect(info["address"], token="", tls_ca=str(ca.cert),
                       tls_cert=str(nameless.cert), tls_key=str(nameless.key), timeout=5.0)
    finally:
        for proc in procs:
            kill(proc)
