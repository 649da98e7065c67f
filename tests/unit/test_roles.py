"""The role table and the credentials of paramserver.roles, without sockets."""

from __future__ import annotations

import collections

import grpc
import pytest

from paramserver import roles
from paramserver.errors import PermissionDeniedError
from paramserver.config import SECRET_ENV, SECRET_VALUE_ENV, TOKEN_ENV, Security, load_security
from paramserver.launch import LaunchConfig, job_environment, worker_environment
from paramserver.v1 import paramserver_pb2 as pb


def _methods() -> set[str]:
    return {f"/{service.full_name}/{method.name}"
            for service in pb.DESCRIPTOR.services_by_name.values()
            for method in service.methods}


def test_the_table_names_every_method_of_both_services_and_nothing_else():
    services = set(pb.DESCRIPTOR.services_by_name)
    assert services == {"Scheduler", "ParameterServer"}
    assert set(roles.METHOD_ROLES) == _methods()
    for method, allowed in roles.METHOD_ROLES.items():
        assert roles.CONTROL in allowed, method  # the control plane may call everything
        assert allowed <= set(roles.ROLES), method


def test_control_only_methods_are_the_ones_that_change_the_servers_behind_the_scheduler():
    control_only = {m.rsplit("/", 1)[1] for m, a in roles.METHOD_ROLES.items()
                    if a == {roles.CONTROL}}
    assert control_only == {"CreateTable", "DropTable", "PrepareCut", "SnapshotCut",
                            "PersistCut", "AbortCut", "Restore", "SyncMembers",
                            "FederatedRound"}
    readers = {m.rsplit("/", 1)[1] for m, a in roles.METHOD_ROLES.items() if roles.READER in a}
    assert readers == {"GetCluster", "Status", "ListTables", "Checkpoint", "Exchange",
                       "ShmAttach", "ShmExchange", "ShmDetach", "Stats"}


def test_role_tokens_are_distinct_per_role_and_job_and_reveal_nothing_of_the_secret():
    tokens = {role: roles.derive_token("secret-a", role) for role in roles.ROLES}
    assert len(set(tokens.values())) == 4
    assert all(len(t) == 64 and "secret-a" not in t for t in tokens.values())
    assert roles.derive_token("secret-b", "worker") != tokens["worker"]
    assert roles.derive_token("secret-a", "worker") == tokens["worker"]  # deterministic
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        roles.derive_token("secret-a", "admin")


_Details = collections.namedtuple("_Details", ("method", "invocation_metadata"))


def _handler(request, context):
    return roles.caller()


def _guard_call(guard: roles.Guard, method: str, token: str | None):
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    continuation = lambda details: grpc.unary_unary_rpc_method_handler(_handler)  # noqa: E731
    return guard.intercept_service(continuation, _Details(method, metadata))


def test_the_guard_finds_the_role_and_refuses_on_the_metadata():
    guard = roles.Guard(job_secret="s")
    exchange = "/paramserver.v1.ParameterServer/Exchange"
    for role in ("worker", "participant", "reader"):
        handler = _guard_call(guard, exchange, roles.derive_token("s", role))
        assert not handler.request_streaming
        assert handler.unary_unary(b"", None) == role  # the handler runs under the role
    control = _guard_call(guard, exchange, roles.derive_token("s", "control"))
    assert control.unary_unary(b"", None) is None  # control: unrestricted
    assert roles.caller() is None  # nothing leaks out of a call
    # refusals are stream-request handlers: they never read the request
    for method, token in ((exchange, None), (exchange, "wrong"),
                          ("/paramserver.v1.ParameterServer/Restore",
                           roles.derive_token("s", "worker")),
                          ("/paramserver.v1.ParameterServer/NewMethod",
                           roles.derive_token("s", "worker"))):
        assert _guard_call(guard, method, token).request_streaming, method
    # the secret itself is no token
    assert _guard_call(guard, exchange, "s").request_streaming
    # the health service is open
    assert not _guard_call(guard, "/grpc.health.v1.Health/Check", None).request_streaming
    # one token for everything: allowed every method, unrestricted
    shared = roles.Guard(token="tok")
    assert _guard_call(shared, "/paramserver.v1.ParameterServer/Restore",
                       "tok").unary_unary(b"", None) is None


