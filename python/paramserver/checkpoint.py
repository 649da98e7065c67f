"""Checkpoint directories: layout, manifest, verification, versions and retention.

A checkpoint directory (``--checkpoint-dir``) holds one sub-directory per complete checkpoint::

    DIR/ckpt-0000000007/MANIFEST.json
    DIR/ckpt-0000000007/<table>-<index>.s<rank>.safetensors   one file per table and server

A shard file stores a table by global block id (dense) or by row id (embedding), never by server
position, so a checkpoint restores onto any number of servers. Dense shards hold ``blocks`` (int64
ids, ascending), ``steps`` (int64), ``values`` (float32, the blocks concatenated) and ``slots``
(float32, ``(num_slots, len(values))``); embedding shards hold ``ids`` (uint64), ``steps``,
``values`` ``(n, dim)`` and ``slots`` ``(n, num_slots, dim)``. The files are safetensors.

File names are unique by construction: ``<index>`` is the table's position in the checkpoint's
sorted table list (the same on every server), ``<rank>`` the writing server's; the readable part
is the sanitized name cut to 64 characters. Readers never rebuild a name: they open the files the
manifest lists, so checkpoints written with the earlier ``<table>-<crc32>`` names read as before.

Coverage: every shard file's manifest entry says what the file holds (a dense file's blocks, as
runs; an embedding file holds the id-hash partition of the server that wrote it).
:func:`check_coverage` proves that every block of every dense table is in exactly one file and
every partition of every embedding table in exactly one; :func:`commit` refuses a checkpoint that
fails it, and every reader (:func:`verify`, so resume, restore and export) checks it again, and
checks each file's contents against its entry (:func:`check_shard`) as it reads it.

Atomicity: a checkpoint is written under a temporary name (``DIR/.ckpt-0000000007.tmp-*``), every
file is fsynced, the manifest (version, time, step, metadata, table specs, every file's size,
CRC-32 and coverage, and a SHA-256 of all that) is written last, then the directory is renamed
into place and ``DIR`` is fsynced. A kill at any instant leaves either no ``ckpt-`` directory for
that version or a complete one; leftover temporary directories are removed by the next writer. Old
checkpoints beyond ``keep`` are deleted only after a newer one is complete. A manifest whose
checksum does not match (edited or corrupt) is refused naming the file; a ``ckpt-`` directory
without a manifest is skipped with a note (:func:`latest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from paramserver.errors import CheckpointError
from paramserver.partition import server_of_ids
from paramserver.shardfile import ShardFileError, file_crc32, read_tensors
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["CheckpointError", "Manifest", "FORMAT", "FORMAT_VERSION", "MANIFEST",
           "checkpoint_dir_name", "shard_file_name", "list_versions", "read_manifest", "verify",
           "latest", "open_checkpoint", "begin", "commit", "abandon", "prune", "next_version",
           "check_writable", "read_shard", "block_runs", "run_blocks", "check_coverage",
           "check_shard", "num_blocks_of"]

FORMAT = "paramserver-checkpoint"
#: 2: manifests carry a checksum and each file's coverage. 1 (read still): neither; the
#: coverage of a version-1 checkpoint is read from its shard files.
FORMAT_VERSION = 2
_READABLE = (1, 2)
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


def shard_file_name(table: str, index: int, rank: int) -> str:
    """The file server ``rank`` writes for table ``table``, the ``index``-th table of the
    checkpoint: a readable, file-system-safe form of the name, then the index and the rank. Two
    tables of a checkpoint never share a file: their indexes differ, and the index is the last
    ``-`` field of the name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", table)[:64].lstrip(".") or "table"
    return f"{safe}-{index:04d}.s{rank}.safetensors"


