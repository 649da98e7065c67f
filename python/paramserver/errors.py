"""Exceptions raised by paramserver.

Every error a worker sees is a :class:`ParamServerError`; its message names the node, the address and
what was asked, so a failure in a job of many processes can be traced from one line.
"""

from __future__ import annotations

__all__ = [
    "ParamServerError",
    "InvalidRequestError",
    "TableNotFoundError",
    "TableMismatchError",
    "NodeUnavailableError",
    "PSTimeoutError",
    "CheckpointError",
    "AuthenticationError",
    "ResourceExhaustedError",
    "StepFailedError",
    "RoundClosedError",
    "PermissionDeniedError",
]


class ParamServerError(Exception):
    """Base class of all paramserver errors."""


class InvalidRequestError(ParamServerError, ValueError):
    """A request was rejected because of what it carried (shape, dtype, value, id); nothing changed."""


class TableNotFoundError(ParamServerError, KeyError):
    """A table name is not declared (on this client, the scheduler or a server)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TableMismatchError(ParamServerError, ValueError):
    """A table was declared again with a different shape, kind, optimizer or initializer."""


class NodeUnavailableError(ParamServerError, ConnectionError):
    """A scheduler or server could not be reached, or is marked dead by the scheduler."""


class PSTimeoutError(ParamServerError, TimeoutError):
    """Waiting for something (servers to register, a barrier, a table) took longer than allowed."""


class CheckpointError(ParamServerError):
    """A checkpoint could not be written, found, read or restored; the message names the file or
    table and what was wrong. A failed checkpoint leaves the job running and earlier checkpoints
    intact."""


class AuthenticationError(ParamServerError, PermissionError):
    """A scheduler or server refused a call: the job token was missing or wrong (UNAUTHENTICATED).

    Give the job's token with ``PARAMSERVER_TOKEN``, ``--token-file`` or ``connect(token=...)``.
    """


class PermissionDeniedError(AuthenticationError):
    """A scheduler or server refused a call its caller's role may not make (PERMISSION_DENIED):
    the message names the method or operation, the caller's role and the roles allowed
    (``paramserver.roles``). Nothing changed."""


class ResourceExhaustedError(ParamServerError, MemoryError):
    """A server refused a request that would pass its memory budget (``--max-memory``), the
    memory the machine has (a table larger than it, even with no budget: the message names the
    bytes asked and the machine's memory) or the message size limit (RESOURCE_EXHAUSTED); the
    message names the table. Nothing changed, and nothing was allocated."""


class StepFailedError(ParamServerError):
    """A step of a synchronous job (``--sync bsp`` or ``ssp:S``) cannot complete: a worker of the
    job died and the job fails its steps (``--on-worker-failure fail``). The message names the
    worker and the step."""


class RoundClosedError(ParamServerError):
    """A federated update or report for a round that is closed (a late update): the message names
    the round and the round the job is at, e.g. "update for round 3 refused: round 3 closed, the
    job is at round 5". Nothing was counted."""
