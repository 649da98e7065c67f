"""Who may call what: the four roles of a job, their credentials and the table of every RPC.

A job protected per role has one secret, the **job secret**, held only by the control plane (the
scheduler, the servers, and the operator's own control commands). From it each role's token is
derived (:func:`derive_token`: HMAC-SHA256 of the secret and the role's name), so holding one
role's token reveals neither the secret nor another role's token:

- ``control``: the scheduler and the servers among themselves (cuts, restores, table creation and
  removal, step-group changes, federated commits) and the operator's control calls;
- ``worker``: training processes (``paramserver.connect``): register, declare tables, push, pull;
- ``participant``: federated participants: what a worker may do, except writing values directly
  (their updates go through ``FederatedSubmit``, where the job's clipping and noise apply); an
  ``ASSIGN`` is allowed only to a table still being initialized;
- ``reader``: status, metrics, export and pulls (read-only: ``PULL`` / ``LOOKUP``).

:data:`METHOD_ROLES` names, for every method of both services, the roles that may call it; the
server interceptor (:class:`Guard`) refuses any other caller with ``PERMISSION_DENIED`` before the
request is read. Methods whose requests mix reads and writes (``Exchange``, ``ShmExchange``,
``Register``) admit several roles and the handler checks the finer rule with :func:`caller`.

Two simpler modes remain: no credentials (nothing is checked) and one shared token for every node
(``--token-file`` / ``PARAMSERVER_TOKEN`` everywhere): that token is allowed everything, as before
roles existed. :func:`protection` says which one a node runs.

Thread safety: everything here is immutable after construction; :class:`Guard` is called
concurrently by gRPC's threads.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

import grpc

from paramserver.errors import PermissionDeniedError

__all__ = ["CONTROL", "WORKER", "PARTICIPANT", "READER", "ROLES", "METHOD_ROLES", "WRITE_OPS",
           "derive_token", "caller", "require", "check_data_op", "Guard", "protection",
           "deny_message", "OPEN_PREFIX", "CONTROL_ONLY",
           "CERT_ROLE_PREFIX", "certificate_role"]

CONTROL, WORKER, PARTICIPANT, READER = "control", "worker", "participant", "reader"
#: Every role, most trusted first.
ROLES = (CONTROL, WORKER, PARTICIPANT, READER)

_SCHEDULER = "/paramserver.v1.Scheduler/"
_SERVER = "/paramserver.v1.ParameterServer/"
#: Open to anyone, without credentials: orchestrators and load balancers probe health anonymously.
OPEN_PREFIX = "/grpc.health.v1.Health/"

_C = frozenset({CONTROL})
_CW = frozenset({CONTROL, WORKER})
#: The roles of control-only operations (for :func:`require`).
CONTROL_ONLY = _C
_CWP = frozenset({CONTROL, WORKER, PARTICIPANT})
_CWR = frozenset({CONTROL, WORKER, READER})
_ALL = frozenset(ROLES)

#: Full method name -> the roles that may call it. Every method of both services is listed (a unit
#: test checks this against the generated service descriptors); a method missing here is refused
#: to every role but control.
METHOD_ROLES: dict[str, frozenset[str]] = {
    # Scheduler. Register: a server only with control (checked in the handler).
    _SCHEDULER + "Register": _CWP,
    _SCHEDULER + "Deregister": _CWP,
    _SCHEDULER + "Heartbeat": _CWP,
    _SCHEDULER + "GetCluster": _ALL,
    _SCHEDULER + "DeclareTable": _CWP,
    _SCHEDULER + "TableReady": _CWP,
    _SCHEDULER + "AbandonTable": _CWP,
    _SCHEDULER + "Barrier": _CWP,
    _SCHEDULER + "Status": _ALL,
    _SCHEDULER + "ListTables": _ALL,
    # A consistent cut run by the scheduler itself: workers and readers (export) may ask for one.
    _SCHEDULER + "Checkpoint": _CWR,
    _SCHEDULER + "SyncJoin": _CW,
    _SCHEDULER + "SyncLeave": _CW,
    _SCHEDULER + "FederatedJoin": _CWP,
    _SCHEDULER + "FederatedPoll": _CWP,
    _SCHEDULER + "FederatedReport": _CWP,
    # ParameterServer: the data path. Exchange/ShmExchange: which ops, checked in the handler.
    _SERVER + "Exchange": _ALL,
    _SERVER + "ShmAttach": _ALL,
    _SERVER + "ShmExchange": _ALL,
    _SERVER + "ShmDetach": _ALL,
    _SERVER + "Stats": _ALL,
    _SERVER + "FederatedSubmit": _CWP,
    # ParameterServer: driven by the scheduler only.
    _SERVER + "CreateTable": _C,
    _SERVER + "DropTable": _C,
    _SERVER + "PrepareCut": _C,
    _SERVER + "SnapshotCut": _C,
    _SERVER + "PersistCut": _C,
    _SERVER + "AbortCut": _C,
    _SERVER + "Restore": _C,
    _SERVER + "SyncMembers": _C,
    _SERVER + "FederatedRound": _C,
}

#: Data-path ops (``pb.Op`` values) that change values: PUSH, PUSH_PULL, ASSIGN.
WRITE_OPS = frozenset({0, 2, 3})
_ASSIGN = 3

#: The role of the call being served: None when unrestricted (no credentials, the one shared
#: token, or control). Set by :class:`Guard` around the handler.
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("paramserver_caller",
                                                                      default=None)

_LABEL = b"paramserver role "


def derive_token(secret: str, role: str) -> str:
    """The token of ``role`` in the job whose secret is ``secret``: the hex HMAC-SHA256 of the
    secret and ``"paramserver role " + role`` (64 characters). Without the secret, a token tells
    nothing of another role's. ValueError for an unknown role or an empty secret."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not secret:
        raise ValueError("the job secret is empty")
    return hmac.new(secret.encode(), _LABEL + role.encode(), hashlib.sha256).hexdigest()


