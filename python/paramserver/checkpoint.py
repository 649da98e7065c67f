"""Checkpoint directories: layout, manifest, verification, versions and retention.

A checkpoint directory (``--checkpoint-dir``) holds one sub-directory per complete checkpoint::

    DIR/ckpt-0000000007/MANIFEST.json
    DIR/ckpt-0000000007/<table>-<hash>.s<rank>.safetensors   one file per table and server

A shard file stores a table by global block id (dense) or by row id (embedding), never by server
position, so a checkpoint restores onto any number of servers. Dense shards hold ``blocks`` (int64
ids, ascending), ``steps`` (int64), ``values`` (float32, the blocks concatenated) and ``slots``
(float32, ``(num_slots, len(values))``); embedding shards hold ``ids`` (uint64), ``steps``,
``values`` ``(n, dim)`` and ``slots`` ``(n, num_slots, dim)``. The files are safetensors.

Atomicity: a checkpoint is written under a temporary name (``DIR/.ckpt-0000000007.tmp-*``), every
file is fsynced, the manifest (version, time, step, metadata, table specs, and every file's size
and CRC-32) is written last, then the directory is renamed into place and ``DIR`` is fsynced. A kill
at any instant leaves either no ``ckpt-`` directory for that version or a complete one; leftover
temporary directories are removed by the next writer. Old checkpoints beyond ``keep`` are deleted
only after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from paramserver.errors import CheckpointError
from paramserver.shardfile import ShardFileError, file_crc32, read_tensors
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["CheckpointError", "Manifest", "FORMAT", "FORMAT_VERSION", "MANIFEST",
           "checkpoint_dir_name", "shard_file_name", "list_versions", "read_manifest", "verify",
           "latest", "open_checkpoint", "begin", "commit", "abandon", "prune", "next_version",
           "check_writable", "read_shard"]

FORMAT = "paramserver-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^ckpt-(\d{10})$")
_TMP = re.compile(r"^\.ckpt-(\d{10})\.tmp-")


@dataclass
class Manifest:
    """A complete checkpoint's manifest.

    Attributes:
        path: the checkpoint's directory.
        version: its model version (grows with every checkpoint of a directory).
        time: when it was taken (seconds since the epoch).
        step: updates (dense blocks and embedding rows stepped) applied in the job at the cut.
        metadata: the user's metadata (a JSON object).
        num_servers: servers of the job that wrote it.
        tables: ``{name: spec}``.
        files: ``{name: [pb.ShardFile, ...]}``.
    """

    path: Path
    version: int
    time: float
    step: int
    metadata: dict[str, Any]
    num_servers: int
    tables: dict[str, pb.TableSpec] = field(default_factory=dict)
    files: dict[str, list[pb.ShardFile]] = field(default_factory=dict)

    def file_path(self, shard: pb.ShardFile) -> Path:
        """Where a shard file of this checkpoint is."""
        return self.path / shard.file

    @property
    def bytes(self) -> int:
        """Bytes of every shard file."""
        return sum(f.bytes for files in self.files.values() for f in files)


def checkpoint_dir_name(version: int) -> str:
    """``ckpt-0000000007``: the directory name of a complete checkpoint."""
    return f"ckpt-{version:010d}"


def shard_file_name(table: str, rank: int) -> str:
    """The file one server writes for one table: a readable, file-system-safe form of the name
    plus a hash of the exact name (two names never share a file)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", table)[:64].lstrip(".") or "table"
    return f"{safe}-{zlib.crc32(table.encode()):08x}.s{rank}.safetensors"


def read_shard(path: str | Path, table: str, names: tuple[str, ...]) -> dict:
    """The tensors of one shard file of ``table`` (arrays viewing the mapped file); CheckpointError
    naming the table and file if it cannot be read or lacks one of ``names``."""
    try:
        tensors, _ = read_tensors(path)
    except ShardFileError as exc:
        raise CheckpointError(f"table {table!r}: {exc}") from None
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"table {table!r}: shard file {path} lacks tensors {missing}")
    return tensors


