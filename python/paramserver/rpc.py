"""gRPC plumbing shared by every node: channels, servers, health, and error translation.

Every remote call goes through :func:`call`, which sets a deadline and turns a ``grpc.RpcError``
into a :class:`~paramserver.errors.ParamServerError` that names the node, its address and what was
asked: never a bare ``_InactiveRpcError``, never a call without a deadline.

Security lives here and only here: :func:`make_server`, :func:`bind` and :func:`make_channel` take
the node's :class:`~paramserver.config.Security` and install the token check (one server
interceptor per node), the token on every outgoing call (one client interceptor per channel) and,
when configured, TLS. A new command or node only passes that object along.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from paramserver import errors, roles
from paramserver.config import Security
from paramserver.errors import (
    AuthenticationError,
    CheckpointError,
    InvalidRequestError,
    NodeUnavailableError,
    ParamServerError,
    PermissionDeniedError,
    PSTimeoutError,
    ResourceExhaustedError,
    TableMismatchError,
    TableNotFoundError,
)

__all__ = ["MAX_MESSAGE_BYTES", "MAX_ERROR_CHARS", "bounded", "tune_malloc", "MALLOC_ENV",
           "make_channel", "make_server", "bind", "is_loopback", "serve_health", "call",
           "translate", "abort_on", "tls_hint"]

#: Hard cap on one message. Requests are cut into ~2 MB messages, so this is only a safety margin.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Loopback and LAN peers: do not let a dead peer hold a channel forever.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

#: Server-only options. gRPC sets SO_REUSEPORT on listening sockets by default, so a second
#: scheduler or server on a taken port would start too and the kernel would split connections
#: between the two: two jobs on one machine mixed silently. A port belongs to one node.
_SERVER_OPTIONS = _OPTIONS + [("grpc.so_reuseport", 0)]

T = TypeVar("T")

log = logging.getLogger(__name__)

_MALLOC_TUNED = False

#: glibc's environment variables for the settings of :func:`tune_malloc`, read at process start.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
              "MALLOC_TRIM_THRESHOLD_": str(256 * 1024 * 1024)}


def tune_malloc() -> None:
    """Let glibc malloc reuse the memory of freed megabyte-sized buffers (once per process).

    Why: every message of the data path allocates a few 1-4 MB buffers (the encoded message,
    gRPC's copy, the received bytes, a pull's values) and frees them a moment later. By default
    glibc serves such sizes with fresh mmap()s and returns freed heap tops to the kernel, so every
    message pays a page fault per 4 KiB touched, which under KVM costs more than the copies
    themselves: measured here, a 16 MB pull went from 0.46 to 0.7-0.8 GB/s with these settings.
    Allocations up to 32 MiB (glibc's own dynamic ceiling) come from the heap and up to 256 MiB of
    free heap is kept for reuse. Skipped off glibc, when the process set MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ itself, or when PARAMSERVER_TUNE_MALLOC=0.

    This changes malloc for the whole process, so the library never calls it on its own: the
    ``paramserver server`` command does, ``paramserver launch`` sets the equivalent environment
    variables (:data:`MALLOC_ENV`) for its processes, and a worker started otherwise may call it.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if (os.environ.get("PARAMSERVER_TUNE_MALLOC", "1") == "0"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    mallopt(m_mmap_threshold, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))
    mallopt(m_trim_threshold, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]))


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class _AttachToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(self._header)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        """Call on with the token attached."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        """Call on with the token attached."""
        return continuation(self._details(client_call_details), request)


def make_channel(address: str, security: Security) -> grpc.Channel:
    """A channel to ``host:port`` with paramserver's message-size limits that attaches the job
    token of ``security`` (if any) to every call.

    With TLS settings (``security.tls``) the channel is TLS: the peer's certificate must be signed
    by ``security.tls_ca`` (system roots if empty) and name the host of ``address``; this node's
    certificate is presented when the peer asks for one (mutual TLS).
    """
    if security.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.tls_ca or None, private_key=security.tls_key or None,
            certificate_chain=security.tls_cert or None)
        channel = grpc.secure_channel(address, credentials, options=_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=_OPTIONS)
    if security.token:
        channel = grpc.intercept_channel(channel, _AttachToken(security.token))
    return channel


def tls_hint(security: Security, peer: str = "scheduler") -> str:
    """What to check when ``peer`` seems unreachable, as a suffix of the error: a TLS mismatch
    looks like an unreachable peer (gRPC retries the handshake, or reports "Socket closed")."""
    if security.tls:
        return (f"; this node calls over TLS: is the {peer} serving TLS with a certificate "
                f"signed by --tls-ca that names the host in its address (and, for mutual TLS, "
                f"does it accept this node's certificate)?")
    return (f"; this node calls in plaintext: if the {peer} serves TLS, give --tls-ca "
            f"(PARAMSERVER_TLS_CA)")


def make_server(threads: int, security: Security) -> grpc.Server:
    """A thread-pool gRPC server with paramserver's limits; ``threads`` concurrent handlers.

    With a token in ``security``, every call but the health service's must carry it (else
    UNAUTHENTICATED); with a job secret, one of the role tokens derived from it, and the role
    must be allowed the method (else PERMISSION_DENIED; see :mod:`paramserver.roles`); with a job
    secret and mutual TLS, a call without a token may take its role from the client certificate
    (URI SAN ``paramserver-role:ROLE``). All are
    refused on the metadata, before the request is read. Bind it with :func:`bind` and the same
    ``security``.
    """
    interceptors = ([roles.Guard(security.token, security.job_secret,
                                 certificate_roles=security.tls_client_auth)]
                    if security.token or security.job_secret else [])
    return grpc.server(futures.ThreadPoolExecutor(max_workers=threads,
                                                  thread_name_prefix="ps-rpc"),
                       interceptors=interceptors, options=_SERVER_OPTIONS,
                       maximum_concurrent_rpcs=None)


def is_loopback(host: str) -> bool:
    """True if ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: may resolve to anything


