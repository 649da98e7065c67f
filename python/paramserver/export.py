"""Model export for serving: a checkpoint (or a running job's consistent cut) as one safetensors
file that numpy, torch and other languages read without paramserver.

Layout of an exported file:

- a dense table ``NAME`` is the tensor ``NAME`` in its declared shape (float32);
- an embedding table ``NAME`` is ``NAME.ids`` (uint64, sorted ascending) and ``NAME.rows``
  (float32, ``(len(ids), dim)``), row ``i`` belonging to ``ids[i]``;
- with optimizer state, each optimizer slot is added as ``NAME.<slot>`` (dense, in the table's
  shape) or ``NAME.<slot>`` ``(len(ids), dim)`` (embedding), named as torch names them
  (``momentum_buffer``, ``sum``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), plus
  ``NAME.steps`` (int64: per block for dense tables, per row for embeddings);
- the metadata (``__metadata__``) holds ``format`` ("paramserver-model"), ``version``, ``step``,
  ``time`` and ``tables`` (a JSON list of the table specs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from paramserver import checkpoint as ckpt
from paramserver.config import Security
from paramserver.errors import CheckpointError, InvalidRequestError
from paramserver.partition import BlockLayout
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import optimizer_from_spec, spec_to_dict

__all__ = ["export_checkpoint", "export_from_job", "load_model", "load_model_info",
           "EmbeddingLookup", "slot_names"]

MODEL_FORMAT = "paramserver-model"


def slot_names(spec: pb.TableSpec) -> list[str]:
    """torch's names of the optimizer state a table keeps, in the core's slot order."""
    opt = optimizer_from_spec(spec.optimizer)
    kind = spec.optimizer.kind
    if kind == pb.OptimizerSpec.SGD:
        return ["momentum_buffer"] if spec.optimizer.momentum != 0 else []
    if kind == pb.OptimizerSpec.ADAGRAD:
        return ["sum"]
    names = ["exp_avg", "exp_avg_sq"]
    return names + ["max_exp_avg_sq"] if getattr(opt, "amsgrad", False) else names


def _read(manifest: ckpt.Manifest, shard: pb.ShardFile, names: tuple[str, ...]
          ) -> dict[str, np.ndarray]:
    return ckpt.read_shard(manifest.file_path(shard), shard.table, names)


def _dense(manifest: ckpt.Manifest, spec: pb.TableSpec, state: bool) -> dict[str, np.ndarray]:
    size = int(np.prod(spec.shape))
    layout = BlockLayout(size, spec.block_size, (0,) * -(-size // spec.block_size))
    names = slot_names(spec) if state else []
    values = np.empty(size, np.float32)
    slots = [np.empty(size, np.float32) for _ in names]
    steps = np.zeros(len(layout.block_servers), np.int64)
    seen = np.zeros(len(layout.block_servers), bool)
    for shard in manifest.files.get(spec.name, []):
        t = _read(manifest, shard, ("blocks", "steps", "values", "slots"))
        ckpt.check_shard(shard, t, manifest.file_path(shard), manifest.num_servers)
        offset = 0
        for i, block in enumerate(t["blocks"].tolist()):
            start, stop = layout.block_range(block)
            length = stop - start
            values[start:stop] = t["values"][offset:offset + length]
            for k in range(len(names)):
                slots[k][start:stop] = t["slots"][k, offset:offset + length]
            steps[block] = t["steps"][i]
            seen[block] = True
            offset += length
    if not seen.all():
        raise CheckpointError(f"table {spec.name!r}: checkpoint {manifest.version} lacks blocks "
                              f"{np.flatnonzero(~seen)[:10].tolist()}")
    shape = tuple(spec.shape)
    out = {spec.name: values.reshape(shape)}
    if state:
        out.update({f"{spec.name}.{n}": s.reshape(shape) for n, s in zip(names, slots)})
        out[f"{spec.name}.steps"] = steps
    return out


def _embedding(manifest: ckpt.Manifest, spec: pb.TableSpec, state: bool
               ) -> dict[str, np.ndarray]:
    parts = []
    for shard in manifest.files.get(spec.name, []):
        parts.append(_read(manifest, shard, ("ids", "steps", "values", "slots")))
        ckpt.check_shard(shard, parts[-1], manifest.file_path(shard), manifest.num_servers)
    ids = np.concatenate([p["ids"] for p in parts]) if parts else np.empty(0, np.uint64)
    order = np.argsort(ids, kind="stable")
    out = {f"{spec.name}.ids": ids[order],
           f"{spec.name}.rows": (np.concatenate([p["values"] for p in parts]) if parts
                                 else np.empty((0, spec.dim), np.float32))[order]}
    if state:
        names = slot_names(spec)
        if parts:
            slots = np.concatenate([p["slots"] for p in parts])[order]
            for k, name in enumerate(names):
                out[f"{spec.name}.{name}"] = np.ascontiguousarray(slots[:, k])
            out[f"{spec.name}.steps"] = np.concatenate([p["steps"] for p in parts])[order]
        else:
            for name in names:
                out[f"{spec.name}.{name}"] = np.empty((0, spec.dim), np.float32)
            out[f"{spec.name}.steps"] = np.empty(0, np.int64)
    return out


def export_checkpoint(manifest: ckpt.Manifest, out: str | Path,
                      with_optimizer_state: bool = False) -> dict[str, Any]:
    """Write ``manifest``'s tables to ``out`` as safetensors (atomically: temporary name, fsync,
    rename). The checkpoint must cover every table whole (checked first, as a restore does) and
    each file must hold what its manifest entry says. Returns ``{"path", "bytes", "version",
    "step", "tables"}``. CheckpointError names a file or table that cannot be read."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    ckpt.check_coverage(manifest)
    tensors: dict[str, np.ndarray] = {}
    for name, spec in sorted(manifest.tables.items()):
        part = (_dense if spec.kind == pb.TableSpec.DENSE else _embedding)(
            manifest, spec, with_optimizer_state)
        clash = set(part) & set(tensors)
        if clash:
            raise CheckpointError(f"table {name!r}: tensor names {sorted(clash)} are taken by "
                                  f"another table; rename one of them to export")
        tensors.update(part)
    metadata = {"format": MODEL_FORMAT, "version": str(manifest.version),
                "step": str(manifest.step), "time": repr(manifest.time),
                "tables": json.dumps([spec_to_dict(s) for _, s in sorted(manifest.tables.items())]),
                "metadata": json.dumps(manifest.metadata),
                "optimizer_state": str(with_optimizer_state).lower()}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(out)
    except (OSError, SafetensorError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"writing {out}: {getattr(exc, 'strerror', None) or exc}") from None
    return {"path": str(out), "bytes": out.stat().st_size, "version": manifest.version,
            "step": manifest.step, "tables": sorted(manifest.tables)}