def num_blocks_of(spec: pb.TableSpec) -> int:
    """Blocks of a dense table."""
    size = 1
    for d in spec.shape:
        size *= int(d)
    return -(-size // spec.block_size)


def block_runs(blocks: np.ndarray) -> list[int]:
    """Ascending block ids as runs ``(first, stop, step)``, flattened: the coverage a dense shard
    file's manifest entry records (a server's blocks are dealt round the servers, so they are
    usually one or a few arithmetic runs)."""
    b = np.asarray(blocks, dtype=np.int64)
    if len(b) == 0:
        return []
    if len(b) == 1:
        return [int(b[0]), int(b[0]) + 1, 1]
    d = np.diff(b)
    if (d == d[0]).all() and d[0] > 0:
        return [int(b[0]), int(b[-1] + d[0]), int(d[0])]
    out: list[int] = []
    values = b.tolist()
    i = 0
    while i < len(values):
        first = values[i]
        if i + 1 == len(values):
            out += [first, first + 1, 1]
            break
        step = values[i + 1] - first
        j = i + 1
        while j + 1 < len(values) and values[j + 1] - values[j] == step:
            j += 1
        out += [first, values[j] + step, step]
        i = j + 1
    return out


def run_blocks(runs: Any) -> np.ndarray:
    """The block ids of flattened runs (:func:`block_runs`), ascending as written."""
    runs = list(runs)
    if len(runs) % 3:
        raise ValueError(f"{len(runs)} numbers are not (first, stop, step) runs")
    parts = []
    for k in range(0, len(runs), 3):
        first, stop, step = int(runs[k]), int(runs[k + 1]), int(runs[k + 2])
        if step <= 0 or first < 0 or stop <= first:
            raise ValueError(f"run ({first}, {stop}, {step}) is not a run of block ids")
        parts.append(np.arange(first, stop, step, dtype=np.int64))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _few(values: Any, limit: int = 10) -> str:
    values = list(values)
    return f"{values[:limit]}{' ...' if len(values) > limit else ''}"


def check_coverage(manifest: Manifest) -> None:
    """Prove that ``manifest`` holds every table whole: each block of each dense table in exactly
    one shard file, each id-hash partition (one per server of the job that wrote it) of each
    embedding table in exactly one, no file listed twice, and a file only for a listed table.
    CheckpointError naming the checkpoint, the table, and the blocks or partitions missing or
    doubled. Called before a checkpoint is committed and by every reader (:func:`verify`)."""
    where = f"checkpoint {manifest.version} ({manifest.path})"
    names: dict[str, str] = {}
    for table, files in manifest.files.items():
        if table not in manifest.tables:
            raise CheckpointError(f"{where}: shard files of table {table!r}, which the "
                                  f"checkpoint does not list")
        for shard in files:
            if shard.file in names:
                raise CheckpointError(f"{where}: tables {names[shard.file]!r} and {table!r} "
                                      f"both name the file {shard.file}")
            names[shard.file] = table
    for table, spec in sorted(manifest.tables.items()):
        files = manifest.files.get(table, [])
        if spec.kind == pb.TableSpec.DENSE:
            total = num_blocks_of(spec)
            counts = np.zeros(total, np.int32)
            for shard in files:
                try:
                    blocks = run_blocks(shard.block_runs)
                except ValueError as exc:
                    raise CheckpointError(f"{where}: table {table!r}: file {shard.file}: "
                                          f"{exc}") from None
                if len(blocks) and (blocks.min() < 0 or blocks.max() >= total):
                    raise CheckpointError(f"{where}: table {table!r}: file {shard.file} lists "
                                          f"blocks outside the table's {total}")
                np.add.at(counts, blocks, 1)
            missing, doubled = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
            if len(missing):
                raise CheckpointError(f"{where} does not cover table {table!r}: no file holds "
                                      f"blocks {_few(missing.tolist())} of its {total}")
            if len(doubled):
                raise CheckpointError(f"{where}: table {table!r}: blocks "
                                      f"{_few(doubled.tolist())} are in more than one file")
        else:
            held = sorted(shard.server for shard in files)
            want = list(range(manifest.num_servers))
            if held != want:
                absent = sorted(set(want) - set(held))
                extra = sorted({s for s in held if held.count(s) > 1} | (set(held) - set(want)))
                raise CheckpointError(
                    f"{where} does not cover embedding table {table!r}: it was written by "
                    f"{manifest.num_servers} servers; the rows of servers {absent} are in no "
                    f"file" if absent else
                    f"{where}: embedding table {table!r}: servers {extra} have more than one "
                    f"file, or are not servers of the job that wrote it")


def check_shard(shard: pb.ShardFile, tensors: dict, path: Path, written_by: int) -> None:
    """Check that a shard file read for a restore holds what its manifest entry says: a dense
    file exactly the blocks of ``shard.block_runs``; an embedding file only rows of its
    server's id-hash partition among ``written_by`` servers. CheckpointError naming the file."""
    if "blocks" in tensors:
        expected = run_blocks(shard.block_runs)
        blocks = tensors["blocks"]
        if not np.array_equal(blocks, expected):
            raise CheckpointError(f"table {shard.table!r}: shard file {path} holds blocks "
                                  f"{_few(blocks.tolist())}; the manifest says "
                                  f"{_few(expected.tolist())}")
    elif written_by > 1 and len(tensors["ids"]):
        wrong = np.flatnonzero(server_of_ids(tensors["ids"], written_by) != shard.server)
        if len(wrong):
            raise CheckpointError(f"table {shard.table!r}: shard file {path} holds id "
                                  f"{int(tensors['ids'][wrong[0]])}, which is not in the rows of "
                                  f"server-{shard.server} of {written_by} it should hold")


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


def _checksum(body: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content (every key but ``checksum``), as canonical JSON."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True,
                           separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest of the checkpoint directory ``path``; CheckpointError if it
    is missing, malformed, not a paramserver checkpoint, or its checksum does not match its
    contents (edited or corrupt)."""
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
    if raw.get("format_version") not in _READABLE:
        raise CheckpointError(f"{file}: format version {raw.get('format_version')!r} is not "
                              f"supported (this paramserver reads {list(_READABLE)})")
    if raw["format_version"] >= 2:
        recorded, actual = raw.get("checksum"), _checksum(raw)
        if recorded != actual:
            raise CheckpointError(f"{file}: the manifest was edited or is corrupt: its checksum "
                                  f"is {recorded!r}, its contents hash to {actual!r}")
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
    if raw["format_version"] == 1:
        _read_coverage(manifest)
    return manifest


def _read_coverage(manifest: Manifest) -> None:
    """A version-1 manifest does not record what each dense file holds: read it from the
    files (their ``blocks`` tensors; the files are checked against their CRC-32 by verify)."""
    for name, files in manifest.files.items():
        if manifest.tables[name].kind != pb.TableSpec.DENSE:
            continue
        for shard in files:
            tensors = read_shard(manifest.file_path(shard), name, ("blocks",))
            shard.block_runs[:] = block_runs(tensors["blocks"])


def verify(manifest: Manifest) -> None:
    """Check that the checkpoint covers every table whole (:func:`check_coverage`) and every
    shard file's size and CRC-32 against the manifest; CheckpointError naming the first table
    not covered, or file missing, truncated or corrupt."""
    check_coverage(manifest)
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


def _checkpoint_dirs(root: str | Path) -> list[int]:
    """Versions of every ``ckpt-`` directory in ``root``, with or without a manifest."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for entry in root.iterdir()
                  if (m := _NAME.match(entry.name)) and entry.is_dir())


def latest(root: str | Path, at_least: int = 0) -> tuple[Manifest | None, list[str]]:
    """The newest checkpoint in ``root`` (of version ``at_least`` or more) that reads and
    verifies, and a note for each newer one that was skipped and why (a ``ckpt-`` directory
    whose manifest is missing is one of them). ``(None, notes)`` when there is none."""
    notes: list[str] = []
    for version in reversed(_checkpoint_dirs(root)):
        if version < at_least:
            break
        path = Path(root) / checkpoint_dir_name(version)
        if not (path / MANIFEST).is_file():
            notes.append(f"skipped checkpoint {version}: {path} has no {MANIFEST} (deleted, or "
                         f"not a complete checkpoint)")
            continue
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
    if version is None and (_NAME.match(path.name) or (path / MANIFEST).is_file()):
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
    found, notes = latest(path)
    if found is None:
        if not notes:
            raise CheckpointError(f"{path} holds no checkpoint (no ckpt-*/{MANIFEST})")
        raise CheckpointError(f"{path} holds no complete checkpoint: " + "; ".join(notes))
    return found


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
           files: dict[str, list[pb.ShardFile]], final: Path | None = None) -> Manifest:
    """Check that ``files`` cover every table whole (:func:`check_coverage`), then write the
    manifest into ``tmp`` (temporary name, fsync, rename), fsync the directory, rename it to its
    final name (``final``, default ``root/ckpt-<version>``) and fsync ``root``. Returns the
    complete checkpoint's manifest. Raises CheckpointError naming the table not covered, or the
    file if the disk refuses; ``tmp`` is then left for :func:`abandon`."""
    root = Path(root)
    final = final or root / checkpoint_dir_name(version)
    now = time.time()
    manifest = Manifest(path=final, version=version, time=now, step=step, metadata=metadata,
                        num_servers=num_servers, tables=dict(tables),
                        files={k: list(v) for k, v in files.items()})
    check_coverage(manifest)
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
    body = json.loads(json.dumps(body))  # the checksum covers exactly what a reader parses
    body["checksum"] = _checksum(body)
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
        _fsync_dir(final.parent)
    except OSError as exc:
        raise CheckpointError(f"writing {target}: {exc.strerror or exc}") from None
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
