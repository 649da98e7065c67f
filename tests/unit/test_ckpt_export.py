"""export: a checkpoint written by two "servers" (tables and snapshots in process) exported as one
safetensors model, read back with paramserver, with the ``safetensors`` package for numpy and
torch, and served with EmbeddingLookup. The expected tensors come from the source tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

import paramserver as ps
from paramserver import _core
from paramserver import checkpoint as ckpt
from paramserver.errors import CheckpointError, InvalidRequestError
from paramserver.export import (
    EmbeddingLookup,
    export_checkpoint,
    load_model,
    load_model_info,
    slot_names,
)
from paramserver.partition import server_of_ids
from paramserver.snapshot import Snapshot
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import optimizer_to_spec

SHAPE = (4, 5)
BLOCK = 6                      # blocks of 6, 6, 6, 2 elements
HELD = {0: [0, 2], 1: [1, 3]}  # blocks per server
DIM = 3


@dataclass
class Shard:
    spec: pb.TableSpec
    table: object


@dataclass
class Job:
    """Two servers' tables after some training, and the checkpoint they wrote."""

    manifest: ckpt.Manifest
    dense: dict[int, _core.DenseTable]
    embedding: dict[int, _core.EmbeddingTable]
    ids: np.ndarray


def specs(optimizer: ps.Optimizer) -> dict[str, pb.TableSpec]:
    opt = optimizer_to_spec(optimizer)
    return {"w": pb.TableSpec(name="w", kind=pb.TableSpec.DENSE, shape=list(SHAPE),
                              block_size=BLOCK, optimizer=opt),
            "emb": pb.TableSpec(name="emb", kind=pb.TableSpec.EMBEDDING, dim=DIM, optimizer=opt,
                                initializer_json='{"name": "normal", "mean": 0.0, "std": 0.1}',
                                seed=2)}


def build_job(root: Path, optimizer: ps.Optimizer, version: int = 3) -> Job:
    spec = specs(optimizer)
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**64, 60, dtype=np.uint64))
    owner = server_of_ids(ids, 2)
    tmp = ckpt.begin(root, version)
    dense: dict[int, _core.DenseTable] = {}
    embedding: dict[int, _core.EmbeddingTable] = {}
    files: dict[str, list[pb.ShardFile]] = {"w": [], "emb": []}
    for rank in (0, 1):
        table = _core.DenseTable(int(np.prod(SHAPE)), BLOCK, optimizer.to_config(), HELD[rank])
        for k in range(rank + 2):  # the servers' blocks get different numbers of steps
            blocks = np.array(HELD[rank][: k + 1], np.int64)
            n = sum(table.block_length(b) for b in blocks.tolist())
            table.apply_many(blocks, rng.standard_normal(n).astype(np.float32))
        emb = _core.EmbeddingTable(DIM, optimizer.to_config(),
                                   ps.init.normal(0.0, 0.1).to_config(), 2)
        mine = ids[owner == rank]
        emb.push(mine, rng.standard_normal((len(mine), DIM)).astype(np.float32))
        emb.push(mine[:5], np.ones((5, DIM), np.float32))
        dense[rank], embedding[rank] = table, emb
        d, s = {"w": Shard(spec["w"], table)}, {"emb": Shard(spec["emb"], emb)}
        snap = Snapshot()
        snap.prepare(d, s)
        snap.take(version, ["w", "emb"], d, s, threads=1)
        for written in snap.persist(version, tmp, rank):
            files[written.table].append(written)
    manifest = ckpt.commit(root, tmp, version, 1234, {"run": "test"}, 2, spec, files)
    return Job(manifest, dense, embedding, ids)


