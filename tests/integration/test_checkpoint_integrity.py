"""Checkpoints that never lie, with real scheduler and server processes: a server SIGKILLed before
any checkpoint comes back at version 0 and later checkpoints restore; table names that once shared
a shard file checkpoint apart; edited and deleted manifests are refused and skipped, said in the
log; a checkpoint that would not cover a table is refused.

Integer gradients with SGD(lr=1): every push adds exactly 1, so values are exact.
"""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver import checkpoint as ckpt
from paramserver.export import export_checkpoint, export_from_job, load_model
from paramserver.partition import server_of_ids
from paramserver.status import fetch_status
from tests.conftest import wait_for
from tests.integration.conftest import PS, kill, start_node


def element_owners(table) -> np.ndarray:
    """The server holding each element of a dense table (flat)."""
    layout = table._ref.layout
    return np.repeat(layout.block_servers, [len(range(*layout.block_range(b)))
                                            for b in range(len(layout.block_servers))])


def node(client: ps.Client, node_id: str) -> dict:
    return next(n for n in client.status()["nodes"] if n["node_id"] == node_id)


def restart_server(cluster, rank: int, tmp_path: Path) -> None:
    """SIGKILL server ``rank`` and start a new incarnation of it (as launch --max-restarts)."""
    kill(cluster.servers[rank])
    proc, _ = start_node(["server", "--scheduler", cluster.scheduler, "--rank", str(rank),
                          "--replace"], tmp_path / f"s{rank}-again.json",
                         tmp_path / f"s{rank}-again.log")
    cluster.servers.append(proc)


def plus_ones(values: np.ndarray, n: int) -> np.ndarray:
    """``values`` after ``n`` pushes of -1 with SGD(lr=1), rounded in float32 as the server
    rounds each step."""
    out = values.astype(np.float32, copy=True)
    for _ in range(n):
        out += np.float32(1)
    return out


GIVEN = np.arange(60_000, dtype=np.float32).reshape(300, 200)  # exact in float32
IDS = np.arange(200)
INIT = ps.init.uniform(-1.0, 1.0)


def test_a_server_killed_before_any_checkpoint_comes_back_at_version_0(cluster_factory,
                                                                       tmp_path):
    """Server 1 is SIGKILLed after 3 pushes, before any checkpoint, and restarted: its shards of
    a table initialized from given values, of a zeros table and of an embedding table are
    recreated as they began (a rollback to version 0, counted and reported), the job goes on,
    and a checkpoint taken afterwards restores exactly, by resume and by export."""
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)))
    with cluster.connect(timeout=30) as client:
        g = client.dense("g", GIVEN.shape, ps.SGD(lr=1.0), init=GIVEN, block_size=16384)
        z = client.dense("z", (50_000,), ps.SGD(lr=1.0), block_size=16384)
        e = client.embedding("e", 4, ps.SGD(lr=1.0), init=INIT, seed=5)

        def push() -> None:
            client.push({"g": -np.ones(GIVEN.shape, np.float32),
                         "z": -np.ones(50_000, np.float32),
                         "e": (IDS, -np.ones((len(IDS), 4), np.float32))})

        for _ in range(3):
            push()
        wait_for(lambda: fetch_status(cluster.scheduler)["servers"][1]["push_requests"] >= 3, 30,
                 "a heartbeat carrying server-1's 3 pushes")
        assert ckpt.list_versions(directory) == []  # no checkpoint: only the initial values
        restart_server(cluster, 1, tmp_path)
        wait_for(lambda: "rollback to version 0" in node(client, "server-1")["restore_state"],
                 60, "server-1 to be recreated at version 0")
        for _ in range(2):
            push()
        on_1 = element_owners(g) == 1
        values = g.pull().reshape(-1)
        flat = GIVEN.reshape(-1)
        assert on_1.any() and (~on_1).any()
        np.testing.assert_array_equal(values[on_1], flat[on_1] + 2)
        np.testing.assert_array_equal(values[~on_1], flat[~on_1] + 5)
        zeros = z.pull()
        z_on_1 = element_owners(z) == 1
        assert (zeros[z_on_1] == 2).all() and (zeros[~z_on_1] == 5).all()
        rows = e.pull(IDS)
        start = INIT((len(IDS), 4), seed=5)
        e_on_1 = server_of_ids(IDS.astype(np.uint64), 2) == 1
        np.testing.assert_array_equal(rows[e_on_1], plus_ones(start[e_on_1], 2))
        np.testing.assert_array_equal(rows[~e_on_1], plus_ones(start[~e_on_1], 5))
        state = node(client, "server-1")
        assert state["restore_state"] == \
            "recreated from initial values (rollback to version 0): e, g, z"
        assert state["restarts"] == 1 and state["rolled_back"] >= 3
        info = client.checkpoint({"after": "restart"})
        expected = {"g": g.pull(), "z": z.pull(), "e": e.pull(IDS)}
    cluster.stop()
    log = (cluster.log_dir / "scheduler.log").read_text()
    assert "server-1 recreated tables ['e', 'g', 'z'] from their initial values" in log
    model = load_model(export_checkpoint(ckpt.open_checkpoint(info["path"]),
                                         tmp_path / "m.safetensors")["path"])
    np.testing.assert_array_equal(model["g"], expected["g"])
    np.testing.assert_array_equal(model["z"], expected["z"])
    order = np.argsort(model["e.ids"])
    np.testing.assert_array_equal(model["e.ids"][order], IDS.astype(np.uint64))
    np.testing.assert_array_equal(model["e.rows"][order], expected["e"])
    resumed = cluster_factory(1, scheduler_args=("--checkpoint-dir", str(directory), "--resume"))
    with resumed.connect(timeout=30) as client:
        assert client.restored_metadata == {"after": "restart"}
        np.testing.assert_array_equal(client.table("g").pull(), expected["g"])
        np.testing.assert_array_equal(client.table("z").pull(), expected["z"])
        np.testing.assert_array_equal(client.table("e").pull(IDS, create=False), expected["e"])


