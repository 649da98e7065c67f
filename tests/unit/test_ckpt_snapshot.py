"""snapshot: copies of a server's tables written as shard files and restored, bit for bit, onto a
different partition (dense blocks moved between servers, embedding rows split by id hash).

The oracle is the source table itself: after a restore every value, optimizer slot and step count
must equal the source's, and one more identical update on both must still give identical values
(Adam's bias correction depends on the step, so a wrong step shows up there too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver import _core
from paramserver.checkpoint import CheckpointError
from paramserver.partition import server_of_ids
from paramserver.shardfile import read_tensors, write_tensors
from paramserver.snapshot import (
    DenseCopy,
    EmbeddingCopy,
    Snapshot,
    restore_dense,
    restore_embedding,
)
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import optimizer_to_spec

NUM_ELEMENTS, BLOCK = 23, 5  # 5 blocks, the last one 3 elements
NUM_BLOCKS = 5
DIM = 3


@dataclass
class Shard:
    """What Snapshot.prepare/take expect per table: a spec and a table."""

    spec: pb.TableSpec
    table: object


def dense_spec(optimizer: ps.Optimizer, name: str = "w") -> pb.TableSpec:
    return pb.TableSpec(name=name, kind=pb.TableSpec.DENSE, shape=[NUM_ELEMENTS],
                        block_size=BLOCK, optimizer=optimizer_to_spec(optimizer))


def embedding_spec(optimizer: ps.Optimizer, name: str = "emb") -> pb.TableSpec:
    return pb.TableSpec(name=name, kind=pb.TableSpec.EMBEDDING, dim=DIM,
                        optimizer=optimizer_to_spec(optimizer), seed=1)


def dense_table(optimizer: ps.Optimizer, held: list[int]) -> _core.DenseTable:
    return _core.DenseTable(NUM_ELEMENTS, BLOCK, optimizer.to_config(), held)


def embedding_table(optimizer: ps.Optimizer, seed: int = 1) -> _core.EmbeddingTable:
    return _core.EmbeddingTable(DIM, optimizer.to_config(), ps.init.normal(0.0, 0.1).to_config(),
                                seed)


def grads_for(table: _core.DenseTable, blocks: list[int], rng: np.random.Generator) -> np.ndarray:
    n = sum(table.block_length(b) for b in blocks)
    return rng.standard_normal(n).astype(np.float32)


def train_dense(table: _core.DenseTable, seed: int) -> None:
    """A few steps; each block gets a different number of them, so steps differ per block."""
    rng = np.random.default_rng(seed)
    held = table.held_blocks()
    for k in range(4):
        blocks = np.array([b for b in held if b % 4 >= k % 4 or k == 0], np.int64)
        table.apply_many(blocks, grads_for(table, blocks.tolist(), rng))


def train_embedding(table: _core.EmbeddingTable, ids: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for k in range(3):
        chosen = np.ascontiguousarray(ids[k::k + 1])  # rows get different numbers of steps
        table.push(chosen, rng.standard_normal((len(chosen), DIM)).astype(np.float32))


def values(table: _core.DenseTable, blocks: list[int]) -> np.ndarray:
    out = np.empty(sum(table.block_length(b) for b in blocks), np.float32)
    table.read_many(np.array(blocks, np.int64), out)
    return out


def slot(table: _core.DenseTable, block: int, s: int) -> np.ndarray:
    out = np.empty(table.block_length(block), np.float32)
    table.read_slot(block, s, out)
    return out


def persist_dense(table: _core.DenseTable, spec: pb.TableSpec, directory: Path, rank: int,
                  cut: int = 1) -> Path:
    snap = Snapshot()
    shard = {spec.name: Shard(spec, table)}
    snap.prepare(shard, {})
    snap.take(cut, [spec.name], shard, {}, threads=2)
    (written,) = snap.persist(cut, directory, rank)
    return directory / written.file


def persist_embedding(table: _core.EmbeddingTable, spec: pb.TableSpec, directory: Path,
                      rank: int, cut: int = 1) -> Path:
    snap = Snapshot()
    shard = {spec.name: Shard(spec, table)}
    snap.prepare({}, shard)
    snap.take(cut, [spec.name], {}, shard, threads=1)
    (written,) = snap.persist(cut, directory, rank)
    return directory / written.file


def rows_by_id(table: _core.EmbeddingTable) -> dict[int, tuple]:
    ids, vals, slots, steps = table.export_rows()
    return {int(i): (vals[k].tobytes(), slots[k].tobytes(), int(steps[k]))
            for k, i in enumerate(ids)}


# -- dense ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [ps.Adam(lr=0.01), ps.Adam(lr=0.01, amsgrad=True),
                                       ps.SGD(lr=0.1, momentum=0.9), ps.Adagrad(lr=0.1),
                                       ps.SGD(lr=0.1)],
                         ids=["adam", "amsgrad", "momentum", "adagrad", "sgd"])
def test_dense_round_trip_onto_another_partition(tmp_path: Path, optimizer: ps.Optimizer) -> None:
    spec = dense_spec(optimizer)
    sources = {0: dense_table(optimizer, [0, 2, 4]), 1: dense_table(optimizer, [1, 3])}
    for rank, table in sources.items():
        train_dense(table, seed=rank)
    files = [persist_dense(table, spec, tmp_path, rank) for rank, table in sources.items()]
    owner = {b: t for t in sources.values() for b in t.held_blocks()}

    # Three servers now, blocks dealt differently.
    for held in ([0, 1], [2, 3], [4]):
        restored = dense_table(optimizer, held)
        assert restore_dense(restored, "w", files) == \
            sum(restored.block_length(b) for b in held) * 4 * (1 + restored.num_slots)
        for block in held:
            source = owner[block]
            assert values(restored, [block]).tobytes() == values(source, [block]).tobytes()
            assert restored.step(block) == source.step(block)
            for s in range(restored.num_slots):
                assert slot(restored, block, s).tobytes() == slot(source, block, s).tobytes()
        # One more identical step on both keeps them identical.
        grad = grads_for(restored, held, np.random.default_rng(99))
        restored.apply_many(np.array(held, np.int64), grad)
        start = 0
        for block in held:
            length = restored.block_length(block)
            owner[block].apply_many(np.array([block], np.int64), grad[start:start + length])
            start += length
        assert values(restored, held).tobytes() == \
            np.concatenate([values(owner[b], [b]) for b in held]).tobytes()


def test_dense_steps_differ_per_block_in_the_fixture() -> None:
    table = dense_table(ps.Adam(), list(range(NUM_BLOCKS)))
    train_dense(table, 0)
    assert len({table.step(b) for b in range(NUM_BLOCKS)}) > 1


def test_dense_copy_contents(tmp_path: Path) -> None:
    optimizer = ps.Adam(lr=0.01)
    table = dense_table(optimizer, [1, 4])
    train_dense(table, 3)
    path = persist_dense(table, dense_spec(optimizer), tmp_path, 2, cut=8)
    tensors, metadata = read_tensors(path)
    assert metadata == {"format": "paramserver-shard", "table": "w", "kind": "dense",
                        "server": "2", "cut": "8"}
    np.testing.assert_array_equal(tensors["blocks"], [1, 4])
    assert tensors["blocks"].dtype == np.int64
    np.testing.assert_array_equal(tensors["steps"], [table.step(1), table.step(4)])
    assert tensors["values"].tobytes() == values(table, [1, 4]).tobytes()
    assert tensors["slots"].shape == (2, BLOCK + 3)
    assert tensors["slots"][1, BLOCK:].tobytes() == slot(table, 4, 1).tobytes()


def test_take_reports_bytes_and_updates(tmp_path: Path) -> None:
    optimizer = ps.Adam(lr=0.01)
    table = dense_table(optimizer, [0, 1, 2, 3, 4])
    train_dense(table, 1)
    spec = dense_spec(optimizer)
    shard = {"w": Shard(spec, table)}
    snap = Snapshot()
    snap.prepare(shard, {})
    copied, steps = snap.take(5, ["w", "absent"], shard, {}, threads=1)
    assert copied == NUM_ELEMENTS * 4 * 3
    assert steps == sum(table.step(b) for b in range(NUM_BLOCKS))
    assert [f.table for f in snap.persist(5, tmp_path, 0)] == ["w"]  # "absent" is skipped


def test_a_snapshot_is_the_state_at_take_not_at_persist(tmp_path: Path) -> None:
    optimizer = ps.SGD(lr=1.0)
    table = dense_table(optimizer, [0, 1, 2, 3, 4])
    spec = dense_spec(optimizer)
    shard = {"w": Shard(spec, table)}
    snap = Snapshot()
    snap.prepare(shard, {})
    snap.take(1, ["w"], shard, {}, threads=1)
    before = values(table, list(range(NUM_BLOCKS)))
    table.apply_many(np.arange(NUM_BLOCKS, dtype=np.int64), np.ones(NUM_ELEMENTS, np.float32))
    (written,) = snap.persist(1, tmp_path, 0)
    restored = dense_table(optimizer, [])
    restore_dense(restored, "w", [tmp_path / written.file])
    assert values(restored, list(range(NUM_BLOCKS))).tobytes() == before.tobytes()
    assert restored.step(0) == 0


def test_persist_of_another_cut_is_refused(tmp_path: Path) -> None:
    optimizer = ps.SGD(lr=1.0)
    table = dense_table(optimizer, [0])
    shard = {"w": Shard(dense_spec(optimizer), table)}
    snap = Snapshot()
    with pytest.raises(CheckpointError, match="server-3 has no snapshot of cut 1"):
        snap.persist(1, tmp_path, 3)
    snap.prepare(shard, {})
    snap.take(2, ["w"], shard, {}, threads=1)
    with pytest.raises(CheckpointError, match="no snapshot of cut 1 \\(it has 2\\)"):
        snap.persist(1, tmp_path, 0)
    assert list(tmp_path.iterdir()) == []


def test_adam_checkpoint_into_an_sgd_dense_table(tmp_path: Path) -> None:
    table = dense_table(ps.Adam(), [0, 1, 2, 3, 4])
    train_dense(table, 0)
    path = persist_dense(table, dense_spec(ps.Adam()), tmp_path, 0)
    sgd = dense_table(ps.SGD(lr=0.1), [0, 1])
    with pytest.raises(CheckpointError, match="table 'w'") as info:
        restore_dense(sgd, "w", [path])
    assert "optimizer slots" in str(info.value) and str(path) in str(info.value)
    assert values(sgd, [0, 1]).tobytes() == np.zeros(2 * BLOCK, np.float32).tobytes()


def test_dense_restore_with_a_missing_block(tmp_path: Path) -> None:
    optimizer = ps.Adam()
    part = dense_table(optimizer, [0, 2, 4])
    path = persist_dense(part, dense_spec(optimizer), tmp_path, 0)
    with pytest.raises(CheckpointError, match=r"table 'w': the checkpoint has no data for "
                                              r"blocks \[1, 3\]"):
        restore_dense(dense_table(optimizer, [0, 1, 2, 3, 4]), "w", [path])


def test_dense_restore_with_a_block_twice(tmp_path: Path) -> None:
    optimizer = ps.SGD(lr=1.0)
    a = persist_dense(dense_table(optimizer, [0, 1]), dense_spec(optimizer), tmp_path, 0)
    b = persist_dense(dense_table(optimizer, [1, 2]), dense_spec(optimizer), tmp_path, 1)
    with pytest.raises(CheckpointError, match="block 1 appears twice"):
        restore_dense(dense_table(optimizer, [1]), "w", [a, b])


def test_dense_restore_from_an_unreadable_or_incomplete_file(tmp_path: Path) -> None:
    optimizer = ps.SGD(lr=1.0)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05" * 40)
    with pytest.raises(CheckpointError, match="table 'w'") as info:
        restore_dense(dense_table(optimizer, [0]), "w", [garbage])
    assert str(garbage) in str(info.value)
    partial = tmp_path / "partial.safetensors"
    write_tensors(partial, {"blocks": np.array([0], np.int64)})
    with pytest.raises(CheckpointError, match="lacks tensors \\['steps', 'values', 'slots'\\]"):
        restore_dense(dense_table(optimizer, [0]), "w", [partial])


def test_dense_restore_of_a_block_outside_the_table(tmp_path: Path) -> None:
    optimizer = ps.SGD(lr=1.0)
    path = tmp_path / "big.safetensors"
    write_tensors(path, {"blocks": np.array([9], np.int64), "steps": np.zeros(1, np.int64),
                         "values": np.zeros(BLOCK, np.float32),
                         "slots": np.zeros((0, BLOCK), np.float32)})
    with pytest.raises(CheckpointError, match="has block 9, outside the table's 5 blocks"):
        restore_dense(dense_table(optimizer, [0]), "w", [path])


# -- embedding -----------------------------------------------------------------------------------

def test_embedding_restore_keeps_the_ids_of_each_server(tmp_path: Path) -> None:
    optimizer = ps.Adam(lr=0.05)
    spec = embedding_spec(optimizer)
    ids = np.random.default_rng(4).integers(0, 2**64, 300, dtype=np.uint64)
    ids = np.unique(np.concatenate([ids, np.array([0, 2**64 - 1], np.uint64)]))
    source = embedding_table(optimizer)
    train_embedding(source, ids, seed=5)
    assert source.num_rows() == len(ids)
    path = persist_embedding(source, spec, tmp_path, 0)
    want = rows_by_id(source)

    owner = server_of_ids(ids, 2)
    assert 0 < owner.sum() < len(ids)  # both servers get rows
    for rank in (0, 1):
        restored = embedding_table(optimizer)
        restored_bytes = restore_embedding(restored, "emb", [path], rank, 2)
        got = rows_by_id(restored)
        assert sorted(got) == sorted(int(i) for i in ids[owner == rank])
        assert got == {i: want[i] for i in got}
        assert restored_bytes == len(got) * (DIM * 3 * 4 + 16)


def test_embedding_restore_from_several_files_on_one_server(tmp_path: Path) -> None:
    optimizer = ps.Adagrad(lr=0.1)
    spec = embedding_spec(optimizer)
    ids = np.arange(1, 101, dtype=np.uint64)
    sources = [embedding_table(optimizer) for _ in range(2)]
    for rank, table in enumerate(sources):
        train_embedding(table, ids[server_of_ids(ids, 2) == rank], seed=rank)
    paths = [persist_embedding(t, spec, tmp_path, r) for r, t in enumerate(sources)]
    restored = embedding_table(optimizer)
    restore_embedding(restored, "emb", paths, 0, 1)
    assert rows_by_id(restored) == {**rows_by_id(sources[0]), **rows_by_id(sources[1])}
    # and the restored rows train like the originals
    grads = np.ones((len(ids), DIM), np.float32)
    restored.push(ids, grads)
    for rank, table in enumerate(sources):
        mine = ids[server_of_ids(ids, 2) == rank]
        table.push(mine, grads[: len(mine)])
    assert rows_by_id(restored) == {**rows_by_id(sources[0]), **rows_by_id(sources[1])}


def test_embedding_copy_grows_when_rows_appear_after_prepare(tmp_path: Path) -> None:
    optimizer = ps.SGD(lr=0.5, momentum=0.9)
    spec = embedding_spec(optimizer)
    table = embedding_table(optimizer)
    shard = {"emb": Shard(spec, table)}
    snap = Snapshot()
    snap.prepare({}, shard)
    prepared = snap.copies["emb"]
    assert isinstance(prepared, EmbeddingCopy)
    capacity = prepared.capacity
    ids = np.arange(capacity + 500, dtype=np.uint64)
    table.push(ids, np.ones((len(ids), DIM), np.float32))
    _, steps = snap.take(1, ["emb"], {}, shard, threads=1)
    assert steps == len(ids)
    copy = snap.copies["emb"]
    assert isinstance(copy, EmbeddingCopy) and copy.rows == len(ids) <= copy.capacity
    (written,) = snap.persist(1, tmp_path, 0)
    restored = embedding_table(optimizer)
    restore_embedding(restored, "emb", [tmp_path / written.file], 0, 1)
    assert rows_by_id(restored) == rows_by_id(table)


def test_embedding_shard_of_an_empty_table(tmp_path: Path) -> None:
    optimizer = ps.Adam()
    path = persist_embedding(embedding_table(optimizer), embedding_spec(optimizer), tmp_path, 0)
    tensors, _ = read_tensors(path)
    assert tensors["ids"].shape == (0,) and tensors["slots"].shape == (0, 2, DIM)
    restored = embedding_table(optimizer)
    assert restore_embedding(restored, "emb", [path], 0, 2) == 0
    assert restored.num_rows() == 0


def test_adam_checkpoint_into_an_sgd_embedding_table(tmp_path: Path) -> None:
    source = embedding_table(ps.Adam())
    train_embedding(source, np.arange(10, dtype=np.uint64), 0)
    path = persist_embedding(source, embedding_spec(ps.Adam()), tmp_path, 0)
    sgd = embedding_table(ps.SGD(lr=0.1))
    with pytest.raises(CheckpointError, match="table 'emb'") as info:
        restore_embedding(sgd, "emb", [path], 0, 1)
    assert "0 optimizer slots" in str(info.value) and str(path) in str(info.value)
    assert sgd.num_rows() == 0


def test_embedding_checkpoint_of_another_dim(tmp_path: Path) -> None:
    source = embedding_table(ps.SGD(lr=0.1))
    train_embedding(source, np.arange(10, dtype=np.uint64), 0)
    path = persist_embedding(source, embedding_spec(ps.SGD(lr=0.1)), tmp_path, 0)
    wide = _core.EmbeddingTable(DIM + 1, ps.SGD(lr=0.1).to_config())
    with pytest.raises(CheckpointError, match="the table has dim 4"):
        restore_embedding(wide, "emb", [path], 0, 1)


# -- Snapshot buffers ----------------------------------------------------------------------------

def test_prepare_reuses_fitting_buffers_and_drops_removed_tables() -> None:
    optimizer = ps.Adam()
    dense = {"w": Shard(dense_spec(optimizer), dense_table(optimizer, [0, 1]))}
    sparse = {"emb": Shard(embedding_spec(optimizer), embedding_table(optimizer))}
    snap = Snapshot()
    snap.prepare(dense, sparse)
    first = dict(snap.copies)
    assert isinstance(first["w"], DenseCopy) and isinstance(first["emb"], EmbeddingCopy)
    snap.prepare(dense, sparse)
    assert snap.copies["w"] is first["w"] and snap.copies["emb"] is first["emb"]
    snap.prepare({"w": Shard(dense["w"].spec, dense_table(optimizer, [0, 2]))}, {})
    assert set(snap.copies) == {"w"} and snap.copies["w"] is not first["w"]
    np.testing.assert_array_equal(snap.copies["w"].blocks, [0, 2])