def dense_expected(job: Job) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The full dense tensor, its slots and per-block steps, read from the source tables."""
    owner = {b: job.dense[r] for r, bs in HELD.items() for b in bs}
    table0 = job.dense[0]
    num_slots = table0.num_slots
    values: list[np.ndarray] = []
    slots: list[list[np.ndarray]] = [[] for _ in range(num_slots)]
    steps: list[int] = []
    for block in range(4):
        table = owner[block]
        out = np.empty(table.block_length(block), np.float32)
        table.read(block, out)
        values.append(out)
        for s in range(num_slots):
            o = np.empty_like(out)
            table.read_slot(block, s, o)
            slots[s].append(o)
        steps.append(table.step(block))
    return (np.concatenate(values).reshape(SHAPE), [np.concatenate(s).reshape(SHAPE)
                                                    for s in slots], np.array(steps, np.int64))


def embedding_expected(job: Job) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = [t.export_rows() for t in job.embedding.values()]
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids)
    return (ids[order], np.concatenate([p[1] for p in parts])[order],
            np.concatenate([p[2] for p in parts])[order],
            np.concatenate([p[3] for p in parts])[order])


@pytest.fixture
def adam_job(tmp_path: Path) -> Job:
    return build_job(tmp_path / "ckpts", ps.Adam(lr=0.01))


# -- slot names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer, names", [
    (ps.SGD(lr=0.1), []),
    (ps.SGD(lr=0.1, momentum=0.9), ["momentum_buffer"]),
    (ps.Adagrad(), ["sum"]),
    (ps.Adam(), ["exp_avg", "exp_avg_sq"]),
    (ps.Adam(amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    (ps.AdamW(), ["exp_avg", "exp_avg_sq"]),
    (ps.AdamW(amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
], ids=["sgd", "momentum", "adagrad", "adam", "amsgrad", "adamw", "adamw-amsgrad"])
def test_slot_names_match_the_cores_slot_count(optimizer: ps.Optimizer, names: list[str]) -> None:
    spec = pb.TableSpec(name="t", optimizer=optimizer_to_spec(optimizer))
    assert slot_names(spec) == names
    assert len(names) == _core.num_slots(optimizer.to_config())


# -- export --------------------------------------------------------------------------------------

def test_export_without_optimizer_state(adam_job: Job, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    info = export_checkpoint(adam_job.manifest, out)
    assert info == {"path": str(out), "bytes": out.stat().st_size, "version": 3, "step": 1234,
                    "tables": ["emb", "w"]}
    model = load_model(out)
    assert sorted(model) == ["emb.ids", "emb.rows", "w"]
    values, _, _ = dense_expected(adam_job)
    assert model["w"].shape == SHAPE and model["w"].dtype == np.float32
    assert model["w"].tobytes() == values.tobytes()
    ids, rows, _, _ = embedding_expected(adam_job)
    assert model["emb.ids"].dtype == np.uint64
    assert np.all(model["emb.ids"][1:] > model["emb.ids"][:-1])
    np.testing.assert_array_equal(model["emb.ids"], np.sort(adam_job.ids))
    np.testing.assert_array_equal(model["emb.ids"], ids)
    assert model["emb.rows"].shape == (len(ids), DIM)
    assert model["emb.rows"].tobytes() == rows.tobytes()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no tmp left


def test_export_with_optimizer_state(adam_job: Job, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    export_checkpoint(adam_job.manifest, out, with_optimizer_state=True)
    model = load_model(out)
    assert sorted(model) == ["emb.exp_avg", "emb.exp_avg_sq", "emb.ids", "emb.rows", "emb.steps",
                             "w", "w.exp_avg", "w.exp_avg_sq", "w.steps"]
    _, slots, steps = dense_expected(adam_job)
    assert model["w.exp_avg"].shape == SHAPE
    assert model["w.exp_avg"].tobytes() == slots[0].tobytes()
    assert model["w.exp_avg_sq"].tobytes() == slots[1].tobytes()
    np.testing.assert_array_equal(model["w.steps"], steps)
    assert len(set(steps.tolist())) > 1
    _, _, eslots, esteps = embedding_expected(adam_job)
    assert model["emb.exp_avg"].shape == (len(esteps), DIM)
    assert model["emb.exp_avg"].tobytes() == np.ascontiguousarray(eslots[:, 0]).tobytes()
    assert model["emb.exp_avg_sq"].tobytes() == np.ascontiguousarray(eslots[:, 1]).tobytes()
    np.testing.assert_array_equal(model["emb.steps"], esteps)
    assert set(esteps.tolist()) == {1, 2}


def test_export_of_an_amsgrad_checkpoint_names_max_exp_avg_sq(tmp_path: Path) -> None:
    job = build_job(tmp_path / "ckpts", ps.Adam(lr=0.01, amsgrad=True))
    out = tmp_path / "model.safetensors"
    export_checkpoint(job.manifest, out, with_optimizer_state=True)
    model = load_model(out)
    _, slots, _ = dense_expected(job)
    assert model["w.max_exp_avg_sq"].tobytes() == slots[2].tobytes()
    assert "emb.max_exp_avg_sq" in model


def test_export_of_sgd_with_state_has_only_steps(tmp_path: Path) -> None:
    job = build_job(tmp_path / "ckpts", ps.SGD(lr=0.1))
    out = tmp_path / "model.safetensors"
    export_checkpoint(job.manifest, out, with_optimizer_state=True)
    assert sorted(load_model(out)) == ["emb.ids", "emb.rows", "emb.steps", "w", "w.steps"]


def test_exported_file_is_read_by_safetensors_numpy_and_torch(adam_job: Job,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    export_checkpoint(adam_job.manifest, out, with_optimizer_state=True)
    model = load_model(out)
    direct = safetensors.numpy.load_file(str(out))
    assert sorted(direct) == sorted(model)
    for name in model:
        assert direct[name].tobytes() == model[name].tobytes(), name
    tensors = safetensors.torch.load_file(str(out))
    assert sorted(tensors) == sorted(model)
    for name, tensor in tensors.items():
        assert tuple(tensor.shape) == model[name].shape, name
        assert tensor.numpy().tobytes() == model[name].tobytes(), name


def test_load_model_info(adam_job: Job, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    export_checkpoint(adam_job.manifest, out)
    info = load_model_info(out)
    assert (info["version"], info["step"]) == (3, 1234)
    assert info["time"] == adam_job.manifest.time
    assert info["metadata"] == {"run": "test"}
    assert info["optimizer_state"] is False
    tables = {t["name"]: t for t in info["tables"]}
    assert sorted(tables) == ["emb", "w"]
    assert tables["w"]["kind"] == "dense" and tables["w"]["shape"] == list(SHAPE)
    assert tables["w"]["block_size"] == BLOCK
    assert tables["emb"]["kind"] == "embedding" and tables["emb"]["dim"] == DIM
    assert tables["emb"]["seed"] == 2
    export_checkpoint(adam_job.manifest, out, with_optimizer_state=True)
    assert load_model_info(out)["optimizer_state"] is True


def test_export_of_a_reopened_checkpoint(adam_job: Job, tmp_path: Path) -> None:
    manifest = ckpt.open_checkpoint(adam_job.manifest.path.parent)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    export_checkpoint(adam_job.manifest, a)
    export_checkpoint(manifest, b)
    model_a, model_b = load_model(a), load_model(b)
    assert sorted(model_a) == sorted(model_b)
    for name in model_a:
        assert model_a[name].tobytes() == model_b[name].tobytes()


def test_export_with_a_missing_block_names_the_table(adam_job: Job, tmp_path: Path) -> None:
    manifest = adam_job.manifest
    manifest.files["w"] = [f for f in manifest.files["w"] if f.server == 0]
    with pytest.raises(CheckpointError,
                       match=r"checkpoint 3 .* does not cover table 'w': no file holds blocks "
                             r"\[1, 3\] of its 4"):
        export_checkpoint(manifest, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


def test_export_with_an_unreadable_shard_names_the_file(adam_job: Job, tmp_path: Path,
                                                        unrestorable) -> None:
    unrestorable(adam_job.manifest.path)  # a shard is overwritten below
    shard = adam_job.manifest.files["emb"][1]
    path = adam_job.manifest.file_path(shard)
    path.write_bytes(b"\0" * 4)
    with pytest.raises(CheckpointError, match="table 'emb'") as info:
        export_checkpoint(adam_job.manifest, tmp_path / "model.safetensors")
    assert str(path) in str(info.value)


def test_export_refuses_clashing_tensor_names(tmp_path: Path, unrestorable) -> None:
    root = tmp_path / "ckpts"
    unrestorable(root / ckpt.checkpoint_dir_name(1))  # restores, but cannot be exported
    opt = optimizer_to_spec(ps.SGD(lr=0.1))
    tables = {"e": pb.TableSpec(name="e", kind=pb.TableSpec.EMBEDDING, dim=1, optimizer=opt,
                                initializer_json='{"name": "zeros"}'),
              "e.ids": pb.TableSpec(name="e.ids", kind=pb.TableSpec.DENSE, shape=[1],
                                    block_size=1, optimizer=opt)}
    tmp = ckpt.begin(root, 1)
    files = {}
    for name, spec in tables.items():
        dense_kind = spec.kind == pb.TableSpec.DENSE
        table = (_core.DenseTable(1, 1, ps.SGD(lr=0.1).to_config()) if dense_kind
                 else _core.EmbeddingTable(1, ps.SGD(lr=0.1).to_config()))
        shard = {name: Shard(spec, table)}
        dense, sparse = (shard, {}) if dense_kind else ({}, shard)
        snap = Snapshot()
        snap.prepare(dense, sparse)
        snap.take(1, [name], dense, sparse, threads=1)
        files[name] = snap.persist(1, tmp, 0)
    manifest = ckpt.commit(root, tmp, 1, 0, {}, 1, tables, files)
    with pytest.raises(CheckpointError, match="tensor names \\['e.ids'\\] are taken"):
        export_checkpoint(manifest, tmp_path / "model.safetensors")


def test_export_to_a_missing_directory_raises_checkpoint_error(adam_job: Job,
                                                                tmp_path: Path) -> None:
    """A file that cannot be written is a CheckpointError naming it (the CLI reports
    ParamServerError and ValueError as a one-line error; anything else is a traceback)."""
    out = tmp_path / "no-such-dir" / "model.safetensors"
    with pytest.raises(CheckpointError) as info:
        export_checkpoint(adam_job.manifest, out)
    assert str(out) in str(info.value)
    assert not out.exists()


def test_load_model_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="nothing.safetensors is not a readable model"):
        load_model(tmp_path / "nothing.safetensors")


def test_load_model_of_a_non_model_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 64)
    with pytest.raises(InvalidRequestError, match="is not a readable model file"):
        load_model(junk)
    with pytest.raises(InvalidRequestError, match="is not a readable model file"):
        load_model_info(junk)
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, str(plain), metadata={"a": "b"})
    with pytest.raises(InvalidRequestError, match="is not a paramserver model export"):
        load_model_info(plain)


# -- EmbeddingLookup -----------------------------------------------------------------------------

def test_lookup_of_known_and_unknown_ids(adam_job: Job, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    export_checkpoint(adam_job.manifest, out)
    model = load_model(out)
    lookup = EmbeddingLookup(model, "emb")
    assert lookup.dim == DIM
    known = adam_job.ids[[5, 0, 17]]
    unknown = np.array([1, 2**64 - 3], np.uint64)
    assert not np.isin(unknown, adam_job.ids).any()
    ids = np.array([[known[0], unknown[0]], [known[1], known[2]], [unknown[1], known[0]]],
                   np.uint64)
    rows = lookup(ids)
    assert rows.shape == (3, 2, DIM) and rows.dtype == np.float32
    position = {int(i): k for k, i in enumerate(model["emb.ids"])}
    for (r, c), i in np.ndenumerate(ids):
        want = model["emb.rows"][position[int(i)]] if int(i) in position else np.zeros(DIM)
        np.testing.assert_array_equal(rows[r, c], want)
    np.testing.assert_array_equal(lookup.found(ids),
                                  [[True, False], [True, True], [False, True]])
    # int64 ids are the same bits
    np.testing.assert_array_equal(lookup(ids.view(np.int64)), rows)


def test_lookup_with_a_default_row() -> None:
    model = {"t.ids": np.array([3, 10], np.uint64),
             "t.rows": np.array([[1, 2], [3, 4]], np.float32)}
    lookup = EmbeddingLookup(model, "t", default=np.array([-1, -1]))
    np.testing.assert_array_equal(lookup(np.array([10, 4, 3, 0, 11], np.uint64)),
                                  [[3, 4], [-1, -1], [1, 2], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(lookup.found(np.array([10, 4, 3, 0, 11], np.uint64)),
                                  [True, False, True, False, False])
    assert lookup(np.array([], np.uint64)).shape == (0, 2)


def test_lookup_in_an_empty_table() -> None:
    lookup = EmbeddingLookup({"t.ids": np.empty(0, np.uint64),
                              "t.rows": np.empty((0, 2), np.float32)}, "t")
    np.testing.assert_array_equal(lookup(np.array([1, 2], np.uint64)), np.zeros((2, 2)))
    np.testing.assert_array_equal(lookup.found(np.array([1, 2], np.uint64)), [False, False])


@pytest.mark.parametrize("ids", [[5, 3, 9], [3, 3, 9]], ids=["unsorted", "duplicate"])
def test_lookup_refuses_unsorted_ids(ids: list[int]) -> None:
    model = {"t.ids": np.array(ids, np.uint64), "t.rows": np.zeros((3, 2), np.float32)}
    with pytest.raises(InvalidRequestError, match="t.ids is not sorted ascending and unique"):
        EmbeddingLookup(model, "t")


def test_lookup_refuses_a_missing_table_and_bad_input() -> None:
    model = {"a.ids": np.array([1], np.uint64), "a.rows": np.zeros((1, 2), np.float32)}
    with pytest.raises(InvalidRequestError, match=r"no embedding table 'b' .*\['a'\]"):
        EmbeddingLookup(model, "b")
    with pytest.raises(InvalidRequestError, match="a.rows has shape"):
        EmbeddingLookup({"a.ids": np.array([1, 2], np.uint64),
                         "a.rows": np.zeros((1, 2), np.float32)}, "a")
    with pytest.raises(InvalidRequestError, match="ids must be int64 or uint64, got float64"):
        EmbeddingLookup(model, "a")(np.array([1.0]))