def test_the_data_path_rule_by_role():
    names = roles._CALLER
    for role, op, ready, allowed in (
            ("worker", pb.PUSH, True, True), ("reader", pb.PULL, True, True),
            ("reader", pb.LOOKUP, True, True), ("reader", pb.PUSH, True, False),
            ("reader", pb.ASSIGN, False, False), ("participant", pb.PUSH, False, False),
            ("participant", pb.PUSH_PULL, False, False),
            ("participant", pb.ASSIGN, False, True), ("participant", pb.ASSIGN, True, False),
            ("participant", pb.PULL, True, True)):
        reset = names.set(role)
        try:
            if allowed:
                roles.check_data_op(op, lambda: ready)
            else:
                with pytest.raises(PermissionDeniedError, match=f"the {role} role"):
                    roles.check_data_op(op, lambda: ready)
        finally:
            names.reset(reset)


def test_security_modes_and_what_each_node_says_it_has(tmp_path):
    assert Security().protection.startswith("none")
    assert Security(token="t").protection == "one token for all roles"
    secured = Security(job_secret="s")
    assert secured.token == roles.derive_token("s", "control")
    assert secured.protection == "per-role credentials (job secret)"
    assert "job_secret" not in repr(secured) and secured.token not in repr(secured)
    path = tmp_path / "secret"
    path.write_text("s\n")
    loaded = load_security(job_secret_file=path, environ={TOKEN_ENV: "ignored"})
    assert loaded.job_secret == "s" and loaded.token == roles.derive_token("s", "control")
    assert load_security(environ={SECRET_ENV: str(path)}).job_secret == "s"
    assert load_security(environ={SECRET_VALUE_ENV: "v"}).job_secret == "v"
    with pytest.raises(ValueError, match="not both"):
        load_security(token="t", job_secret_file=path, environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_security(job_secret_file=tmp_path / "empty", environ={})


def test_launch_hands_the_secret_to_nodes_and_a_role_token_to_workers():
    config = LaunchConfig(command=["true"])
    nodes = job_environment(config)
    secret = nodes[SECRET_VALUE_ENV]
    assert len(secret) >= 32 and nodes[TOKEN_ENV] == "" and nodes[SECRET_ENV] == ""
    assert job_environment(config)[SECRET_VALUE_ENV] != secret  # one per job
    worker = worker_environment(nodes, federated=False)
    assert worker[SECRET_VALUE_ENV] == worker[SECRET_ENV] == ""
    assert worker[TOKEN_ENV] == roles.derive_token(secret, "worker")
    assert worker_environment(nodes, True)[TOKEN_ENV] == roles.derive_token(secret,
                                                                              "participant")
    shared = job_environment(LaunchConfig(command=["true"], token="tok"))
    assert shared[TOKEN_ENV] == "tok" and shared[SECRET_VALUE_ENV] == ""
    assert worker_environment(shared, False)[TOKEN_ENV] == "tok"
    with pytest.raises(ValueError, match="not both"):
        LaunchConfig(command=["true"], token="tok", job_secret="s")


def test_a_certificate_names_one_known_role_or_none():
    def ctx(*uris: str) -> dict[str, list[bytes]]:
        return {"peer_uri": [u.encode() for u in uris]}

    assert roles.certificate_role(ctx("paramserver-role:reader")) == "reader"
    assert roles.certificate_role(ctx("spiffe://x", "paramserver-role:worker")) == "worker"
    assert roles.certificate_role(ctx()) is None
    assert roles.certificate_role({}) is None
    assert roles.certificate_role(ctx("paramserver-role:admin")) is None
    assert roles.certificate_role(ctx("paramserver-role:worker",
                                      "paramserver-role:control")) is None  # ambiguous