def caller() -> str | None:
    """The role of the call this thread serves, None if unrestricted (see module doc)."""
    return _CALLER.get()


def deny_message(method: str, role: str, allowed: Iterable[str]) -> str:
    """The refusal text: the method, the caller's role and the roles allowed."""
    return (f"{method.rsplit('/', 1)[-1]} is not allowed to the {role} role (allowed: "
            f"{', '.join(r for r in ROLES if r in set(allowed)) or 'none'})")


def require(allowed: frozenset[str], what: str) -> None:
    """Raise PermissionDeniedError unless the current caller (:func:`caller`) is unrestricted or
    in ``allowed``; ``what`` names the operation refused."""
    role = _CALLER.get()
    if role is not None and role not in allowed:
        raise PermissionDeniedError(
            f"{what} is not allowed to the {role} role (allowed: "
            f"{', '.join(r for r in ROLES if r in allowed)})")


def check_data_op(op: int, table_ready: Any = None) -> None:
    """The finer rule of Exchange / ShmExchange: readers only read; participants may ASSIGN only
    while a table is being initialized (``table_ready()`` False), never PUSH. Raises
    PermissionDeniedError naming the op."""
    role = _CALLER.get()
    if role is None or role == WORKER or op not in WRITE_OPS:
        return
    if role == PARTICIPANT and op == _ASSIGN and table_ready is not None and not table_ready():
        return
    names = {0: "PUSH", 2: "PUSH_PULL", 3: "ASSIGN"}
    why = (" to a table that is already initialized (a participant's updates go through "
           "FederatedSubmit)" if role == PARTICIPANT and op == _ASSIGN else "")
    raise PermissionDeniedError(f"{names[op]}{why} is not allowed to the {role} role (allowed: "
                                f"control, worker)")


def protection(token: str, job_secret: str, tls: bool, client_auth: bool) -> str:
    """One line naming how a node is protected: none, one token for all roles, or per-role
    credentials, with TLS if any."""
    if job_secret:
        text = "per-role credentials (job secret)"
    elif token:
        text = "one token for all roles"
    else:
        text = "none (no token: every caller may do everything)"
    if client_auth and job_secret:
        text += " + mutual TLS (a call without a token takes its role from the certificate)"
    elif client_auth:
        text += " + mutual TLS"
    elif tls:
        text += " + TLS"
    return text


def _refusal(code: grpc.StatusCode, why: str) -> grpc.RpcMethodHandler:
    """A handler that refuses before reading the request: a stream-request handler gets an
    iterator and never advances it, so gRPC does not receive the message (only what HTTP/2 flow
    control lets the peer send ahead). A unary handler would receive the whole message first."""
    def refuse(request_iterator: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, why)
    return grpc.stream_unary_rpc_method_handler(refuse)


#: URI subject alternative name prefix naming a role in a client certificate (mutual TLS).
CERT_ROLE_PREFIX = "paramserver-role:"


def certificate_role(auth_context: dict[str, list[bytes]]) -> str | None:
    """The role a verified client certificate names (``auth_context`` of the call): its one URI
    SAN ``paramserver-role:ROLE``; None if it names none, an unknown role, or several."""
    named = {uri.decode(errors="replace")[len(CERT_ROLE_PREFIX):]
             for uri in auth_context.get("peer_uri", [])
             if uri.startswith(CERT_ROLE_PREFIX.encode())}
    if len(named) != 1:
        return None
    role = named.pop()
    return role if role in ROLES else None


