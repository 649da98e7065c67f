"""The scheduler's side of table creation and removal on the servers.

Workers never call ``CreateTable`` or ``DropTable`` (both are control-only, see
:mod:`paramserver.roles`): a worker declares a table to the scheduler (``DeclareTable``), and when
the scheduler hands it the initialization it first creates the shards on the servers itself, with
the control credential; a worker whose initialization failed asks the scheduler to abandon the
table (``AbandonTable``) and the scheduler drops the shards. So a table exists on a server only
as the scheduler placed it, and a table the scheduler lists is never removed behind its back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paramserver.errors import NodeUnavailableError
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["create_requests", "create_shards", "drop_shards", "CALL_TIMEOUT"]

#: Seconds for one server's CreateTable or DropTable call.
CALL_TIMEOUT = 60.0

#: ``on_servers(servers, method, requests, what, timeout)``: the scheduler's parallel call to the
#: servers (CheckpointCoordinator.on_servers); raises the first error, naming the server.
OnServers = Callable[[dict[int, str], str, Any, str, float], dict[int, Any]]


def create_requests(placement: pb.TablePlacement, num_servers: int
                    ) -> dict[int, pb.CreateTableRequest]:
    """One CreateTableRequest per server holding part of the table: every server for an
    embedding table (rows go where their id hashes), the servers given blocks for a dense one."""
    spec = placement.spec
    if spec.kind == pb.TableSpec.EMBEDDING:
        return {rank: pb.CreateTableRequest(spec=spec) for rank in range(num_servers)}
    blocks: dict[int, list[int]] = {}
    for block, rank in enumerate(placement.block_servers):
        blocks.setdefault(rank, []).append(block)
    return {rank: pb.CreateTableRequest(spec=spec, blocks=ids) for rank, ids in blocks.items()}


def create_shards(on_servers: OnServers, placement: pb.TablePlacement,
                  servers: dict[int, str]) -> None:
    """Create the shards of ``placement`` on the live ``servers`` ({rank: address}); idempotent
    (a server that has the same shard answers ``created=False``). Raises the first server's error
    (e.g. ResourceExhaustedError over its memory budget), or NodeUnavailableError naming the
    servers that should hold a part and are not serving."""
    name = placement.spec.name
    requests = create_requests(placement, placement.num_servers)
    down = sorted(rank for rank in requests if rank not in servers)
    if down:
        raise NodeUnavailableError(f"cannot create table {name!r}: servers {down} hold part of "
                                   f"it and are not serving")
    on_servers({rank: servers[rank] for rank in requests}, "CreateTable", requests,
               f"create table {name!r}", CALL_TIMEOUT)


def drop_shards(on_servers: OnServers, name: str, servers: dict[int, str]) -> None:
    """Drop table ``name`` on every live server (its initialization failed). Raises the first
    server's error; the caller logs it (a shard left behind is replaced by the next CreateTable
    of that name only if it matches, else that declaration names the mismatch)."""
    on_servers(servers, "DropTable", pb.DropTableRequest(name=name), f"drop table {name!r}",
               CALL_TIMEOUT)