def export_from_job(client_or_scheduler: Any, out: str | Path,
                    with_optimizer_state: bool = False, timeout: float = 600.0,
                    security: Security | None = None) -> dict[str, Any]:
    """Export a running job as a consistent cut: take a checkpoint (in the job's checkpoint
    directory, or, if it has none, a temporary one beside ``out``, removed afterwards) and
    export it. ``client_or_scheduler`` is a ``host:port`` (called with ``security``: the job
    token and TLS) or a :class:`paramserver.Client`."""
    from paramserver.coordinator import checkpoint_reply_to_dict
    from paramserver.status import call_scheduler, fetch_status

    if isinstance(client_or_scheduler, str):
        address = client_or_scheduler
        status = fetch_status(address, timeout=timeout, security=security)

        def call(method: str, request: Any, *, timeout: float, what: str) -> Any:
            return call_scheduler(address, method, request, timeout=timeout, what=what,
                                  security=security)
    else:
        status = client_or_scheduler.status()
        call = client_or_scheduler._membership.call
    has_dir = bool(status.get("checkpoint", {}).get("dir"))
    tmp = None if has_dir else tempfile.mkdtemp(prefix=".paramserver-export-",
                                                dir=Path(out).resolve().parent)
    try:
        reply = call("Checkpoint", pb.CheckpointRequest(
            dir=tmp or "", timeout=timeout),
            timeout=timeout + 5.0, what="checkpoint for export")
        info = checkpoint_reply_to_dict(reply)
        manifest = ckpt.open_checkpoint(info["path"])
        return export_checkpoint(manifest, out, with_optimizer_state)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(path: str | Path) -> dict[str, np.ndarray]:
    """Read an exported model: ``{tensor name: array}`` (see the module doc for the names).
    Needs only numpy and safetensors. InvalidRequestError if the file is not a safetensors
    file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InvalidRequestError(f"{path} is not a readable model file: {exc}") from None


def load_model_info(path: str | Path) -> dict[str, Any]:
    """An exported model's metadata: version, step, time, tables (specs), user metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise InvalidRequestError(f"{path} is not a readable model file: {exc}") from None
    if raw.get("format") != MODEL_FORMAT:
        raise InvalidRequestError(f"{path} is not a paramserver model export (format "
                                  f"{raw.get('format')!r})")
    return {"version": int(raw["version"]), "step": int(raw["step"]), "time": float(raw["time"]),
            "tables": json.loads(raw["tables"]), "metadata": json.loads(raw.get("metadata", "{}")),
            "optimizer_state": raw.get("optimizer_state") == "true"}


