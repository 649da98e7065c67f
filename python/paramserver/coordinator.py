"""The scheduler's side of checkpoints: the cut across servers, persisting, retention, periodic
checkpoints, and restoring a checkpoint onto the servers of a resumed job.

A checkpoint runs in three phases, each sent to every server at once (tensors never pass through
the scheduler), after every server has sized and touched its snapshot buffers (so no server holds
writes while another is still allocating):

1. PrepareCut: each server closes its write gate and reports the multi-server write operations it
   admitted (:mod:`paramserver.cut`).
2. SnapshotCut: each server gets the union of those operations, admits them, waits until their
   messages are applied and nothing is in flight, copies its tables to memory and reopens.
   Workers' writes were held (refused and retried) only between phases 1 and 2.
3. PersistCut: each server writes its shard files into the checkpoint's temporary directory and
   fsyncs them; then the scheduler writes the manifest and renames the directory into place
   (:mod:`paramserver.checkpoint`).

Any failure aborts the cut (servers reopen), removes the temporary directory and leaves the job
running and the previous checkpoints as they were.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from paramserver import checkpoint as ckpt
from paramserver import initial, rpc
from paramserver.checkpoint import CheckpointError, Manifest
from paramserver.config import Security
from paramserver.cut import op_key
from paramserver.errors import ParamServerError
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc

__all__ = ["CheckpointCoordinator", "checkpoint_reply_to_dict"]

log = logging.getLogger(__name__)

#: Seconds a server keeps its gate closed without hearing from the scheduler before reopening.
_LEASE = 30.0
#: Seconds a server waits for the messages of the cut's operations to arrive.
_DRAIN_TIMEOUT = 20.0


def checkpoint_reply_to_dict(reply: pb.CheckpointReply) -> dict[str, Any]:
    """A CheckpointReply as the dict :meth:`paramserver.Client.checkpoint` returns."""
    return {"version": reply.version, "path": reply.path, "bytes": reply.bytes,
            "step": reply.step, "hold_s": reply.hold_seconds,
            "snapshot_s": reply.snapshot_seconds, "persist_s": reply.persist_seconds,
            "total_s": reply.total_seconds}


class CheckpointCoordinator:
    """Takes checkpoints of a job and restores them. Thread safe; one checkpoint at a time.

    Args:
        root: the job's checkpoint directory (None: checkpoints only into an explicit directory).
        keep: complete checkpoints to keep in ``root`` (0: all).
        num_servers: servers of the job.
        servers: returns ``{rank: address}`` of the live servers.
        tables: returns ``{name: TablePlacement}`` of the ready tables.
        call_timeout: seconds allowed for each call to a server.
        security: the job token and TLS settings of the scheduler's calls to the servers.
    """

    def __init__(self, root: Path | None, keep: int, num_servers: int,
                 servers: Callable[[], dict[int, str]],
                 tables: Callable[[], dict[str, pb.TablePlacement]],
                 call_timeout: float = 600.0, security: Security | None = None) -> None:
        self.root = root
        self._security = security or Security()
        self.keep = keep
        self._num_servers = num_servers
        self._servers = servers
        self._tables = tables
        self._call_timeout = call_timeout
        self._lock = threading.Lock()         # one checkpoint at a time
        self._initial_lock = threading.Lock()  # one save of initial values at a time
        self._state = threading.Lock()        # the fields below
        self._channels: dict[str, grpc.Channel] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(2, num_servers),
                                        thread_name_prefix="ps-ckpt")
        self._cut_base = random.getrandbits(40) << 20
        self._cuts = 0
        self.last_version = max(ckpt.list_versions(root), default=0) if root else 0
        #: The oldest checkpoint version of this job: a restarted server is restored only from
        #: checkpoints this job wrote or resumed from, never from an earlier job's in the same
        #: directory (the scheduler sets it on --resume and --recover).
        self.floor = ckpt.next_version(root) if root else 1
        if root is not None:
            ckpt.prune(root, 0)  # only the temporary directories of interrupted checkpoints
        self.last_time: float | None = None
        self.last_error = ""
        self.completed = 0
        self.restored_version = 0
        self.restore_notes: list[str] = []
        self._cut_stats: tuple[int, dict[int, pb.ServerStats]] = (0, {})
        self.verify_seconds = 0.0
        self.restore_seconds = 0.0
        self.restore_bytes = 0
        self.every = 0.0
        self._last_metadata: dict[str, Any] = {}
        self._periodic_stop = threading.Event()
        self._periodic: threading.Thread | None = None

    # -- server calls --------------------------------------------------------------------------

    def _stub(self, address: str) -> pb_grpc.ParameterServerStub:
        with self._state:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = rpc.make_channel(address, self._security)
        return pb_grpc.ParameterServerStub(channel)

    def on_servers(self, servers: dict[int, str], method: str, requests: dict[int, Any] | Any,
                   what: str, timeout: float) -> dict[int, Any]:
        """Call ``method`` on every server at once (the scheduler's calls to the servers); the first error (naming the server) raises
        after every call has returned."""
        def one(rank: int, address: str) -> Any:
            request = requests[rank] if isinstance(requests, dict) else requests
            return rpc.call(getattr(self._stub(address), method), request, timeout=timeout,
                            what=what, node=f"server-{rank}", address=address)

        futures = {rank: self._pool.submit(one, rank, address) for rank, address in servers.items()}
        results, error = {}, None
        for rank, future in futures.items():
            try:
                results[rank] = future.result()
            except ParamServerError as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    # -- checkpoint ----------------------------------------------------------------------------

    def checkpoint(self, metadata: dict[str, Any] | None, directory: str = "",
                   timeout: float = 600.0) -> pb.CheckpointReply:
        """Take a checkpoint into ``directory`` (default: the job's root); block until durable.
        ``metadata`` None (periodic and final checkpoints) saves the metadata of the latest
        checkpoint that had some, so a job resumed from any checkpoint knows where it was.
        Raises CheckpointError naming what failed; the job keeps running."""
        with self._lock:
            if metadata is None:
                metadata = self._last_metadata
            else:
                self._last_metadata = metadata
            try:
                reply = self._checkpoint(metadata, directory, timeout)
            except Exception as exc:
                with self._state:
                    self.last_error = str(exc)
                log.error("checkpoint failed: %s", exc)
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"checkpoint failed: {exc}") from None
            with self._state:
                self.last_error = ""
                self.last_version = reply.version
                self.last_time = time.monotonic()
                self.completed += 1
            log.info("checkpoint %d complete: %s (%d bytes, hold %.1f ms, total %.2f s)",
                     reply.version, reply.path, reply.bytes, reply.hold_seconds * 1e3,
                     reply.total_seconds)
            return reply

    def _checkpoint(self, metadata: dict[str, Any], directory: str,
                    timeout: float) -> pb.CheckpointReply:
        start = time.monotonic()
        if not directory and self.root is None:
            raise CheckpointError("this job has no checkpoint directory: start the scheduler "
                                  "(or paramserver launch) with --checkpoint-dir DIR")
        root = Path(directory) if directory else self.root
        assert root is not None
        ckpt.check_writable(root)
        servers = self._servers()
        missing = sorted(set(range(self._num_servers)) - set(servers))
        if missing:
            raise CheckpointError(f"cannot checkpoint: servers {missing} are not alive")
        tables = self._tables()
        version = max(ckpt.next_version(root), self.last_version + 1)
        with self._state:
            self._cuts += 1
            cut = self._cut_base + self._cuts
        tmp = ckpt.begin(root, version)
        call_timeout = min(timeout, self._call_timeout)
        try:
            self.on_servers(servers, "PrepareCut", pb.PrepareCutRequest(cut=cut, buffers_only=True),
                         "checkpoint: size the snapshot buffers", call_timeout)
            prepared = self.on_servers(servers, "PrepareCut", pb.PrepareCutRequest(
                cut=cut, lease=max(_LEASE, call_timeout)), "checkpoint: prepare the cut",
                call_timeout)
            ops = {}
            for reply in prepared.values():
                for tag in reply.ops:
                    ops[op_key(tag)] = tag
            snap_start = time.monotonic()
            snapshots = self.on_servers(servers, "SnapshotCut", pb.SnapshotCutRequest(
                cut=cut, ops=list(ops.values()), timeout=min(_DRAIN_TIMEOUT, call_timeout / 2),
                tables=sorted(tables)), "checkpoint: snapshot", call_timeout)
            snapshot_seconds = time.monotonic() - snap_start
            persist_start = time.monotonic()
            persisted = self.on_servers(servers, "PersistCut", pb.PersistCutRequest(
                cut=cut, dir=str(tmp)), "checkpoint: persist", call_timeout)
            files: dict[str, list[pb.ShardFile]] = {}
            for reply in persisted.values():
                for shard in reply.files:
                    files.setdefault(shard.table, []).append(shard)
            manifest = ckpt.commit(root, tmp, version,
                                   step=sum(s.updates for s in snapshots.values()),
                                   metadata=metadata, num_servers=self._num_servers,
                                   tables={name: p.spec for name, p in tables.items()},
                                   files=files)
            persist_seconds = time.monotonic() - persist_start
            with self._state:
                self._cut_stats = (version, {r: s.stats for r, s in snapshots.items()})
        except BaseException:
            self._abort(servers, cut)
            ckpt.abandon(tmp)
            raise
        if not directory or Path(directory) == self.root:
            deleted = ckpt.prune(root, self.keep)
            if deleted:
                log.info("deleted checkpoints %s (keeping %d)", deleted, self.keep)
        return pb.CheckpointReply(
            version=version, path=str(manifest.path), bytes=manifest.bytes,
            hold_seconds=max((s.hold_seconds for s in snapshots.values()), default=0.0),
            snapshot_seconds=snapshot_seconds, persist_seconds=persist_seconds,
            total_seconds=time.monotonic() - start, step=manifest.step)

    def _abort(self, servers: dict[int, str], cut: int) -> None:
        try:
            self.on_servers(servers, "AbortCut", pb.AbortCutRequest(cut=cut),
                         "checkpoint: abort the cut", 5.0)
        except ParamServerError as exc:  # a server that is gone reopens by its lease anyway
            log.warning("aborting checkpoint cut %d: %s", cut, exc)

    # -- periodic ------------------------------------------------------------------------------

    def start_periodic(self, every: float) -> None:
        """Checkpoint every ``every`` seconds (skipped while there are no tables or a server is
        down; a failure is logged and shown in status, and the next period tries again)."""
        self.every = every
        self._periodic = threading.Thread(target=self._run_periodic, name="ps-ckpt-periodic",
                                          daemon=True)
        self._periodic.start()

    def _run_periodic(self) -> None:
        while not self._periodic_stop.wait(self.every):
            if not self._tables():
                continue
            try:
                self.checkpoint(None)
            except ParamServerError:
                pass  # logged and in status; try again next period

    # -- restore -------------------------------------------------------------------------------

    def restore(self, manifest: Manifest, placements: dict[str, pb.TablePlacement],
                servers: dict[int, str]) -> None:
        """Load ``manifest``'s tables onto ``servers`` with the given placements (each server
        reads the shard files itself); CheckpointError naming the server and table if any
        fails."""
        files = [f for name in placements for f in manifest.files.get(name, [])]
        requests = {rank: pb.RestoreRequest(dir=str(manifest.path),
                                            tables=list(placements.values()), files=files,
                                            rank=rank, num_servers=self._num_servers,
                                            version=manifest.version,
                                            written_by=manifest.num_servers)
                    for rank in servers}
        start = time.monotonic()
        replies = self.on_servers(servers, "Restore", requests,
                               f"restore checkpoint {manifest.version}", self._call_timeout)
        with self._state:
            self.restore_seconds = time.monotonic() - start
            self.restore_bytes = sum(r.bytes for r in replies.values())

    def cut_stats(self, version: int, rank: int) -> pb.ServerStats | None:
        """Server ``rank``'s update counters at checkpoint ``version``'s cut, if this scheduler
        took that checkpoint and it is the latest it took."""
        with self._state:
            taken, stats = self._cut_stats
            return stats.get(rank) if taken == version else None

    def restore_server(self, rank: int, address: str, manifest: Manifest | None,
                       placements: dict[str, pb.TablePlacement], lost: list[str],
                       at_cut: pb.ServerStats | None,
                       fresh: dict[str, pb.TablePlacement] | None = None,
                       initial_values: dict[str, Manifest] | None = None) -> None:
        """Load one restarted server's shards (``placements``) from ``manifest``, recreate the
        ``fresh`` ones from their initializers (from ``initial_values``, the saved entries of
        the dense tables given initial values), and tell it which tables are ``lost``; the
        server serves again when this returns."""
        fresh, initial_values = fresh or {}, initial_values or {}
        sources = ([(manifest, name) for name in placements] if manifest else []) + \
            [(entry, name) for name, entry in initial_values.items()]
        # Every file is named relative to the checkpoint directory (checkpoints and initial
        # values are both under it), so one request carries both.
        base = self.root or (manifest.path.parent if manifest else Path("."))
        files = []
        for source, name in sources:
            for shard in source.files.get(name, []):
                entry = pb.ShardFile()
                entry.CopyFrom(shard)
                entry.file = str(source.file_path(shard).relative_to(base))
                files.append(entry)
        request = pb.RestoreRequest(
            dir=str(base), tables=list(placements.values()) + list(fresh.values()),
            files=files, lost=lost, fresh=sorted(fresh),
            version=manifest.version if manifest else 0, rank=rank,
            num_servers=self._num_servers, written_by=manifest.num_servers if manifest else 0)
        if at_cut is not None:
            request.at_cut.CopyFrom(at_cut)
        what = f"restore server-{rank}" + (f" from checkpoint {manifest.version}" if manifest
                                           else "")
        self.on_servers({rank: address}, "Restore", request, what, self._call_timeout)

    # -- initial values ------------------------------------------------------------------------

    def save_initial(self, placement: pb.TablePlacement, given: bool) -> Manifest | None:
        """A table is about to become ready. If a worker ``given`` it initial values, have the
        servers holding its blocks write them into the checkpoint directory's initial values
        (:mod:`paramserver.initial`), so a server that loses them can recreate them; otherwise
        forget any saved for that name. Nothing without a checkpoint directory. Blocks until
        durable; CheckpointError naming the server or file if it fails."""
        if self.root is None:
            return None
        name = placement.spec.name
        with self._initial_lock:
            if not given:
                initial.forget(self.root, name)
                return None
            store = initial.store(self.root)
            ckpt.check_writable(store)
            number = initial.next_entry(self.root)
            live = self._servers()
            holders = sorted(set(placement.block_servers))
            down = [r for r in holders if r not in live]
            if down:
                raise CheckpointError(f"cannot save the initial values of table {name!r}: "
                                      f"servers {down} are not alive")
            tmp = ckpt.begin(store, number)
            try:
                replies = self.on_servers(
                    {r: live[r] for r in holders}, "PersistCut",
                    pb.PersistCutRequest(cut=0, dir=str(tmp), tables=[name]),
                    f"save the initial values of table {name!r}", self._call_timeout)
                files = [f for reply in replies.values() for f in reply.files]
                manifest = ckpt.commit(store, tmp, 0, step=0, metadata={},
                                       num_servers=self._num_servers,
                                       tables={name: placement.spec}, files={name: files},
                                       final=store / initial.entry_name(number))
            except BaseException as exc:
                ckpt.abandon(tmp)
                if isinstance(exc, ParamServerError) and not isinstance(exc, CheckpointError):
                    # A server that cannot be reached: the declaration fails all the same.
                    raise CheckpointError(f"cannot save the initial values of table {name!r}: "
                                          f"{exc}") from None
                raise
            initial.forget(self.root, name, keep=manifest.path)
        log.info("saved the initial values of table %r (%s)", name, manifest.path)
        return manifest

    def status(self) -> pb.CheckpointStatus:
        """What status shows of checkpoints."""
        with self._state:
            return pb.CheckpointStatus(
                dir=str(self.root or ""), last_version=self.last_version,
                last_age=-1.0 if self.last_time is None else time.monotonic() - self.last_time,
                last_error=self.last_error, restored_version=self.restored_version,
                restore_notes=list(self.restore_notes), every=self.every,
                checkpoints=self.completed, verify_seconds=self.verify_seconds,
                restore_seconds=self.restore_seconds, restore_bytes=self.restore_bytes)

    def close(self) -> None:
        """Stop periodic checkpoints and close server channels (waits for one in progress)."""
        self._periodic_stop.set()
        if self._periodic is not None:
            self._periodic.join(timeout=self._call_timeout)
        self._pool.shutdown(wait=True)
        with self._state:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