def test_a_restarted_server_without_checkpoint_dir_recreates_what_it_can(cluster, tmp_path):
    """Without a checkpoint directory the given initial values of 'w' were not saved: server 1's
    shard of it is lost (refused, named), the zeros table 'z' is recreated at version 0, and a
    checkpoint (here by export, into a temporary directory) is refused rather than written
    without 'w' on server 1."""
    with cluster.connect(timeout=15) as client:
        w = client.dense("w", (100_000,), ps.SGD(lr=1.0), init=np.ones(100_000, np.float32))
        z = client.dense("z", (100_000,), ps.SGD(lr=1.0))
        client.push({"w": -np.ones(100_000, np.float32), "z": -np.ones(100_000, np.float32)})
        restart_server(cluster, 1, tmp_path)
        # The client follows the view to the new address; the new server names what it lost.
        with pytest.raises(ps.TableNotFoundError,
                           match=r"table 'w' was lost on server-1.*initial values it was given "
                                 r"were not saved"):
            w.pull()
        z.push(-np.ones(100_000, np.float32))  # the job goes on
        on_1 = element_owners(z) == 1
        values = z.pull()
        assert (values[on_1] == 1).all() and (values[~on_1] == 2).all()
        assert node(client, "server-1")["restore_state"] == \
            "recreated from initial values (rollback to version 0): z; lost: w"
        with pytest.raises(ps.CheckpointError,
                           match=r"does not cover table 'w': no file holds blocks \[\d"):
            export_from_job(client, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    assert not [p for p in tmp_path.rglob("MANIFEST.json")]


COLLIDING = ("emb_" + "x" * 60 + "_a90a2", "emb_" + "x" * 60 + "_f10090")


def test_tables_whose_names_once_shared_a_file_checkpoint_restore_and_export(cluster_factory,
                                                                             tmp_path):
    a, b = COLLIDING
    # The pair the earlier names (cut to 64 characters, plus a CRC-32) sent to one file.
    assert a[:64] == b[:64] and zlib.crc32(a.encode()) == zlib.crc32(b.encode())
    directory = tmp_path / "ckpt"
    first = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)))
    with first.connect() as client:
        ta = client.dense(a, (40_000,), ps.SGD(lr=1.0), block_size=16384)
        tb = client.dense(b, (40_000,), ps.SGD(lr=1.0), block_size=16384,
                          init=np.full(40_000, 10, np.float32))
        ta.push(-np.ones(40_000, np.float32))
        tb.push(-np.full(40_000, 3, np.float32))
        info = client.checkpoint()
    first.stop()
    manifest = ckpt.open_checkpoint(info["path"])
    names = [f.file for files in manifest.files.values() for f in files]
    assert len(names) == len(set(names)) == 4  # each table on both servers, four files
    assert sorted(p.name for p in Path(info["path"]).glob("*.safetensors")) == sorted(names)
    model = load_model(export_checkpoint(manifest, tmp_path / "m.safetensors")["path"])
    np.testing.assert_array_equal(model[a], np.full(40_000, 1, np.float32))
    np.testing.assert_array_equal(model[b], np.full(40_000, 13, np.float32))
    second = cluster_factory(1, scheduler_args=("--checkpoint-dir", str(directory), "--resume"))
    with second.connect() as client:
        np.testing.assert_array_equal(client.table(a).pull(), np.full(40_000, 1, np.float32))
        np.testing.assert_array_equal(client.table(b).pull(), np.full(40_000, 13, np.float32))


