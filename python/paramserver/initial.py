"""Initial values of tables, kept so a server that lost its shards can recreate them.

A server restarted with no checkpoint of a table's shards recreates them as the table began: a
rollback to version 0. An embedding table and a dense table initialized with zeros need nothing
for that (their initializers are deterministic). A dense table a worker initialized from given
values (``client.dense(..., init=array)``) has those values saved when it becomes ready: the
scheduler has the servers holding its blocks write them, as they are then, into::

    DIR/initial/table-0000000003/MANIFEST.json                  version 0, this table alone
    DIR/initial/table-0000000003/<table>-0000.s<rank>.safetensors

a checkpoint of that one table (:mod:`paramserver.checkpoint`: the same files, manifest,
checksums and coverage check; written under a temporary name and renamed into place), so it is
restored by the same code as any checkpoint. A later entry for the same name replaces the earlier
ones; declaring the table again without given values removes them (an entry from an earlier job in
the same directory is never taken for this job's table).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from paramserver import checkpoint as ckpt
from paramserver.errors import CheckpointError
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import specs_match

__all__ = ["INITIAL", "store", "entry_name", "next_entry", "entries", "find", "forget"]

#: Sub-directory of the checkpoint directory holding initial values.
INITIAL = "initial"
_ENTRY = re.compile(r"^table-(\d{10})$")


def store(root: str | Path) -> Path:
    """The directory of initial values under the checkpoint directory ``root``."""
    return Path(root) / INITIAL


def entry_name(number: int) -> str:
    """``table-0000000003``: the directory of the ``number``-th saved table."""
    return f"table-{number:010d}"


def entries(root: str | Path) -> list[Path]:
    """Every complete entry (a directory with a manifest), oldest first."""
    directory = store(root)
    if not directory.is_dir():
        return []
    found = sorted((int(m.group(1)), entry) for entry in directory.iterdir()
                   if (m := _ENTRY.match(entry.name)) and (entry / ckpt.MANIFEST).is_file())
    return [entry for _, entry in found]


def next_entry(root: str | Path) -> int:
    """One more than the number of any entry, complete or being written."""
    directory = store(root)
    seen = [0]
    if directory.is_dir():
        for entry in directory.iterdir():
            m = _ENTRY.match(entry.name) or re.match(r"^\.ckpt-(\d{10})\.tmp-", entry.name)
            if m:
                seen.append(int(m.group(1)))
    return max(seen) + 1


def _tables_of(entry: Path) -> dict[str, pb.TableSpec]:
    try:
        return ckpt.read_manifest(entry).tables
    except CheckpointError:
        return {}


def find(root: str | Path, spec: pb.TableSpec) -> ckpt.Manifest | None:
    """The newest entry holding table ``spec.name`` with this spec, verified (coverage, sizes,
    CRC-32s); None if there is none. CheckpointError if the newest such entry does not verify
    (a damaged entry is never passed over for an older one)."""
    for entry in reversed(entries(root)):
        tables = _tables_of(entry)
        if spec.name in tables:
            if not specs_match(tables[spec.name], spec):
                return None
            manifest = ckpt.read_manifest(entry)
            ckpt.verify(manifest)
            return manifest
    return None


def forget(root: str | Path, name: str, keep: Path | None = None) -> None:
    """Remove every entry of table ``name`` but ``keep``, and leftover temporary directories."""
    directory = store(root)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(".ckpt-") and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
    for entry in entries(root):
        if entry != keep and name in _tables_of(entry):
            shutil.rmtree(entry, ignore_errors=True)
