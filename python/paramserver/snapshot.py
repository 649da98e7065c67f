"""A server's tables in memory at a cut, written to shard files, and restored from them.

The copy is the only part of a checkpoint that runs while writes are held, so it copies into
buffers that were allocated and touched before the hold began (a fresh buffer costs a page fault
per 4 KiB, measured here at ~0.4 GB/s, while copying into a resident one runs at memory speed).
The buffers are kept for the next checkpoint: a server checkpointing periodically holds one extra
copy of its state in memory, as CheckFreq does.

Shard contents are described in :mod:`paramserver.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paramserver import _core
from paramserver.checkpoint import (
    CheckpointError,
    Manifest,
    num_blocks_of,
    verify,
    block_runs,
    check_shard,
    read_shard,
    shard_file_name,
)
from paramserver.partition import server_of_ids
from paramserver.shardfile import write_tensors
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import initializer_from_json, optimizer_from_spec

__all__ = ["DenseCopy", "EmbeddingCopy", "Snapshot", "new_table", "restore_dense",
           "restore_embedding", "restore_all"]


def _resident(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    array = np.empty(shape, dtype=dtype)
    array.reshape(-1).view(np.uint8)[::4096] = 0  # touch every page now, not during the hold
    return array


@dataclass
class DenseCopy:
    """One dense shard's blocks, values, optimizer slots and step counts."""

    spec: pb.TableSpec
    blocks: np.ndarray     # int64, ascending
    values: np.ndarray     # float32 (n,)
    slots: np.ndarray      # float32 (num_slots, n)
    steps: np.ndarray      # int64 per block

    @classmethod
    def allocate(cls, spec: pb.TableSpec, table: _core.DenseTable) -> DenseCopy:
        blocks = np.array(table.held_blocks(), dtype=np.int64)
        n = sum(table.block_length(int(b)) for b in blocks)
        return cls(spec, blocks, _resident((n,), np.float32),
                   _resident((table.num_slots, n), np.float32), np.zeros(len(blocks), np.int64))

    def fits(self, table: _core.DenseTable) -> bool:
        return np.array_equal(self.blocks, table.held_blocks()) and \
            self.slots.shape[0] == table.num_slots

    def copy_from(self, table: _core.DenseTable, threads: int) -> int:
        table.read_many(self.blocks, self.values, threads)
        offset = 0
        for i, block in enumerate(self.blocks.tolist()):
            length = table.block_length(block)
            for s in range(self.slots.shape[0]):
                table.read_slot(block, s, self.slots[s, offset:offset + length])
            self.steps[i] = table.step(block)
            offset += length
        return self.values.nbytes + self.slots.nbytes

    def tensors(self) -> dict[str, np.ndarray]:
        return {"blocks": self.blocks, "steps": self.steps, "values": self.values,
                "slots": self.slots}


