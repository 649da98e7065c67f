"""checkpoint: directory layout, manifest, verification, version selection, fallback past corrupt
checkpoints, retention and writability, on real shard files written with ``begin``/``commit``."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver import checkpoint as ckpt
from paramserver.checkpoint import CheckpointError
from paramserver.partition import server_of_ids
from paramserver.shardfile import write_tensors
from paramserver.snapshot import restore_all
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import optimizer_to_spec

DENSE = pb.TableSpec(name="w", kind=pb.TableSpec.DENSE, shape=[2, 3], block_size=4,
                     optimizer=optimizer_to_spec(ps.Adam(lr=0.01)))
EMBEDDING = pb.TableSpec(name="emb", kind=pb.TableSpec.EMBEDDING, dim=2,
                         optimizer=optimizer_to_spec(ps.SGD(lr=0.1)),
                         initializer_json='{"name": "zeros"}', seed=3)


#: Each table's index in the checkpoints below (their sorted table list).
INDEX = {"emb": 0, "w": 1}


def write_shard(directory: Path, table: str, rank: int, tensors: dict) -> pb.ShardFile:
    """Write one shard file into ``directory`` and describe it as the servers do."""
    name = ckpt.shard_file_name(table, INDEX[table], rank)
    written = write_tensors(directory / name, tensors, {"table": table, "server": str(rank)})
    return pb.ShardFile(table=table, file=name, bytes=written.bytes, crc32=written.crc32,
                        server=rank, block_runs=ckpt.block_runs(tensors["blocks"])
                        if "blocks" in tensors else [])


def _first_id_of(rank: int, servers: int = 2) -> int:
    ids = np.arange(64, dtype=np.uint64)
    return int(ids[server_of_ids(ids, servers) == rank][0])


#: An embedding id each server of two holds (its id hash maps there).
ID_OF = {r: _first_id_of(r) for r in (0, 1)}


def make_checkpoint(root: Path, version: int, step: int = 0,
                    metadata: dict | None = None) -> ckpt.Manifest:
    """A complete two-server checkpoint of a dense and an embedding table; values depend on
    ``version`` so checkpoints differ."""
    tmp = ckpt.begin(root, version)
    v = float(version)
    files = {
        "w": [write_shard(tmp, "w", 0, {"blocks": np.array([0], np.int64),
                                        "steps": np.array([version], np.int64),
                                        "values": np.full(4, v, np.float32),
                                        "slots": np.zeros((2, 4), np.float32)}),
              write_shard(tmp, "w", 1, {"blocks": np.array([1], np.int64),
                                        "steps": np.array([version], np.int64),
                                        "values": np.full(2, v, np.float32),
                                        "slots": np.zeros((2, 2), np.float32)})],
        "emb": [write_shard(tmp, "emb", r, {"ids": np.array([ID_OF[r]], np.uint64),
                                            "steps": np.array([1], np.int64),
                                            "values": np.full((1, 2), v, np.float32),
                                            "slots": np.zeros((1, 0, 2), np.float32)})
                for r in (0, 1)],
    }
    return ckpt.commit(root, tmp, version, step, metadata or {"v": version}, 2,
                       {"w": DENSE, "emb": EMBEDDING}, files)


def shard_path(root: Path, version: int, table: str = "w", rank: int = 1) -> Path:
    return root / ckpt.checkpoint_dir_name(version) / ckpt.shard_file_name(table, INDEX[table],
                                                                            rank)


def flip_byte(path: Path, position: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(root: Path, version: int, change, reseal: bool = True) -> Path:
    """Edit a manifest; ``reseal``: and give it the checksum of its new contents (a manifest
    written that way, so the checks behind the checksum are reached)."""
    file = root / ckpt.checkpoint_dir_name(version) / ckpt.MANIFEST
    body = json.loads(file.read_text())
    change(body)
    if reseal:
        body["checksum"] = ckpt._checksum(body)
    file.write_text(json.dumps(body))
    return file


# -- names ---------------------------------------------------------------------------------------

def test_names() -> None:
    assert ckpt.checkpoint_dir_name(7) == "ckpt-0000000007"
    assert ckpt.shard_file_name("layer1/weight", 2, 3) == "layer1_weight-0002.s3.safetensors"


def test_shard_file_names_are_distinct_and_stay_inside_the_directory() -> None:
    tables = ("a/b", "a_b", "a b", "a:b", "a-0001", "a-0001-0002",
              "emb_" + "x" * 60 + "_a90a2", "emb_" + "x" * 60 + "_f10090")
    names = {ckpt.shard_file_name(t, i, r) for i, t in enumerate(tables) for r in range(3)}
    assert len(names) == 3 * len(tables)  # same readable parts, different indexes
    for table in ("../../etc/passwd", "..", "", "/abs"):
        name = ckpt.shard_file_name(table, 0, 0)
        assert "/" not in name and not name.startswith("."), name
    assert len(ckpt.shard_file_name("x" * 500, 12345, 0)) < 100


@pytest.mark.parametrize("blocks", [[], [3], [0, 1, 2, 3], [1, 4, 7, 10], [0, 2, 3, 5, 9, 11],
                                    [5, 6, 8, 20]])
def test_block_runs_round_trip(blocks: list[int]) -> None:
    runs = ckpt.block_runs(np.array(blocks, np.int64))
    assert ckpt.run_blocks(runs).tolist() == blocks
    assert len(runs) <= 3 * max(1, len(blocks))


# -- commit and read back ------------------------------------------------------------------------

def test_commit_writes_a_manifest_that_reads_back_equal(tmp_path: Path) -> None:
    made = make_checkpoint(tmp_path, 5, step=42, metadata={"epoch": 3, "note": "x"})
    assert made.path == tmp_path / "ckpt-0000000005"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000000005"]  # tmp renamed
    read = ckpt.read_manifest(made.path)
    assert (read.version, read.step, read.metadata, read.num_servers) == \
        (5, 42, {"epoch": 3, "note": "x"}, 2)
    assert read.time == made.time
    assert read.tables == {"w": DENSE, "emb": EMBEDDING}
    assert read.files == made.files
    on_disk = sum(f.stat().st_size for f in made.path.glob("*.safetensors"))
    assert read.bytes == made.bytes == on_disk
    assert read.file_path(read.files["w"][1]) == shard_path(tmp_path, 5)
    body = json.loads((made.path / ckpt.MANIFEST).read_text())
    assert (body["format"], body["format_version"]) == ("paramserver-checkpoint", 2)
    assert body["checksum"].startswith("sha256:")
    ckpt.verify(read)


def test_shard_file_of_server_zero_keeps_its_zero_fields(tmp_path: Path) -> None:
    made = make_checkpoint(tmp_path, 1)
    read = ckpt.read_manifest(made.path)
    assert read.files["emb"][0].server == 0
    body = json.loads((made.path / ckpt.MANIFEST).read_text())
    entry = next(t for t in body["tables"] if t["spec"]["name"] == "emb")
    assert entry["files"][0]["server"] == 0


# -- versions ------------------------------------------------------------------------------------

def test_list_versions_ignores_half_written_and_foreign_entries(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 3)
    half = ckpt.begin(tmp_path, 4)  # a writer that died before its manifest
    write_shard(half, "w", 0, {"x": np.ones(2, np.float32)})
    (tmp_path / "ckpt-0000000009").mkdir()  # renamed by hand, no manifest
    (tmp_path / "ckpt-12").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert ckpt.list_versions(tmp_path) == [1, 3]
    assert ckpt.list_versions(tmp_path / "missing") == []


def test_next_version_counts_temporary_directories(tmp_path: Path) -> None:
    assert ckpt.next_version(tmp_path / "missing") == 1
    assert ckpt.next_version(tmp_path) == 1
    make_checkpoint(tmp_path, 2)
    assert ckpt.next_version(tmp_path) == 3
    ckpt.begin(tmp_path, 7)  # never committed
    assert ckpt.list_versions(tmp_path) == [2]
    assert ckpt.next_version(tmp_path) == 8


def test_begin_twice_for_one_version_gives_two_directories(tmp_path: Path) -> None:
    a, b = ckpt.begin(tmp_path, 3), ckpt.begin(tmp_path, 3)
    assert a != b and a.is_dir() and b.is_dir()
    assert a.name.startswith(".ckpt-0000000003.tmp-")


def test_begin_under_a_file_raises_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="cannot create") as info:
        ckpt.begin(tmp_path / "f", 1)
    assert str(tmp_path / "f") in str(info.value)


# -- latest and verification ---------------------------------------------------------------------

def test_latest_returns_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    for v in (1, 2, 3):
        make_checkpoint(tmp_path, v)
    manifest, notes = ckpt.latest(tmp_path)
    assert manifest is not None and manifest.version == 3 and notes == []


def test_latest_skips_a_checkpoint_with_a_corrupted_byte(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(2))  # corrupted below
    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 2)
    bad = shard_path(tmp_path, 2)
    size = bad.stat().st_size
    flip_byte(bad)
    assert bad.stat().st_size == size  # only the CRC can tell
    manifest, notes = ckpt.latest(tmp_path)
    assert manifest is not None and manifest.version == 1
    assert len(notes) == 1
    assert notes[0].startswith("skipped checkpoint 2:")
    assert str(bad) in notes[0] and "corrupt" in notes[0] and "CRC-32" in notes[0]


def test_latest_skips_a_truncated_file(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(2))  # corrupted below
    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 2)
    bad = shard_path(tmp_path, 2, "emb", 0)
    bad.write_bytes(bad.read_bytes()[:-4])
    manifest, notes = ckpt.latest(tmp_path)
    assert manifest is not None and manifest.version == 1
    assert len(notes) == 1 and "skipped checkpoint 2" in notes[0]
    assert str(bad) in notes[0] and "truncated" in notes[0] and "'emb'" in notes[0]


def test_latest_skips_a_missing_file_and_a_foreign_manifest(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(2))  # corrupted below
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(3))  # corrupted below
    for v in (1, 2, 3):
        make_checkpoint(tmp_path, v)
    shard_path(tmp_path, 3).unlink()
    edit_manifest(tmp_path, 2, lambda body: body.update(format="something-else"))
    manifest, notes = ckpt.latest(tmp_path)
    assert manifest is not None and manifest.version == 1
    assert [n.split(":")[0] for n in notes] == ["skipped checkpoint 3", "skipped checkpoint 2"]
    assert "missing" in notes[0] and str(shard_path(tmp_path, 3)) in notes[0]
    assert "something-else" in notes[1]


def test_latest_with_nothing_usable(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(1))  # corrupted below
    assert ckpt.latest(tmp_path) == (None, [])
    make_checkpoint(tmp_path, 1)
    flip_byte(shard_path(tmp_path, 1))
    manifest, notes = ckpt.latest(tmp_path)
    assert manifest is None and len(notes) == 1 and "skipped checkpoint 1" in notes[0]


def test_verify_names_the_corrupt_file_and_table(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(1))  # corrupted below
    manifest = make_checkpoint(tmp_path, 1)
    flip_byte(shard_path(tmp_path, 1, "w", 0), position=20)
    with pytest.raises(CheckpointError) as info:
        ckpt.verify(manifest)
    message = str(info.value)
    assert "checkpoint 1" in message and "'w'" in message
    assert str(shard_path(tmp_path, 1, "w", 0)) in message


def test_a_replaced_file_of_the_same_size_fails_verification(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(1))  # corrupted below
    manifest = make_checkpoint(tmp_path, 1)
    path = shard_path(tmp_path, 1)
    other = write_tensors(tmp_path / "other", {"blocks": np.array([1], np.int64),
                                                "steps": np.array([1], np.int64),
                                                "values": np.full(2, 9.0, np.float32),
                                                "slots": np.zeros((2, 2), np.float32)},
                          {"table": "w", "server": "1"})
    assert other.bytes == path.stat().st_size
    (tmp_path / "other").replace(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.verify(manifest)


# -- manifests -----------------------------------------------------------------------------------

def test_manifest_of_another_format_names_the_file(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(1))  # corrupted below
    make_checkpoint(tmp_path, 1)
    file = edit_manifest(tmp_path, 1, lambda body: body.update(format="tf-checkpoint"))
    with pytest.raises(CheckpointError) as info:
        ckpt.read_manifest(file.parent)
    assert str(file) in str(info.value)
    assert "'tf-checkpoint'" in str(info.value) and "paramserver-checkpoint" in str(info.value)
    with pytest.raises(CheckpointError, match="is not a paramserver checkpoint manifest"):
        ckpt.open_checkpoint(file.parent)


def test_manifest_of_a_newer_format_version(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(1))  # corrupted below
    make_checkpoint(tmp_path, 1)
    file = edit_manifest(tmp_path, 1, lambda body: body.update(format_version=3))
    with pytest.raises(CheckpointError, match="format version 3 is not supported") as info:
        ckpt.read_manifest(file.parent)
    assert str(file) in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\"just a string\""],
                         ids=["broken", "empty", "list", "string"])
def test_malformed_manifest_json(tmp_path: Path, text: str, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(1))  # corrupted below
    make_checkpoint(tmp_path, 1)
    file = tmp_path / "ckpt-0000000001" / ckpt.MANIFEST
    file.write_text(text)
    with pytest.raises(CheckpointError) as info:
        ckpt.read_manifest(file.parent)
    assert str(file) in str(info.value)


@pytest.mark.parametrize("change", [lambda b: b.pop("version"), lambda b: b.pop("tables"),
                                    lambda b: b.update(step="many"),
                                    lambda b: b.update(metadata=None),
                                    lambda b: b["tables"][0]["spec"].update(kind="SPARSE"),
                                    lambda b: b["tables"][0]["files"][0].update(bytes="x")],
                         ids=["no-version", "no-tables", "bad-step", "null-metadata",
                              "bad-kind", "bad-bytes"])
def test_manifest_with_bad_fields(tmp_path: Path, change, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(1))  # corrupted below
    make_checkpoint(tmp_path, 1)
    file = edit_manifest(tmp_path, 1, change)
    with pytest.raises(CheckpointError, match="malformed manifest") as info:
        ckpt.read_manifest(file.parent)
    assert str(file) in str(info.value)


def test_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a checkpoint: no MANIFEST.json"):
        ckpt.read_manifest(tmp_path)


# -- open_checkpoint -----------------------------------------------------------------------------

def test_open_checkpoint_selects_versions(tmp_path: Path) -> None:
    for v in (1, 2, 4):
        make_checkpoint(tmp_path, v)
    assert ckpt.open_checkpoint(tmp_path).version == 4
    assert ckpt.open_checkpoint(tmp_path, 2).version == 2
    assert ckpt.open_checkpoint(tmp_path / "ckpt-0000000001").version == 1


def test_open_checkpoint_of_a_missing_version_names_the_existing_ones(tmp_path: Path) -> None:
    for v in (1, 2, 4):
        make_checkpoint(tmp_path, v)
    with pytest.raises(CheckpointError) as info:
        ckpt.open_checkpoint(tmp_path, 3)
    assert "version 3 does not exist" in str(info.value)
    assert "[1, 2, 4]" in str(info.value) and str(tmp_path) in str(info.value)


def test_open_checkpoint_falls_back_past_a_corrupt_newest(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(2))  # corrupted below
    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 2)
    flip_byte(shard_path(tmp_path, 2))
    assert ckpt.open_checkpoint(tmp_path).version == 1
    with pytest.raises(CheckpointError, match="corrupt"):  # asked for by number: no fallback
        ckpt.open_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.open_checkpoint(tmp_path / "ckpt-0000000002")


def test_open_checkpoint_with_none_usable(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(2))  # corrupted below
    with pytest.raises(CheckpointError, match="does not exist or is not a directory"):
        ckpt.open_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no checkpoint") as info:
        ckpt.open_checkpoint(tmp_path)
    assert "versions there" not in str(info.value)
    ckpt.begin(tmp_path, 1)  # only a half-written one
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ckpt.open_checkpoint(tmp_path)
    make_checkpoint(tmp_path, 2)
    flip_byte(shard_path(tmp_path, 2))
    with pytest.raises(CheckpointError, match="holds no complete checkpoint") as info:
        ckpt.open_checkpoint(tmp_path)
    assert "skipped checkpoint 2" in str(info.value)


# -- prune and abandon ---------------------------------------------------------------------------

def test_prune_keeps_the_newest_and_removes_temporary_directories(tmp_path: Path) -> None:
    for v in (1, 2, 3, 4):
        make_checkpoint(tmp_path, v)
    left = [ckpt.begin(tmp_path, 5), ckpt.begin(tmp_path, 2)]
    (left[0] / "junk").write_bytes(b"x")
    (tmp_path / "ckpt-0000000000").mkdir()  # no manifest: not a checkpoint, left alone
    assert ckpt.prune(tmp_path, keep=2) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["ckpt-0000000000", "ckpt-0000000003", "ckpt-0000000004"]
    assert ckpt.list_versions(tmp_path) == [3, 4]
    assert ckpt.prune(tmp_path, keep=2) == []


def test_prune_keep_zero_keeps_every_checkpoint(tmp_path: Path) -> None:
    for v in (1, 2):
        make_checkpoint(tmp_path, v)
    tmp = ckpt.begin(tmp_path, 3)
    assert ckpt.prune(tmp_path, keep=0) == []
    assert ckpt.list_versions(tmp_path) == [1, 2] and not tmp.exists()


def test_prune_with_fewer_than_keep(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 1)
    assert ckpt.prune(tmp_path, keep=3) == []
    assert ckpt.list_versions(tmp_path) == [1]
    assert ckpt.prune(tmp_path / "missing", keep=1) == []


def test_abandon_removes_the_temporary_directory(tmp_path: Path) -> None:
    tmp = ckpt.begin(tmp_path, 1)
    write_shard(tmp, "w", 0, {"x": np.ones(2, np.float32)})
    ckpt.abandon(tmp)
    assert list(tmp_path.iterdir()) == []
    ckpt.abandon(tmp)  # twice: still fine


def test_commit_onto_an_existing_version_fails_and_leaves_tmp(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 1)
    (tmp_path / "ckpt-0000000001" / "extra").write_text("x")  # rename cannot replace it
    tmp = ckpt.begin(tmp_path, 1)
    with pytest.raises(CheckpointError, match="writing"):
        ckpt.commit(tmp_path, tmp, 1, 0, {}, 1, {}, {})
    assert tmp.is_dir()
    assert ckpt.open_checkpoint(tmp_path, 1).metadata == {"v": 1}


# -- check_writable ------------------------------------------------------------------------------

def test_check_writable_creates_the_directory_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    assert ckpt.check_writable(root) == root
    assert root.is_dir() and list(root.iterdir()) == []


def test_check_writable_under_a_regular_file(tmp_path: Path) -> None:
    parent = tmp_path / "plain-file"
    parent.write_text("x")
    for root in (parent / "ckpts", parent):
        with pytest.raises(CheckpointError, match="is not writable") as info:
            ckpt.check_writable(root)
        assert str(root) in str(info.value)
    assert parent.read_text() == "x"


# -- coverage, checksum, deleted manifests, version-1 manifests ----------------------------------

def test_commit_refuses_a_checkpoint_missing_a_block_and_leaves_no_checkpoint(
        tmp_path: Path) -> None:
    tmp = ckpt.begin(tmp_path, 1)
    files = {"w": [write_shard(tmp, "w", 0, {"blocks": np.array([0], np.int64),
                                             "steps": np.array([1], np.int64),
                                             "values": np.ones(4, np.float32),
                                             "slots": np.zeros((2, 4), np.float32)})]}
    with pytest.raises(CheckpointError, match=r"checkpoint 1 .* does not cover table 'w': no file "
                                              r"holds blocks \[1\] of its 2"):
        ckpt.commit(tmp_path, tmp, 1, 0, {}, 2, {"w": DENSE}, files)
    assert ckpt.list_versions(tmp_path) == [] and tmp.is_dir()  # left for abandon


def test_coverage_names_doubled_blocks_missing_partitions_and_shared_files(
        tmp_path: Path) -> None:
    manifest = make_checkpoint(tmp_path, 1)
    doubled = ckpt.Manifest(**{**manifest.__dict__, "files": dict(manifest.files)})
    doubled.files["w"] = [*manifest.files["w"], pb.ShardFile(table="w", file="extra", server=0,
                                                              block_runs=[1, 2, 1])]
    with pytest.raises(CheckpointError, match=r"table 'w': blocks \[1\] are in more than one"):
        ckpt.check_coverage(doubled)
    partial = ckpt.Manifest(**{**manifest.__dict__, "files": dict(manifest.files)})
    partial.files["emb"] = manifest.files["emb"][:1]
    with pytest.raises(CheckpointError, match=r"does not cover embedding table 'emb': it was "
                                              r"written by 2 servers; the rows of servers \[1\]"):
        ckpt.check_coverage(partial)
    shared = ckpt.Manifest(**{**manifest.__dict__, "files": dict(manifest.files)})
    shared.files["emb"] = [manifest.files["emb"][0],
                           pb.ShardFile(table="emb", file=manifest.files["w"][0].file, server=1)]
    with pytest.raises(CheckpointError, match="both name the file"):
        ckpt.check_coverage(shared)


def test_a_file_holding_other_blocks_than_its_entry_says_is_refused(tmp_path: Path) -> None:
    manifest = make_checkpoint(tmp_path, 1)
    shard = manifest.files["w"][0]
    tensors = {"blocks": np.array([1], np.int64)}
    with pytest.raises(CheckpointError, match=r"holds blocks \[1\]; the manifest says \[0\]"):
        ckpt.check_shard(shard, tensors, manifest.file_path(shard), 2)
    emb = manifest.files["emb"][0]
    with pytest.raises(CheckpointError, match=f"holds id {ID_OF[1]}, which is not in the rows "
                                              f"of server-0 of 2"):
        ckpt.check_shard(emb, {"ids": np.array([ID_OF[1]], np.uint64)}, Path("f"), 2)


def test_an_edited_manifest_is_refused_naming_the_file(tmp_path: Path, unrestorable) -> None:
    unrestorable(tmp_path / ckpt.checkpoint_dir_name(2))  # its manifest is edited below
    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 2, metadata={"epoch": 1})
    file = tmp_path / ckpt.checkpoint_dir_name(2) / ckpt.MANIFEST
    text = file.read_bytes()
    assert text.count(b'"epoch": 1') == 1
    file.write_bytes(text.replace(b'"epoch": 1', b'"epoch": 7'))  # same length, still JSON
    with pytest.raises(CheckpointError, match="the manifest was edited or is corrupt") as info:
        ckpt.read_manifest(file.parent)
    assert str(file) in str(info.value)
    manifest, notes = ckpt.latest(tmp_path)
    assert manifest is not None and manifest.version == 1
    assert len(notes) == 1 and "skipped checkpoint 2" in notes[0] and str(file) in notes[0]


def test_a_checkpoint_whose_manifest_was_deleted_is_skipped_with_a_note(
        tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 2)
    (tmp_path / ckpt.checkpoint_dir_name(2) / ckpt.MANIFEST).unlink()
    manifest, notes = ckpt.latest(tmp_path)
    assert manifest is not None and manifest.version == 1
    assert notes == [f"skipped checkpoint 2: {tmp_path / 'ckpt-0000000002'} has no MANIFEST.json "
                     f"(deleted, or not a complete checkpoint)"]
    assert ckpt.open_checkpoint(tmp_path).version == 1
    with pytest.raises(CheckpointError, match="is not a checkpoint: no MANIFEST.json"):
        ckpt.open_checkpoint(tmp_path / ckpt.checkpoint_dir_name(2))


def test_a_version_1_manifest_still_reads_its_coverage_from_the_files(tmp_path: Path) -> None:
    """Checkpoints written before manifests had checksums and coverage (format version 1, shard
    files named ``<table>-<crc32>``) are read: the names come from the manifest, the coverage
    from the files' block lists."""
    made = make_checkpoint(tmp_path, 1)
    directory = made.path
    for shard in made.files["w"] + made.files["emb"]:
        old = f"{shard.table}-{zlib.crc32(shard.table.encode()):08x}.s{shard.server}.safetensors"
        (directory / shard.file).rename(directory / old)
        shard.file = old

    def downgrade(body: dict) -> None:
        body["format_version"] = 1
        del body["checksum"]
        for entry in body["tables"]:
            for f in entry["files"]:
                del f["block_runs"]
                f["file"] = next(s.file for s in made.files[entry["spec"]["name"]]
                                 if s.server == f["server"])

    edit_manifest(tmp_path, 1, downgrade, reseal=False)
    read = ckpt.open_checkpoint(tmp_path)
    assert read.version == 1 and [list(f.block_runs) for f in read.files["w"]] == \
        [[0, 1, 1], [1, 2, 1]]
    tables = restore_all(read)
    out = np.empty(4, np.float32)
    tables["w"].read(0, out)
    np.testing.assert_array_equal(out, np.ones(4, np.float32))
