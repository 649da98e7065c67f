"""Talking to a job's scheduler from outside it: one-shot calls, and the cluster status as a plain
dict and as a table for people.

Used by ``paramserver status``, ``checkpoint`` and ``export``, the launcher, and
:meth:`paramserver.Client.status`.
"""

from __future__ import annotations

from typing import Any

import grpc

from paramserver import rpc
from paramserver.config import Security
from paramserver.errors import InvalidRequestError
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire import spec_to_dict

__all__ = ["call_scheduler", "fetch_status", "status_to_dict", "format_status"]

_ROLES = {pb.SCHEDULER: "scheduler", pb.SERVER: "server", pb.WORKER: "worker"}


def call_scheduler(scheduler: str, method: str, request: Any, *, timeout: float, what: str,
                   security: Security | None = None) -> Any:
    """One call of Scheduler RPC ``method`` to ``host:port`` on a channel of its own, with the job
    token (and TLS) of ``security``; errors name the scheduler (NodeUnavailableError if it is
    down, with what to check about TLS; AuthenticationError if it refuses the token;
    InvalidRequestError if the address is not a scheduler, naming a server's scheduler)."""
    security = security or Security()
    channel = rpc.make_channel(scheduler, security)
    try:
        return getattr(pb_grpc.SchedulerStub(channel), method)(request, timeout=timeout)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:  # "Method not found!": not a scheduler
            raise _not_a_scheduler(channel, scheduler, method, min(timeout, 10.0)) from None
        exc = rpc.translate(error, what, "scheduler", scheduler)
        if error.code() == grpc.StatusCode.UNAVAILABLE and not getattr(exc, "answered", False):
            # Plaintext against TLS is "Socket closed", TLS against plaintext a failed handshake.
            exc = type(exc)(f"{exc}{rpc.tls_hint(security)}")
        raise exc from None
    finally:
        channel.close()


def _not_a_scheduler(channel: grpc.Channel, address: str, method: str,
                     timeout: float) -> InvalidRequestError:
    """The error for an address that does not serve the Scheduler service: a parameter server
    says which scheduler it belongs to (its Stats reply), anything else is named as such."""
    try:
        stats = pb_grpc.ParameterServerStub(channel).Stats(pb.StatsRequest(), timeout=timeout)
    except grpc.RpcError:
        return InvalidRequestError(
            f"{address} is not a paramserver scheduler (it does not serve Scheduler.{method}); "
            f"give the address the scheduler printed, or PARAMSERVER_SCHEDULER of the job")
    where = f"its scheduler is at {stats.scheduler}: give --scheduler {stats.scheduler}" \
        if stats.scheduler else "its scheduler's address is unknown"
    return InvalidRequestError(f"{address} is a parameter server ({stats.node or 'a server'}), "
                               f"not the job's scheduler; {where}")


def fetch_status(scheduler: str, timeout: float = 10.0,
                 security: Security | None = None) -> dict[str, Any]:
    """Ask the scheduler at ``host:port`` for the job's status (see :func:`call_scheduler`)."""
    return status_to_dict(call_scheduler(scheduler, "Status", pb.StatusRequest(),
                                         timeout=timeout, what="status", security=security))