def _by_certificate(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
    """``handler`` (unary) behind a stream-request handler that finds the caller's role in its
    client certificate and checks it before reading the request (the interceptor sees only the
    metadata, the certificate is in the call's auth context)."""
    inner = handler.unary_unary
    if inner is None:
        return None
    allowed = METHOD_ROLES.get(method)

    def behavior(requests: Any, context: grpc.ServicerContext) -> Any:
        role = certificate_role(context.auth_context())
        if role is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"no job token, and the client certificate names no role (one URI "
                          f"subject alternative name {CERT_ROLE_PREFIX}ROLE, ROLE one of "
                          f"{', '.join(ROLES)})")
        if role != CONTROL and (allowed is None or role not in allowed):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          deny_message(method, role, allowed or _C))
        request = next(requests)  # only now is the request received
        reset = _CALLER.set(None if role == CONTROL else role)
        try:
            return inner(request, context)
        finally:
            _CALLER.reset(reset)
    return grpc.stream_unary_rpc_method_handler(
        behavior, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


def _with_role(handler: grpc.RpcMethodHandler, role: str) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour run under ``role`` (see :func:`caller`)."""
    changes = {}
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        inner = getattr(handler, kind)
        if inner is None:
            continue

        def behavior(request: Any, context: grpc.ServicerContext, _inner=inner) -> Any:
            reset = _CALLER.set(role)
            try:
                return _inner(request, context)
            finally:
                _CALLER.reset(reset)
        changes[kind] = behavior
    return handler._replace(**changes)


class Guard(grpc.ServerInterceptor):
    """The server interceptor of a protected node: authenticates the caller's bearer token and
    applies :data:`METHOD_ROLES`.

    With ``job_secret`` the four role tokens are derived once here and each call's token is
    compared (constant time, ``hmac.compare_digest``, against all four) to find the caller's role;
    with only ``token`` (one token for every node) that token is allowed everything. Refusals
    happen on the metadata, before the request is read: UNAUTHENTICATED for a missing or unknown
    token, PERMISSION_DENIED (naming the method, the role and the roles allowed) for a role not
    in the method's entry. The health service is open.

    With ``certificate_roles`` (per-role credentials and mutual TLS), a call without a token takes
    its role from the client certificate's URI SAN ``paramserver-role:ROLE``
    (:func:`certificate_role`), checked before the request is read; a token, when given, wins.
    """

    def __init__(self, token: str = "", job_secret: str = "",
                 certificate_roles: bool = False) -> None:
        self._expected: list[tuple[bytes, str | None]]
        if job_secret:
            self._expected = [(f"Bearer {derive_token(job_secret, r)}".encode(), r)
                              for r in ROLES]
        elif token:
            self._expected = [(f"Bearer {token}".encode(), None)]
        else:
            raise ValueError("a Guard needs a token or a job secret")
        self._missing = _refusal(grpc.StatusCode.UNAUTHENTICATED,
                                 "no job token: the call carried no 'authorization: Bearer' "
                                 "metadata")
        self._wrong = _refusal(grpc.StatusCode.UNAUTHENTICATED, "wrong job token")
        self._handlers: dict[tuple[str, str], grpc.RpcMethodHandler] = {}
        self._certificate_roles = certificate_roles and bool(job_secret)

    def intercept_service(self, continuation, handler_call_details):
        """Continue to the method's handler (run under the caller's role), or refuse."""
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIX):
            return continuation(handler_call_details)
        given = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if given is None:
            if not self._certificate_roles:
                return self._missing
            handler = self._handlers.get((method, ""))
            if handler is None:
                found_handler = continuation(handler_call_details)
                if found_handler is None:
                    return None
                handler = _by_certificate(method, found_handler) or self._missing
                self._handlers[(method, "")] = handler
            return handler
        found, role = False, None
        for expected, name in self._expected:  # every one compared: no early exit to time
            if hmac.compare_digest(given, expected):
                found, role = True, name
        if not found:
            return self._wrong
        if role is None or role == CONTROL:  # the shared token, or the control plane
            return continuation(handler_call_details)
        allowed = METHOD_ROLES.get(method)
        if allowed is None or role not in allowed:
            return _refusal(grpc.StatusCode.PERMISSION_DENIED,
                            deny_message(method, role, allowed or _C))
        handler = self._handlers.get((method, role))
        if handler is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            handler = _with_role(handler, role)
            self._handlers[(method, role)] = handler
        return handler