def check_writable(root: str | Path) -> Path:
    """Create ``root`` if needed and prove it writable (create, fsync and delete a file); raise
    CheckpointError naming the directory and the reason otherwise."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {root} is not writable: "
                              f"{exc.strerror or exc}") from None
    return root


def list_versions(root: str | Path) -> list[int]:
    """Versions of the checkpoint directories in ``root`` that have a manifest, ascending (not
    verified: see :func:`latest`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _NAME.match(entry.name)
        if m and (entry / MANIFEST).is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def next_version(root: str | Path) -> int:
    """One more than any version in ``root``, complete or not, so versions only grow."""
    root = Path(root)
    seen = [0]
    if root.is_dir():
        for entry in root.iterdir():
            m = _NAME.match(entry.name) or _TMP.match(entry.name)
            if m:
                seen.append(int(m.group(1)))
    return max(seen) + 1


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest of the checkpoint directory ``path``; CheckpointError if it
    is missing, malformed, or not a paramserver checkpoint."""
    path = Path(path)
    file = path / MANIFEST
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read the manifest ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a paramserver checkpoint manifest (its format is "
                              f"{raw.get('format') if isinstance(raw, dict) else type(raw).__name__!r}"
                              f", expected {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {raw.get('format_version')!r} is not "
                              f"supported (this paramserver reads {FORMAT_VERSION})")
    try:
        manifest = Manifest(path=path, version=int(raw["version"]), time=float(raw["time"]),
                            step=int(raw["step"]), metadata=dict(raw["metadata"]),
                            num_servers=int(raw["num_servers"]))
        for entry in raw["tables"]:
            spec = json_format.ParseDict(entry["spec"], pb.TableSpec())
            manifest.tables[spec.name] = spec
            manifest.files[spec.name] = [json_format.ParseDict(f, pb.ShardFile())
                                         for f in entry["files"]]
    except (KeyError, TypeError, ValueError, json_format.ParseError) as exc:
        raise CheckpointError(f"{file}: malformed manifest ({exc!r})") from None
    return manifest


def verify(manifest: Manifest) -> None:
    """Check every shard file's size and CRC-32 against the manifest; CheckpointError naming the
    first file that is missing, truncated or corrupt."""
    for name, files in manifest.files.items():
        for shard in files:
            path = manifest.file_path(shard)
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise CheckpointError(f"checkpoint {manifest.version}: file {path} of table "
                                      f"{name!r} is missing ({exc.strerror})") from None
            if size != shard.bytes:
                raise CheckpointError(f"checkpoint {manifest.version}: file {path} of table "
                                      f"{name!r} has {size} bytes, the manifest says "
                                      f"{shard.bytes} (truncated or replaced)")
            crc = file_crc32(path)
            if crc != shard.crc32:
                raise CheckpointError(f"checkpoint {manifest.version}: file {path} of table "
                                      f"{name!r} is corrupt (CRC-32 {crc:08x}, the manifest says "
                                      f"{shard.crc32:08x})")


def latest(root: str | Path) -> tuple[Manifest | None, list[str]]:
    """The newest checkpoint in ``root`` that reads and verifies, and a note for each newer one
    that was skipped and why. ``(None, notes)`` when there is none."""
    notes: list[str] = []
    for version in reversed(list_versions(root)):
        path = Path(root) / checkpoint_dir_name(version)
        try:
            manifest = read_manifest(path)
            verify(manifest)
            return manifest, notes
        except (CheckpointError, ShardFileError) as exc:
            notes.append(f"skipped checkpoint {version}: {exc}")
    return None, notes


def open_checkpoint(path: str | Path, version: int | None = None) -> Manifest:
    """The checkpoint at ``path`` (a checkpoint's own directory, or a checkpoint directory and
    then its newest complete checkpoint, or ``version``), verified. CheckpointError if there is
    none, the version does not exist, or a file is corrupt."""
    path = Path(path)
    if (path / MANIFEST).is_file() and version is None:
        manifest = read_manifest(path)
        verify(manifest)
        return manifest
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a directory")
    versions = list_versions(path)
    if version is not None:
        if version not in versions:
            raise CheckpointError(f"checkpoint version {version} does not exist in {path} "
                                  f"(versions there: {versions or 'none'})")
        manifest = read_manifest(path / checkpoint_dir_name(version))
        verify(manifest)
        return manifest
    if not versions:
        raise CheckpointError(f"{path} holds no checkpoint (no ckpt-*/{MANIFEST})")
    manifest, notes = latest(path)
    if manifest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint: " + "; ".join(notes))
    return manifest


def begin(root: str | Path, version: int) -> Path:
    """Create the temporary directory a checkpoint of ``version`` is written into."""
    tmp = Path(root) / f".ckpt-{version:010d}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {tmp}: {exc.strerror or exc}") from None
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(root: str | Path, tmp: Path, version: int, step: int, metadata: dict[str, Any],
           num_servers: int, tables: dict[str, pb.TableSpec],
           files: dict[str, list[pb.ShardFile]]) -> Manifest:
    """Write the manifest into ``tmp`` (temporary name, fsync, rename), fsync the directory,
    rename it to its final name and fsync ``root``. Returns the complete checkpoint's manifest.
    Raises CheckpointError (naming the file) if the disk refuses; ``tmp`` is then left for
    :func:`abandon`."""
    root = Path(root)
    now = time.time()
    body = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "version": version, "time": now,
        "step": step, "metadata": metadata, "num_servers": num_servers,
        "tables": [{"spec": json_format.MessageToDict(tables[name],
                                                       preserving_proto_field_name=True),
                    "files": [json_format.MessageToDict(f, preserving_proto_field_name=True,
                                                        always_print_fields_with_no_presence=True)
                              for f in files.get(name, [])]}
                   for name in sorted(tables)],
    }
    final = root / checkpoint_dir_name(version)
    target = tmp / MANIFEST
    try:
        part = tmp / (MANIFEST + ".tmp")
        with open(part, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        part.replace(target)
        _fsync_dir(tmp)
        tmp.rename(final)
        _fsync_dir(root)
    except OSError as exc:
        raise CheckpointError(f"writing {target}: {exc.strerror or exc}") from None
    manifest = Manifest(path=final, version=version, time=now, step=step, metadata=metadata,
                        num_servers=num_servers, tables=dict(tables),
                        files={k: list(v) for k, v in files.items()})
    return manifest


def abandon(tmp: Path) -> None:
    """Remove a checkpoint's temporary directory after a failure (best effort)."""
    shutil.rmtree(tmp, ignore_errors=True)


def prune(root: str | Path, keep: int) -> list[int]:
    """Delete the oldest complete checkpoints beyond the newest ``keep`` (0: keep all) and any
    temporary directory left by an interrupted writer. Returns the versions deleted."""
    root = Path(root)
    if not root.is_dir():
        return []
    for entry in root.iterdir():
        if _TMP.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    if keep <= 0:
        return []
    versions = list_versions(root)
    doomed = versions[:-keep] if len(versions) > keep else []
    for version in doomed:
        shutil.rmtree(root / checkpoint_dir_name(version), ignore_errors=True)
    return doomed