def status_to_dict(reply: pb.StatusReply) -> dict[str, Any]:
    """The status as JSON-ready data: ``{"nodes": [...], "tables": [...], "servers": [...]}``."""
    nodes = [{
        "role": _ROLES.get(n.role, "unknown"), "rank": n.rank, "node_id": n.node_id,
        "address": n.address, "alive": n.alive, "left": n.left, "pid": n.pid,
        "hostname": n.hostname, "last_heartbeat_age_s": round(n.last_heartbeat_age, 3),
        "incarnation": n.incarnation, "restarts": n.restarts, "rolled_back": n.rolled_back,
        "restore_state": n.restore_state, "transport": n.transport,
    } for n in reply.cluster.nodes]
    tables = []
    for t in reply.tables:
        entry = spec_to_dict(t.spec)
        entry.update(ready=t.ready, bytes_per_server=list(t.bytes_per_server))
        if t.spec.kind == pb.TableSpec.DENSE:
            entry.update(blocks_per_server=list(t.blocks_per_server))
        else:
            entry.update(rows_per_server=list(t.rows_per_server))
        tables.append(entry)
    servers = [{
        "rank": rank, "push_requests": s.push_requests, "pull_requests": s.pull_requests,
        "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
        "shm_clients": s.shm_clients, "shm_bytes": s.shm_bytes,
    } for rank, s in enumerate(reply.server_stats)]
    if reply.sync and reply.sync != "async":
        for entry, s in zip(servers, reply.server_stats):
            entry["sync"] = {"step": s.sync.step, "members": s.sync.members,
                             "max_staleness": s.sync.max_staleness,
                             "reads_waited": s.sync.reads_waited,
                             "wait_s": round(s.sync.wait_seconds, 3), "failed": s.sync.failed,
                             "waiting_for": s.sync.waiting_for}
    sync = {"model": reply.sync or "async", "on_worker_failure": reply.on_worker_failure,
            "members": [{"rank": m.rank, "first_step": m.first_step,
                         "last_step": m.last_step or None, "state": m.state}
                        for m in reply.sync_members]}
    c = reply.checkpoint
    checkpoint = {"dir": c.dir, "every_s": c.every, "last_version": c.last_version,
                  "last_age_s": None if c.last_age < 0 else round(c.last_age, 3),
                  "last_error": c.last_error, "completed": c.checkpoints,
                  "restored_version": c.restored_version, "restore_notes": list(c.restore_notes),
                  "verify_s": round(c.verify_seconds, 3), "restore_s": round(c.restore_seconds, 3),
                  "restore_bytes": c.restore_bytes}
    out = {"uptime_s": round(reply.uptime, 3), "view_version": reply.cluster.version,
           "num_servers": reply.cluster.num_servers,
           "num_workers": reply.cluster.num_workers, "nodes": nodes, "tables": tables,
           "servers": servers, "checkpoint": checkpoint, "sync": sync}
    if reply.HasField("federated"):
        f = reply.federated
        out["federated"] = {
            "round": f.round, "state": f.state, "version": f.version,
            "selected": list(f.selected), "received": list(f.received),
            "participants_seen": f.participants, "participants_live": f.live,
            "clients_per_round": f.clients_per_round, "min_updates": f.min_updates,
            "round_timeout_s": f.round_timeout, "deadline_in_s": round(f.deadline_in, 3),
            "rounds_applied": f.rounds_applied, "rounds_abandoned": f.rounds_abandoned,
            "last_counted": f.last_counted, "max_rounds": f.max_rounds,
            "dp_clip": f.dp_clip, "dp_noise": f.dp_noise, "last_error": f.last_error,
            "last_abandoned_round": f.last_abandoned_round,
            "last_abandoned_reason": f.last_abandoned_reason}
    return out


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
    lines.append(f"  {'node':<12} {'address':<22} {'pid':>7} {'state':<6} {'heartbeat':>10} "
                 f"{'restarts':>8}")
    for n in status["nodes"]:
        state = "left" if n["left"] else ("alive" if n["alive"] else "DEAD")
        extra = ""
        if n.get("restore_state"):
            extra += f"  {n['restore_state']}"
        if n.get("rolled_back"):
            extra += f", {n['rolled_back']} updates rolled back"
        if n.get("transport"):
            extra += f"  transport: {n['transport']}"
        lines.append(f"  {n['node_id']:<12} {n['address'] or n['hostname']:<22} {n['pid']:>7} "
                     f"{state:<6} {n['last_heartbeat_age_s']:>8.1f} s {n.get('restarts', 0):>8}"
                     f"{extra}")
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
    c = status.get("checkpoint") or {}
    lines += ["", "CHECKPOINTS"]
    if not c.get("dir") and not c.get("last_version"):
        lines.append("  (no checkpoint directory)")
    else:
        age = "never" if c["last_age_s"] is None else f"{c['last_age_s']:.0f} s ago"
        every = f"every {c['every_s']:g} s" if c["every_s"] else "on request"
        lines.append(f"  dir {c['dir'] or '-'}  {every}  last version {c['last_version']} "
                     f"({age}), {c['completed']} taken by this scheduler")
    if c.get("last_error"):
        lines.append(f"  LAST CHECKPOINT FAILED: {c['last_error']}")
    if c.get("restored_version"):
        lines.append(f"  resumed from checkpoint {c['restored_version']}: "
                     f"{_bytes(c['restore_bytes'])} loaded in {c['restore_s']:.2f} s "
                     f"(files checked in {c['verify_s']:.2f} s)")
    for note in c.get("restore_notes", []):
        lines.append(f"  resume: {note}")
    sync = status.get("sync") or {"model": "async"}
    if sync["model"] != "async":
        lines += ["", f"STEPS ({sync['model']}, on worker failure: {sync['on_worker_failure']})"]
        for m in sync["members"]:
            span = f"steps {m['first_step']}-" + (str(m["last_step"]) if m["last_step"] else "")
            lines.append(f"  worker-{m['rank']:<5} {span:<16} {m['state']}")
    fed = status.get("federated")
    if fed:
        limit = f" of {fed['max_rounds']}" if fed["max_rounds"] else ""
        lines += ["", f"FEDERATED ROUNDS (K={fed['clients_per_round']}, min "
                      f"{fed['min_updates']}, timeout {fed['round_timeout_s']:g} s"
                      + (f", DP-FedAvg C={fed['dp_clip']:g} sigma={fed['dp_noise']:g}"
                         if fed["dp_clip"] else "") + ")"]
        left = f", {fed['deadline_in_s']:.0f} s left" if fed["state"] == "open" else ""
        lines.append(f"  round {fed['round']}{limit} {fed['state']}{left}; model version "
                     f"{fed['version']}; {fed['rounds_applied']} applied, "
                     f"{fed['rounds_abandoned']} abandoned")
        lines.append(f"  participants seen {fed['participants_seen']}, live "
                     f"{fed['participants_live']}; updates received {len(fed['received'])} of "
                     f"{len(fed['selected'])} selected")
        if fed["selected"]:
            lines.append("  selected: " + ", ".join(
                n + (" (received)" if n in fed["received"] else "") for n in fed["selected"]))
        if fed["last_error"]:
            lines.append(f"  LAST ROUND ERROR: {fed['last_error']}")
        if fed["last_abandoned_reason"]:
            lines.append(f"  LAST ABANDONED: {fed['last_abandoned_reason']}")
    lines += ["", "SERVERS"]
    for s in status["servers"]:
        lines.append(f"  server-{s['rank']:<5} pushes {s['push_requests']:>8}  pulls "
                     f"{s['pull_requests']:>8}  in {_bytes(s['bytes_in']):>10}  out "
                     f"{_bytes(s['bytes_out']):>10}" + (
                         f"  shared memory: {s['shm_clients']} workers, "
                         f"{_bytes(s['shm_bytes'])} mapped" if s.get("shm_clients") else ""))
        st = s.get("sync")
        if st:
            what = "step" if sync["model"] == "bsp" else "slowest clock"
            line = (f"  {'':<12} {what} {st['step']}, {st['members']} workers, "
                    f"{st['reads_waited']} waits ({st['wait_s']:.1f} s)")
            if sync["model"].startswith("ssp"):
                line += f", largest staleness served {st['max_staleness']}"
            lines.append(line)
            if st["failed"]:
                lines.append(f"  {'':<12} STEPS FAIL: {st['failed']}")
            elif st["waiting_for"]:
                lines.append(f"  {'':<12} waiting: {st['waiting_for']}")
    return "\n".join(lines)