def _port_taken(host: str, port: int) -> bool:
    """True if some socket already listens on ``host:port`` (probed with a plain bind, as gRPC
    binds: SO_REUSEADDR, no SO_REUSEPORT). Lets :func:`bind` name the cause in one line before
    gRPC logs its own multi-line error."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return False  # an unresolvable host: gRPC's bind reports it
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def bind(server: grpc.Server, host: str, port: int, security: Security) -> int:
    """Bind ``host:port`` (port 0: any free port) and return the port actually bound.

    The port is exclusive to this server (no SO_REUSEPORT, see ``_SERVER_OPTIONS``). With a
    certificate in ``security`` the port serves TLS only, and with ``tls_client_auth`` it also
    requires a client certificate signed by ``tls_ca``. Binding an address other than loopback
    without a token logs a warning: anyone who can reach it could read and change every table.

    Raises:
        NodeUnavailableError: one line naming the address: ``address in use`` when another process
            listens on the port, otherwise that the address cannot be bound.
    """
    address = f"{host}:{port}"
    if not security.token and not is_loopback(host):
        log.warning("listening on %s without a job token: anyone who can reach this address can "
                    "read and change the job's state; set PARAMSERVER_TOKEN or --token-file",
                    address)
    in_use = (f"cannot listen on {address}: address in use (port {port} is taken by another "
              f"process; choose another --port, or 0 for any free port)")
    if port and _port_taken(host, port):
        raise NodeUnavailableError(in_use)
    try:
        if security.tls_cert:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials(
                [(security.tls_key, security.tls_cert)],
                root_certificates=security.tls_ca if security.tls_client_auth else None,
                require_client_auth=security.tls_client_auth))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpc >= 1.50 raises instead of returning 0
        bound = 0
    if bound == 0:
        if port and _port_taken(host, port):  # taken between the probe and the bind
            raise NodeUnavailableError(in_use)
        tls = " Are the TLS certificate and key valid?" if security.tls_cert else ""
        raise NodeUnavailableError(f"cannot listen on {address}: the address cannot be bound "
                                   f"(is {host!r} an interface of this machine?{tls})")
    return bound


def serve_health(server: grpc.Server) -> health.HealthServicer:
    """Add the standard gRPC health service (NOT_SERVING until :func:`set_serving`)."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return servicer