class EmbeddingLookup:
    """Rows of an exported embedding table by id, for serving.

    ``EmbeddingLookup(model, "user")`` takes the arrays of :func:`load_model` (``user.ids`` and
    ``user.rows``). :meth:`__call__` maps ids of any shape to rows ``(*ids.shape, dim)``; an id
    the model has never seen gets ``default`` (zeros unless given) and is reported by
    :meth:`found`. Thread safe (read only).
    """

    def __init__(self, model: Mapping[str, np.ndarray], name: str,
                 default: np.ndarray | None = None) -> None:
        try:
            self.ids = np.asarray(model[f"{name}.ids"], dtype=np.uint64)
            self.rows = np.asarray(model[f"{name}.rows"], dtype=np.float32)
        except KeyError:
            tables = sorted({k.rsplit(".", 1)[0] for k in model if k.endswith(".ids")})
            raise InvalidRequestError(f"no embedding table {name!r} in the model (embedding "
                                      f"tables: {tables})") from None
        if self.rows.ndim != 2 or len(self.rows) != len(self.ids):
            raise InvalidRequestError(f"{name}.rows has shape {self.rows.shape}, expected "
                                      f"({len(self.ids)}, dim)")
        if len(self.ids) > 1 and not (self.ids[1:] > self.ids[:-1]).all():
            raise InvalidRequestError(f"{name}.ids is not sorted ascending and unique")
        self.dim = self.rows.shape[1]
        self.default = (np.zeros(self.dim, np.float32) if default is None
                        else np.asarray(default, np.float32).reshape(self.dim))

    def _positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = np.ascontiguousarray(ids).reshape(-1)
        if flat.dtype not in (np.int64, np.uint64):
            raise InvalidRequestError(f"ids must be int64 or uint64, got {flat.dtype}")
        flat = flat.view(np.uint64)
        pos = np.searchsorted(self.ids, flat)
        pos = np.minimum(pos, max(len(self.ids) - 1, 0))
        hit = (self.ids[pos] == flat) if len(self.ids) else np.zeros(flat.shape, bool)
        return pos, hit

    def found(self, ids: np.ndarray) -> np.ndarray:
        """Boolean array of ``ids``' shape: which ids have a row in the model."""
        return self._positions(ids)[1].reshape(np.shape(ids))

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        pos, hit = self._positions(ids)
        out = np.empty((pos.size, self.dim), np.float32)
        if len(self.ids):
            out[:] = self.rows[pos]
        out[~hit] = self.default
        return out.reshape(tuple(np.shape(ids)) + (self.dim,))