@dataclass
class EmbeddingCopy:
    """One embedding shard's rows: ids, values, optimizer slots and step counts (first ``rows``
    entries of buffers that may be larger)."""

    spec: pb.TableSpec
    ids: np.ndarray
    values: np.ndarray
    slots: np.ndarray
    steps: np.ndarray
    rows: int = 0

    @classmethod
    def allocate(cls, spec: pb.TableSpec, table: _core.EmbeddingTable,
                 capacity: int) -> EmbeddingCopy:
        dim, s = table.dim, table.num_slots
        return cls(spec, _resident((capacity,), np.uint64), _resident((capacity, dim), np.float32),
                   _resident((capacity, s, dim), np.float32), _resident((capacity,), np.int64))

    @property
    def capacity(self) -> int:
        return len(self.ids)

    def copy_from(self, table: _core.EmbeddingTable) -> int:
        n = table.export_rows_into(self.ids, self.values, self.slots, self.steps)
        if n > self.capacity:  # rows were created after the buffers were sized: grow, once
            grown = EmbeddingCopy.allocate(self.spec, table, n + n // 4 + 1024)
            self.ids, self.values, self.slots, self.steps = (grown.ids, grown.values,
                                                             grown.slots, grown.steps)
            n = table.export_rows_into(self.ids, self.values, self.slots, self.steps)
        self.rows = n
        return n * (self.values.shape[1] * (1 + self.slots.shape[1]) * 4 + 16)

    def tensors(self) -> dict[str, np.ndarray]:
        n = self.rows
        return {"ids": self.ids[:n], "steps": self.steps[:n], "values": self.values[:n],
                "slots": self.slots[:n]}


class Snapshot:
    """The copies of one server's tables at the latest cut, and their reusable buffers."""

    def __init__(self) -> None:
        self.cut: int | None = None
        self.copies: dict[str, DenseCopy | EmbeddingCopy] = {}
        self._taken: list[tuple[int, str]] = []  # (index in the cut's table list, name)

    def prepare(self, dense: dict, sparse: dict) -> None:
        """Size (and touch) buffers for every table now, before writes are held. ``dense`` and
        ``sparse`` map names to objects with ``spec`` and ``table`` attributes."""
        for name, shard in dense.items():
            copy = self.copies.get(name)
            if not isinstance(copy, DenseCopy) or not copy.fits(shard.table) \
                    or copy.spec is not shard.spec:
                self.copies[name] = DenseCopy.allocate(shard.spec, shard.table)
        for name, shard in sparse.items():
            copy = self.copies.get(name)
            rows = shard.table.num_rows()
            if not isinstance(copy, EmbeddingCopy) or copy.spec is not shard.spec \
                    or copy.capacity < rows + rows // 16 + 256:
                self.copies[name] = EmbeddingCopy.allocate(shard.spec, shard.table,
                                                           rows + rows // 4 + 1024)
        for name in set(self.copies) - set(dense) - set(sparse):
            del self.copies[name]

    def take(self, cut: int, tables: Iterable[str], dense: dict, sparse: dict,
             threads: int) -> tuple[int, int]:
        """Copy ``tables`` (names: the checkpoint's whole list, in the same order on every server,
        which numbers the shard files) into the buffers; call only while no write can run.
        Returns (bytes copied, updates applied: the sum of every block's and row's step count)."""
        total = steps = 0
        self._taken = []
        for index, name in enumerate(tables):
            if name in dense:
                copy = self.copies.get(name)
                if not isinstance(copy, DenseCopy) or not copy.fits(dense[name].table):
                    copy = self.copies[name] = DenseCopy.allocate(dense[name].spec,
                                                                  dense[name].table)
                total += copy.copy_from(dense[name].table, threads)
                steps += int(copy.steps.sum())
            elif name in sparse:
                copy = self.copies.get(name)
                if not isinstance(copy, EmbeddingCopy):
                    copy = self.copies[name] = EmbeddingCopy.allocate(
                        sparse[name].spec, sparse[name].table, sparse[name].table.num_rows() + 1024)
                total += copy.copy_from(sparse[name].table)
                steps += int(copy.steps[:copy.rows].sum())
            else:
                continue  # not on this server (a dense table with no block here)
            self._taken.append((index, name))
        self.cut = cut
        return total, steps

    def persist(self, cut: int, directory: str | Path, rank: int) -> list[pb.ShardFile]:
        """Write the copies of cut ``cut`` as shard files in ``directory`` (each fsynced)."""
        if self.cut != cut:
            raise CheckpointError(f"server-{rank} has no snapshot of cut {cut} (it has "
                                  f"{self.cut}); the cut was aborted or replaced")
        out = []
        for index, name in self._taken:
            copy = self.copies[name]
            file = shard_file_name(name, index, rank)
            dense = isinstance(copy, DenseCopy)
            written = write_tensors(Path(directory) / file, copy.tensors(),
                                    {"format": "paramserver-shard", "table": name,
                                     "kind": "dense" if dense else "embedding",
                                     "server": str(rank), "cut": str(cut)})
            out.append(pb.ShardFile(table=name, file=file, bytes=written.bytes,
                                    crc32=written.crc32, server=rank,
                                    block_runs=block_runs(copy.blocks)
                                    if isinstance(copy, DenseCopy) else []))
        return out


def _aligned(array: np.ndarray) -> np.ndarray:
    return array if array.flags.aligned and array.flags.c_contiguous else np.ascontiguousarray(
        array).copy()


def restore_dense(table: _core.DenseTable, name: str, paths: list[Path],
                  shards: list[pb.ShardFile] | None = None) -> int:
    """Load every block ``table`` holds from the shard files ``paths`` (any server's); returns
    bytes restored. With ``shards`` (the files' manifest entries, in the order of ``paths``) each
    file must hold exactly the blocks its entry records. CheckpointError naming the table, block
    or file if one is missing or does not fit."""
    wanted = set(table.held_blocks())
    found: set[int] = set()
    restored = 0
    for k, path in enumerate(paths):
        t = read_shard(path, name, ("blocks", "steps", "values", "slots"))
        if shards is not None:
            check_shard(shards[k], t, path, 1)
        blocks, steps, values, slots = t["blocks"], t["steps"], t["values"], t["slots"]
        if slots.ndim != 2 or slots.shape[0] != table.num_slots or \
                slots.shape[1] != values.shape[0] or len(steps) != len(blocks):
            raise CheckpointError(f"table {name!r}: shard file {path} holds {slots.shape[0]} "
                                  f"optimizer slots of shape {slots.shape}; the table's optimizer "
                                  f"keeps {table.num_slots} (or the file is inconsistent)")
        offset = 0
        for i, block in enumerate(blocks.tolist()):
            if not 0 <= block < table.num_blocks:
                raise CheckpointError(f"table {name!r}: shard file {path} has block {block}, "
                                      f"outside the table's {table.num_blocks} blocks")
            length = table.block_length(block)
            if offset + length > values.shape[0]:
                raise CheckpointError(f"table {name!r}: shard file {path} is short of values "
                                      f"for block {block}")
            if block in wanted:
                if block in found:
                    raise CheckpointError(f"table {name!r}: block {block} appears twice in the "
                                          f"checkpoint's files")
                table.restore_block(block, _aligned(values[offset:offset + length]),
                                    [_aligned(slots[s, offset:offset + length])
                                     for s in range(table.num_slots)], int(steps[i]))
                found.add(block)
                restored += length * 4 * (1 + table.num_slots)
            offset += length
    missing = sorted(wanted - found)
    if missing:
        raise CheckpointError(f"table {name!r}: the checkpoint has no data for blocks "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return restored


def restore_embedding(table: _core.EmbeddingTable, name: str, paths: list[Path], rank: int,
                      num_servers: int, shards: list[pb.ShardFile] | None = None,
                      written_by: int = 1) -> int:
    """Load the rows this server owns (by id hash) from the shard files ``paths``; returns bytes
    restored. With ``shards`` (the files' manifest entries, in the order of ``paths``) each file
    must hold only rows of its writer's partition among ``written_by`` servers."""
    restored = 0
    for k, path in enumerate(paths):
        t = read_shard(path, name, ("ids", "steps", "values", "slots"))
        if shards is not None:
            check_shard(shards[k], t, path, written_by)
        ids, steps, values, slots = t["ids"], t["steps"], t["values"], t["slots"]
        n = len(ids)
        if values.shape != (n, table.dim) or slots.shape != (n, table.num_slots, table.dim) or \
                steps.shape != (n,):
            raise CheckpointError(f"table {name!r}: shard file {path} holds rows of shape "
                                  f"{values.shape} and slots {slots.shape}; the table has dim "
                                  f"{table.dim} and {table.num_slots} optimizer slots")
        if num_servers > 1:
            mine = server_of_ids(ids, num_servers) == rank
            if not mine.all():
                ids, steps, values, slots = ids[mine], steps[mine], values[mine], slots[mine]
        try:
            table.import_rows(_aligned(ids), _aligned(values), _aligned(slots), _aligned(steps))
        except ValueError as exc:
            raise CheckpointError(f"table {name!r}: shard file {path}: {exc}") from None
        restored += len(ids) * (table.dim * (1 + table.num_slots) * 4 + 16)
    return restored


def new_table(spec: pb.TableSpec,
              blocks: tuple[int, ...]) -> _core.DenseTable | _core.EmbeddingTable:
    """A table of ``spec`` as its initializer makes it (a dense table holding ``blocks``, zeros
    with fresh optimizer state; an embedding table with no rows yet). ValueError from the core
    for sizes or blocks it refuses."""
    optimizer = optimizer_from_spec(spec.optimizer)
    if spec.kind == pb.TableSpec.DENSE:
        size = 1
        for d in spec.shape:
            size *= int(d)
        return _core.DenseTable(size, spec.block_size, optimizer.to_config(), list(blocks))
    if spec.kind == pb.TableSpec.EMBEDDING:
        init = initializer_from_json(spec.initializer_json)
        return _core.EmbeddingTable(spec.dim, optimizer.to_config(), init.to_config(), spec.seed)
    raise ValueError(f"table {spec.name!r}: unknown kind {spec.kind}")


def restore_all(manifest: Manifest) -> dict[str, _core.DenseTable | _core.EmbeddingTable]:
    """Restore every table of a checkpoint into this process, as a single server holding every
    block and row would (the code a server's Restore runs), after :func:`verify` (coverage,
    sizes, CRC-32s). Every shard file is read and checked against its manifest entry. Returns
    ``{name: table}``; CheckpointError naming the table or file that cannot be restored. For
    tests and offline checks: it holds the whole model in memory."""
    verify(manifest)
    out: dict[str, _core.DenseTable | _core.EmbeddingTable] = {}
    for name, spec in sorted(manifest.tables.items()):
        shards = manifest.files.get(name, [])
        paths = [manifest.file_path(s) for s in shards]
        if spec.kind == pb.TableSpec.DENSE:
            dense = new_table(spec, tuple(range(num_blocks_of(spec))))
            assert isinstance(dense, _core.DenseTable)
            restore_dense(dense, name, paths, shards)
            out[name] = dense
        else:
            sparse = new_table(spec, ())
            assert isinstance(sparse, _core.EmbeddingTable)
            restore_embedding(sparse, name, paths, 0, 1, shards, manifest.num_servers)
            out[name] = sparse
    return out
