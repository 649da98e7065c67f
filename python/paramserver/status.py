"""Cluster status: the scheduler's view as a plain dict, and as a table for people.

Used by ``paramserver status`` and :meth:`paramserver.Client.status`.
"""

from __future__ import annotations

from typing import Any

from paramserver import rpc
from paramserver.config import Security
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import optimizer_from_spec

__all__ = ["fetch_status", "status_to_dict", "format_status"]

_ROLES = {pb.SCHEDULER: "scheduler", pb.SERVER: "server", pb.WORKER: "worker"}


def fetch_status(scheduler: str, timeout: float = 10.0,
                 security: Security | None = None) -> dict[str, Any]:
    """Ask the scheduler at ``host:port`` for the job's status, with the job token (and TLS) of
    ``security``. Raises NodeUnavailableError if it is down, AuthenticationError if it refuses
    the token."""
    channel = rpc.make_channel(scheduler, security or Security())
    try:
        reply = rpc.call(pb_grpc.SchedulerStub(channel).Status, pb.StatusRequest(),
                         timeout=timeout, what="status", node="scheduler", address=scheduler)
    finally:
        channel.close()
    return status_to_dict(reply)


def status_to_dict(reply: pb.StatusReply) -> dict[str, Any]:
    """The status as JSON-ready data: ``{"nodes": [...], "tables": [...], "servers": [...]}``."""
    nodes = [{
        "role": _ROLES.get(n.role, "unknown"), "rank": n.rank, "node_id": n.node_id,
        "address": n.address, "alive": n.alive, "left": n.left, "pid": n.pid,
        "hostname": n.hostname, "last_heartbeat_age_s": round(n.last_heartbeat_age, 3),
    } for n in reply.cluster.nodes]
    tables = []
    for t in reply.tables:
        spec = t.spec
        entry: dict[str, Any] = {
            "name": spec.name,
            "kind": "dense" if spec.kind == pb.TableSpec.DENSE else "embedding",
            "optimizer": optimizer_from_spec(spec.optimizer).to_dict(),
            "ready": t.ready,
            "bytes_per_server": list(t.bytes_per_server),
        }
        if spec.kind == pb.TableSpec.DENSE:
            entry.update(shape=list(spec.shape), block_size=spec.block_size,
                         blocks_per_server=list(t.blocks_per_server))
        else:
            entry.update(dim=spec.dim, rows_per_server=list(t.rows_per_server))
        tables.append(entry)
    servers = [{
        "rank": rank, "push_requests": s.push_requests, "pull_requests": s.pull_requests,
        "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
    } for rank, s in enumerate(reply.server_stats)]
    return {"uptime_s": round(reply.uptime, 3), "num_servers": reply.cluster.num_servers,
            "num_workers": reply.cluster.num_workers, "nodes": nodes, "tables": tables,
            "servers": servers}


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(status: dict[str, Any]) -> str:
    """A human-readable rendering of :func:`status_to_dict` output."""
    lines = [f"job: {status['num_servers']} servers, {status['num_workers'] or '?'} workers, "
             f"scheduler up {status['uptime_s']:.0f} s", "", "NODES"]
    lines.append(f"  {'node':<12} {'address':<22} {'pid':>7} {'state':<6} {'heartbeat':>10}")
    for n in status["nodes"]:
        state = "left" if n["left"] else ("alive" if n["alive"] else "DEAD")
        lines.append(f"  {n['node_id']:<12} {n['address'] or n['hostname']:<22} {n['pid']:>7} "
                     f"{state:<6} {n['last_heartbeat_age_s']:>8.1f} s")
    lines += ["", "TABLES"]
    if not status["tables"]:
        lines.append("  (none)")
    for t in status["tables"]:
        opt = t["optimizer"]["name"]
        if t["kind"] == "dense":
            layout = " ".join(f"s{r}:{b}" for r, b in enumerate(t["blocks_per_server"]))
            lines.append(f"  {t['name']:<24} dense {tuple(t['shape'])} {opt}  blocks {layout}")
        else:
            layout = " ".join(f"s{r}:{b}" for r, b in enumerate(t["rows_per_server"]))
            lines.append(f"  {t['name']:<24} embedding dim={t['dim']} {opt}  rows {layout}")
        lines.append(f"  {'':<24} bytes " + " ".join(
            f"s{r}:{_bytes(b)}" for r, b in enumerate(t["bytes_per_server"])))
    lines += ["", "SERVERS"]
    for s in status["servers"]:
        lines.append(f"  server-{s['rank']:<5} pushes {s['push_requests']:>8}  pulls "
                     f"{s['pull_requests']:>8}  in {_bytes(s['bytes_in']):>10}  out "
                     f"{_bytes(s['bytes_out']):>10}")
    return "\n".join(lines)