def test_an_edited_manifest_is_refused_and_a_deleted_one_skipped_with_the_log_line(
        cluster_factory, tmp_path, unrestorable):
    directory = tmp_path / "ckpt"
    first = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)))
    with first.connect() as client:
        x = client.dense("x", (50_000,), ps.SGD(lr=1.0))
        infos = []
        for epoch in (1, 2, 3):
            x.push(-np.ones(50_000, np.float32))
            infos.append(client.checkpoint({"epoch": epoch}))
    first.stop()
    edited = Path(infos[2]["path"]) / ckpt.MANIFEST
    unrestorable(edited.parent)
    text = edited.read_bytes()
    assert text.count(b'"epoch": 3') == 1
    edited.write_bytes(text.replace(b'"epoch": 3', b'"epoch": 9'))  # still valid JSON
    deleted = Path(infos[1]["path"]) / ckpt.MANIFEST
    deleted.unlink()
    proc = subprocess.run(PS + ["export", "--checkpoint", str(edited.parent), "--out",
                                str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"{edited}: the manifest was edited or is corrupt" in proc.stderr
    second = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory), "--resume"))
    with second.connect() as client:
        assert client.restored_version == 1 and client.restored_metadata == {"epoch": 1}
        np.testing.assert_array_equal(client.dense("x", (50_000,), ps.SGD(lr=1.0)).pull(),
                                      np.ones(50_000, np.float32))
        notes = client.status()["checkpoint"]["restore_notes"]
    assert len(notes) == 2
    assert notes[0].startswith("skipped checkpoint 3") and str(edited) in notes[0]
    assert notes[1] == (f"skipped checkpoint 2: {deleted.parent} has no MANIFEST.json (deleted, "
                        f"or not a complete checkpoint)")
    log = (second.log_dir / "scheduler.log").read_text()
    assert f"resume: skipped checkpoint 2: {deleted.parent} has no MANIFEST.json" in log
    assert "resume: skipped checkpoint 3" in log and "falling back to checkpoint 1" in log


def test_given_values_that_cannot_be_saved_fail_the_declaration(cluster_factory, tmp_path):
    """Servers may write files of at most 256 KiB (RLIMIT_FSIZE): the given values of a table
    of 400,000 elements cannot be saved, so its declaration fails naming the reason and the
    table is not created; a small one is saved and declared."""
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)),
                              server_file_size_limit=256 * 1024)
    with cluster.connect() as client:
        with pytest.raises(ps.CheckpointError, match=r"initial values of table 'big'.*"
                                                     r"server-\d.*File too large"):
            client.dense("big", (400_000,), ps.SGD(lr=1.0), init=np.ones(400_000, np.float32))
        assert "big" not in client.tables()
        small = client.dense("small", (1000,), ps.SGD(lr=1.0), init=np.full(1000, 4, np.float32))
        np.testing.assert_array_equal(small.pull(), np.full(1000, 4, np.float32))
    entries = sorted((directory / "initial").iterdir())
    assert [e.name for e in entries] == ["table-0000000001"]  # the failed one left nothing
    assert sorted(ckpt.read_manifest(entries[0]).tables) == ["small"]


def test_a_restarted_server_never_takes_an_earlier_jobs_checkpoint(cluster_factory, tmp_path):
    """Job A leaves a checkpoint of 'x' in the directory; job B (fresh, same directory, same
    table spec, other initial values) loses server 1 before its own first checkpoint: server 1
    comes back with B's initial values, not A's checkpoint."""
    directory = tmp_path / "ckpt"
    first = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)))
    with first.connect() as client:
        client.dense("x", (50_000,), ps.SGD(lr=1.0), init=np.full(50_000, 100, np.float32))
        client.checkpoint()
    first.stop()
    second = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(directory)))
    with second.connect(timeout=30) as client:
        x = client.dense("x", (50_000,), ps.SGD(lr=1.0), init=np.full(50_000, 7, np.float32))
        x.push(-np.ones(50_000, np.float32))
        restart_server(second, 1, tmp_path)
        wait_for(lambda: "rollback to version 0" in node(client, "server-1")["restore_state"],
                 60, "server-1 to be recreated at version 0")
        x.push(-np.ones(50_000, np.float32))
        on_1 = element_owners(x) == 1
        values = x.pull()
        assert (values[on_1] == 8).all() and (values[~on_1] == 9).all()