_BY_CODE: dict[grpc.StatusCode, type[ParamServerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: TableNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: TableMismatchError,
    grpc.StatusCode.FAILED_PRECONDITION: TableMismatchError,
    grpc.StatusCode.UNAVAILABLE: NodeUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: PSTimeoutError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
}

#: Longest error detail a node sends. gRPC carries details in a header and peers refuse headers of
#: more than 8 KiB by default, so an error that echoed a request (a 4M-id push once made a 12 MB
#: message) would be lost as an opaque failure. Messages are written bounded; this is the backstop.
MAX_ERROR_CHARS = 2000


def bounded(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut to about ``limit`` characters, saying how much was cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters cut)"


#: Trailing metadata key naming the paramserver exception a servicer raised (see abort_on), so
#: the caller raises the same class whatever the status code.
_ERROR_KEY = "ps-error"


def _error_class(error: grpc.RpcError, code: grpc.StatusCode) -> type[ParamServerError]:
    try:
        for key, value in error.trailing_metadata() or ():
            if key == _ERROR_KEY and value in errors.__all__:
                return getattr(errors, value)
    except Exception:  # not a call error (no metadata): fall back to the code
        pass
    return _BY_CODE.get(code, ParamServerError)


def _answered(error: grpc.RpcError) -> bool:
    """Whether the status came from a paramserver handler (it names its error class)."""
    try:
        return any(key == _ERROR_KEY for key, _ in error.trailing_metadata() or ())
    except Exception:  # not a call error
        return False


def translate(error: grpc.RpcError, what: str, node: str, address: str) -> ParamServerError:
    """The paramserver exception for a failed call ``what`` to ``node`` at ``address``."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _error_class(error, code)
    if code == grpc.StatusCode.UNAVAILABLE and _answered(error):
        # The node answered that something else is unavailable (a dead worker, a missing
        # server): not a transport failure, so not something to retry.
        exc = cls(f"{what} on {node} at {address} failed: {details}")
        exc.answered = True  # type: ignore[attr-defined]
        return exc
    if code == grpc.StatusCode.UNAVAILABLE:
        return cls(f"{node} at {address} is unreachable during {what}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return cls(f"{what} on {node} at {address} timed out: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return cls(f"{what} on {node} at {address} failed: authentication failed ({details}); "
                   f"give the job's token with PARAMSERVER_TOKEN, --token-file or "
                   f"connect(token=...)")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return cls(f"{what} on {node} at {address} failed: permission denied ({details}); the "
                   f"token given is of a role that may not do this (paramserver.roles)")
    return cls(f"{what} on {node} at {address} failed: {details}")


def call(method: Callable[..., T], request: Any, *, timeout: float, what: str, node: str,
         address: str) -> T:
    """Invoke a unary stub method with a deadline, translating failures (see :func:`translate`)."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise translate(error, what, node, address) from None


def abort_on(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    """Run ``fn``; turn the errors a bad request causes into a gRPC status with the reason.

    ``ValueError``/``TypeError`` -> INVALID_ARGUMENT, ``IndexError`` -> OUT_OF_RANGE,
    :class:`TableNotFoundError` -> NOT_FOUND, :class:`TableMismatchError` -> ALREADY_EXISTS,
    :class:`PSTimeoutError` -> DEADLINE_EXCEEDED, :class:`PermissionDeniedError` ->
    PERMISSION_DENIED, :class:`ResourceExhaustedError` ->
    RESOURCE_EXHAUSTED, :class:`CheckpointError`, :class:`StepFailedError` and
    :class:`RoundClosedError` -> FAILED_PRECONDITION
    (named in the ``ps-error``
    trailing metadata, so the caller raises CheckpointError). Anything else propagates (an
    internal error). The reason is cut to :data:`MAX_ERROR_CHARS`.
    """
    try:
        return fn()
    except PermissionDeniedError as exc:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, bounded(str(exc)))
    except (CheckpointError, errors.StepFailedError, errors.RoundClosedError) as exc:
        context.set_trailing_metadata(((_ERROR_KEY, type(exc).__name__),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, bounded(str(exc)))
    except TableNotFoundError as exc:
        context.abort(grpc.StatusCode.NOT_FOUND, bounded(str(exc)))
    except TableMismatchError as exc:
        context.abort(grpc.StatusCode.ALREADY_EXISTS, bounded(str(exc)))
    except PSTimeoutError as exc:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, bounded(str(exc)))
    except NodeUnavailableError as exc:
        context.set_trailing_metadata(((_ERROR_KEY, "NodeUnavailableError"),))
        context.abort(grpc.StatusCode.UNAVAILABLE, bounded(str(exc)))
    except ResourceExhaustedError as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(str(exc)))
    except (ValueError, TypeError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(exc)))
    except IndexError as exc:
        context.abort(grpc.StatusCode.OUT_OF_RANGE, bounded(str(exc)))
    raise AssertionError("unreachable")  # context.abort always raises
