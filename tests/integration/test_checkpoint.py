"""Checkpoints, resume and export with real scheduler and server processes on loopback.

Gradients are seeded float32 (exactness is checked bit for bit against an uninterrupted run) or
integers with SGD(lr=1) (every push adds exactly 1, so a checkpoint's consistency is visible as
every element holding the same count).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver import checkpoint as ckpt
from paramserver.export import export_checkpoint, load_model
from paramserver.status import fetch_status
from tests.conftest import wait_for
from tests.integration.conftest import PS, kill, spawn_worker

SHAPE = (300, 700)        # 210,000 elements: 13 blocks of 16Ki, on every server
IDS = 600                 # embedding ids drawn from [0, IDS)


def ckpt_args(directory: Path, *more: str) -> tuple[str, ...]:
    return ("--checkpoint-dir", str(directory), *more)


def declare(client: ps.Client, optimizer: ps.Optimizer, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = client.dense("w", SHAPE, optimizer, init=rng.standard_normal(SHAPE).astype(np.float32),
                     block_size=16384)
    e = client.embedding("e", 16, optimizer, init=ps.init.normal(0.0, 0.1), seed=7)
    return w, e


def step(client: ps.Client, t: int) -> None:
    """Training step t: the same gradients whatever process or job runs it."""
    rng = np.random.default_rng(1000 + t)
    ids = rng.integers(0, IDS, size=256)  # with duplicates
    client.push({"w": rng.standard_normal(SHAPE).astype(np.float32),
                 "e": (ids, rng.standard_normal((256, 16)).astype(np.float32))})


def final_values(client: ps.Client) -> tuple[np.ndarray, np.ndarray]:
    return client.table("w").pull(), client.table("e").pull(np.arange(IDS), create=False)


@pytest.mark.parametrize("optimizer", [ps.SGD(lr=0.05, momentum=0.9), ps.Adam(lr=0.01)],
                         ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("servers", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(cluster_factory, tmp_path, optimizer,
                                                         servers):
    before, after = servers
    directory = tmp_path / "ckpt"
    first = cluster_factory(before, scheduler_args=ckpt_args(directory))
    with first.connect() as client:
        declare(client, optimizer)
        for t in range(5):
            step(client, t)
        info = client.checkpoint({"step": 5, "note": "mid-run"})
        assert info["version"] == 1 and Path(info["path"]).name == "ckpt-0000000001"
        for t in range(5, 10):
            step(client, t)
        expected_w, expected_e = final_values(client)
    first.stop()

    second = cluster_factory(after, scheduler_args=ckpt_args(directory, "--resume"))
    with second.connect() as client:
        assert client.restored_metadata == {"step": 5, "note": "mid-run"}
        assert client.restored_version == 1
        # The init is ignored for a restored table (a different one would show in the values).
        w, e = declare(client, optimizer, seed=99)
        for t in range(5, 10):
            step(client, t)
        got_w, got_e = final_values(client)
    np.testing.assert_array_equal(got_w, expected_w)
    np.testing.assert_array_equal(got_e, expected_e)


def test_fresh_job_has_empty_restored_metadata_and_checkpoint_needs_a_directory(cluster):
    with cluster.connect() as client:
        assert client.restored_metadata == {} and client.restored_version == 0
        client.dense("x", 10, ps.SGD(lr=1.0))
        with pytest.raises(ps.CheckpointError, match="no checkpoint directory"):
            client.checkpoint()
        with pytest.raises(ps.InvalidRequestError, match="JSON"):
            client.checkpoint({"bad": object()})
        assert client.status()["checkpoint"]["last_version"] == 0


_PUSHER = """
import os, sys, numpy as np, paramserver as ps
stop = STOP
with ps.connect(timeout=60, message_bytes=64 * 1024) as c:
    c.dense("c", (200_000,), ps.SGD(lr=1.0), block_size=16384)
    c.embedding("r", 8, ps.SGD(lr=1.0))
    ids = np.arange(64, dtype=np.int64)
    minus = {"c": -np.ones(200_000, np.float32), "r": (ids, -np.ones((64, 8), np.float32))}
    n = 0
    while not os.path.exists(stop):
        c.push(minus)
        n += 1
    print(n)
"""


def test_checkpoints_are_consistent_cuts_under_concurrent_multi_server_pushes(
        cluster_factory, tmp_path):
    """Every push adds 1 to all 200,000 elements (13 blocks on 2 servers, many messages each) and
    to 64 embedding rows on both servers. In a consistent cut every element holds the same count."""
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, 2, scheduler_args=ckpt_args(directory, "--keep", "0"))
    stop = tmp_path / "stop"
    code = _PUSHER.replace("STOP", repr(str(stop)))
    workers = [spawn_worker(cluster, code, rank, 2) for rank in range(2)]

    def checkpoint() -> dict:
        proc = subprocess.run(PS + ["checkpoint", "--scheduler", cluster.scheduler, "--json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    try:
        wait_for(lambda: min(s["push_requests"] for s in
                             fetch_status(cluster.scheduler)["servers"]) >= 200, 90,
                 "the pushers to get going")
        infos = [checkpoint() for _ in range(4)]
    finally:
        stop.touch()
        counts = [int(w.communicate(timeout=60)[0].split()[-1]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    seen = []
    for info in infos:
        model = load_model(export_checkpoint(ckpt.open_checkpoint(info["path"]),
                                             tmp_path / f"m{info['version']}.safetensors")["path"])
        c, rows = model["c"], model["r.rows"]
        k = c[0]
        assert k > 0 and k == int(k)
        assert (c == k).all(), f"checkpoint {info['version']}: dense counts differ {np.unique(c)}"
        assert (rows == k).all(), f"checkpoint {info['version']}: rows {np.unique(rows)} vs {k}"
        assert len(model["r.ids"]) == 64
        seen.append(k)
    assert seen == sorted(seen) and seen[-1] <= sum(counts)
    assert [i["version"] for i in infos] == [1, 2, 3, 4]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(cluster_factory, tmp_path,
                                                                  unrestorable):
    directory = tmp_path / "ckpt"
    first = cluster_factory(2, scheduler_args=ckpt_args(directory))
    with first.connect() as client:
        x = client.dense("x", (50_000,), ps.SGD(lr=1.0))
        x.push(-np.ones(50_000, np.float32))
        v1 = client.checkpoint({"epoch": 1})
        x.push(-np.ones(50_000, np.float32))
        v2 = client.checkpoint({"epoch": 2})
    first.stop()
    unrestorable(v2["path"])  # one of its bytes is flipped below
    shard = sorted(Path(v2["path"]).glob("x-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the values
    shard.write_bytes(bytes(data))

    second = cluster_factory(2, scheduler_args=ckpt_args(directory, "--resume"))
    with second.connect() as client:
        assert client.restored_version == v1["version"]
        assert client.restored_metadata == {"epoch": 1}
        x = client.dense("x", (50_000,), ps.SGD(lr=1.0))
        np.testing.assert_array_equal(x.pull(), np.ones(50_000, np.float32))
        notes = client.status()["checkpoint"]["restore_notes"]
    assert len(notes) == 1 and "skipped checkpoint 2" in notes[0] and "corrupt" in notes[0] \
        and shard.name in notes[0]
    log = (second.log_dir / "scheduler.log").read_text()
    assert "skipped checkpoint 2" in log and "falling back to checkpoint 1" in log


def test_resume_refuses_a_declaration_that_disagrees_with_the_checkpoint(cluster_factory,
                                                                          tmp_path):
    directory = tmp_path / "ckpt"
    first = cluster_factory(1, scheduler_args=ckpt_args(directory))
    with first.connect() as client:
        client.dense("w", (10, 10), ps.Adam(lr=0.01))
        client.checkpoint()
    first.stop()
    second = cluster_factory(1, scheduler_args=ckpt_args(directory, "--resume"))
    with second.connect() as client:
        with pytest.raises(ps.TableMismatchError,
                           match=r"'w' was restored from checkpoint 1 as dense \(10, 10\).*"
                                 r"declared as dense \(10, 11\)"):
            client.dense("w", (10, 11), ps.Adam(lr=0.01))
        with pytest.raises(ps.TableMismatchError, match="restored from checkpoint 1"):
            client.dense("w", (10, 10), ps.SGD(lr=0.01))
        # The right declaration still attaches, and the state is unchanged.
        np.testing.assert_array_equal(client.dense("w", (10, 10), ps.Adam(lr=0.01)).pull(),
                                      np.zeros((10, 10), np.float32))


def test_full_disk_fails_the_checkpoint_and_loses_nothing(cluster_factory, tmp_path):
    """Servers may write files of at most 256 KiB (RLIMIT_FSIZE): a small table checkpoints, a
    large one makes the servers' writes fail with EFBIG."""
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, scheduler_args=ckpt_args(directory),
                              server_file_size_limit=256 * 1024)
    with cluster.connect() as client:
        small = client.dense("small", (1000,), ps.SGD(lr=1.0))
        small.push(-np.ones(1000, np.float32))
        first = client.checkpoint({"ok": True})
        big = client.dense("big", (400_000,), ps.SGD(lr=1.0))
        big.push(-np.ones(400_000, np.float32))
        with pytest.raises(ps.CheckpointError, match=r"server-\d.*File too large"):
            client.checkpoint({"ok": False})
        # The job runs on, unchanged, and the previous checkpoint is complete and usable.
        big.push(-np.ones(400_000, np.float32))
        np.testing.assert_array_equal(big.pull(), np.full(400_000, 2, np.float32))
        status = client.status()["checkpoint"]
        assert status["last_version"] == 1 and "File too large" in status["last_error"]
    assert ckpt.list_versions(directory) == [1]
    assert sorted(p.name for p in directory.iterdir()) == [Path(first["path"]).name,
                                                           "scheduler-state.json"]
    manifest = ckpt.open_checkpoint(directory)
    assert manifest.version == 1 and sorted(manifest.tables) == ["small"]


def test_checkpoint_dir_that_is_not_writable_is_refused_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run(PS + ["scheduler", "--port", "0", "--num-servers", "1",
                                "--checkpoint-dir", str(blocker / "ckpt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"checkpoint directory {blocker / 'ckpt'} is not writable" in proc.stderr


def test_directory_removed_under_a_running_job_fails_the_checkpoint_only(cluster_factory,
                                                                         tmp_path):
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(1, scheduler_args=ckpt_args(directory))
    with cluster.connect() as client:
        x = client.dense("x", 100, ps.SGD(lr=1.0))
        client.checkpoint()
        directory.rename(tmp_path / "moved")
        directory.write_text("now a file")
        with pytest.raises(ps.CheckpointError, match=f"{directory} is not writable"):
            client.checkpoint()
        x.push(-np.ones(100, np.float32))
        np.testing.assert_array_equal(x.pull(), np.ones(100, np.float32))


def test_scheduler_killed_mid_checkpoint_leaves_the_previous_one_complete(cluster_factory,
                                                                          tmp_path):
    """Server 1 is stopped (SIGSTOP), so the second checkpoint stalls after its temporary
    directory exists; the scheduler is then killed (SIGKILL) in the middle of it."""
    directory = tmp_path / "ckpt"
    first = cluster_factory(2, scheduler_args=ckpt_args(directory))
    with first.connect(timeout=10) as client:
        x = client.dense("x", (1_000_000,), ps.Adam(lr=0.1))
        x.push(np.ones(1_000_000, np.float32))
        client.checkpoint({"v": 1})
        saved = x.pull()
        x.push(np.ones(1_000_000, np.float32))
        errors: list[BaseException] = []

        def second_checkpoint() -> None:
            try:
                client.checkpoint({"v": 2})
            except BaseException as exc:  # the scheduler is killed under it
                errors.append(exc)

        os.kill(first.servers[1].pid, signal.SIGSTOP)
        try:
            thread = threading.Thread(target=second_checkpoint)
            thread.start()
            wait_for(lambda: any(p.name.startswith(".ckpt-") for p in directory.iterdir()), 60,
                     "the second checkpoint's temporary directory")
            kill(first.scheduler_proc)
            thread.join(60)
        finally:
            os.kill(first.servers[1].pid, signal.SIGCONT)
        assert not thread.is_alive() and isinstance(errors[0], ps.ParamServerError)
    first.stop()
    assert ckpt.list_versions(directory) == [1]
    assert ckpt.open_checkpoint(directory).metadata == {"v": 1}
    second = cluster_factory(1, scheduler_args=ckpt_args(directory, "--resume"))
    with second.connect() as client:
        assert client.restored_metadata == {"v": 1}
        np.testing.assert_array_equal(client.dense("x", (1_000_000,), ps.Adam(lr=0.1)).pull(),
                                      saved)
    assert not [p for p in directory.iterdir() if p.name.startswith(".ckpt-")]


def test_any_client_reads_any_table_and_lookups_never_create_rows(cluster):
    with cluster.connect() as owner:
        w = owner.dense("w", (3, 4), ps.Adagrad(lr=0.1), init=np.arange(12.0).reshape(3, 4))
        e = owner.embedding("e", 5, ps.Adam(lr=0.1), init=ps.init.uniform(-1.0, 1.0), seed=3)
        e.push(np.array([1, 2, 3]), np.ones((3, 5), np.float32))
        with cluster.connect() as reader:
            tables = reader.tables()
            assert tables["w"]["shape"] == [3, 4] and tables["w"]["kind"] == "dense"
            assert tables["e"]["dim"] == 5 and tables["e"]["optimizer"]["name"] == "Adam"
            np.testing.assert_array_equal(reader.table("w").pull(), w.pull())
            re = reader.table("e")
            ids = np.array([[1, 2], [3, 10**12]])
            rows = re.pull(ids, create=False)
            assert rows.shape == (2, 2, 5) and e.num_rows() == 3
            np.testing.assert_array_equal(rows[0], e.pull(np.array([1, 2])))
            fresh = np.empty((1, 5), np.float32)
            ps._core.initialize_rows(ps.init.uniform(-1.0, 1.0).to_config(), 3,
                                     np.array([10**12], np.uint64), fresh)
            np.testing.assert_array_equal(rows[1, 1], fresh[0])
            assert e.num_rows() == 3  # still: nothing was created
            with pytest.raises(ps.TableNotFoundError, match=r"no ready table 'nope'.*'e', 'w'"):
                reader.table("nope")


_TRAIN = """
import json, numpy as np, paramserver as ps
with ps.connect() as c:
    start = c.restored_metadata.get("epoch", 0)
    x = c.dense("x", (1000,), ps.SGD(lr=1.0))
    for epoch in range(start, start + 3):
        x.push(-np.ones(1000, np.float32))
        c.barrier("epoch")
        if c.rank == 0:
            c.checkpoint({"epoch": epoch + 1})
        c.barrier("saved")
    if c.rank == 0:
        print("RESULT", json.dumps({"start": start, "x": float(x.pull()[0]),
                                    "version": c.restored_version}))
"""


def test_launch_checkpoints_and_resumes_a_job(tmp_path):
    directory = tmp_path / "ckpt"
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)

    def run(*extra: str) -> dict:
        proc = subprocess.run(PS + ["launch", "--num-servers", "2", "--num-workers", "2",
                                    "--checkpoint-dir", str(directory), *extra, "--",
                                    sys.executable, str(script)],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "final checkpoint" in proc.stdout
        line = next(line for line in proc.stdout.splitlines() if "RESULT " in line)
        return json.loads(line.split("RESULT ", 1)[1])

    first = run("--keep", "2")
    # 2 workers x 3 epochs of +1; checkpoints 1-3 by rank 0, then the launcher's final one.
    assert first == {"start": 0, "x": 6.0, "version": 0}
    assert ckpt.list_versions(directory) == [3, 4]
    second = run("--resume", "--keep", "2")
    assert second == {"start": 3, "x": 12.0, "version": 4}
    assert ckpt.open_checkpoint(directory).metadata == {"epoch": 6}


def test_cli_checkpoint_and_export_of_a_running_job(cluster_factory, tmp_path, unrestorable):
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, scheduler_args=ckpt_args(directory))
    with cluster.connect() as client:
        w = client.dense("w", (20, 30), ps.Adam(lr=0.1), init=np.ones((20, 30)))
        e = client.embedding("user", 4, ps.Adagrad(lr=0.5))
        w.push(np.ones((20, 30), np.float32))
        e.push(np.array([5, 9, 2**40]), np.ones((3, 4), np.float32))
        proc = subprocess.run(PS + ["checkpoint", "--scheduler", cluster.scheduler, "--json",
                                    "--metadata", '{"epoch": 4}'],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["version"] == 1 and info["bytes"] > 0 and info["hold_s"] >= 0
        out = tmp_path / "model.safetensors"
        proc = subprocess.run(PS + ["export", "--scheduler", cluster.scheduler, "--out", str(out),
                                    "--with-optimizer-state", "--json"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["version"] == 2
        expected_w, expected_rows = w.pull(), e.pull(np.array([5, 9, 2**40]))
    from safetensors.numpy import load_file
    model = load_file(str(out))  # readable without paramserver
    np.testing.assert_array_equal(model["w"], expected_w)
    np.testing.assert_array_equal(model["user.ids"], np.array([5, 9, 2**40], np.uint64))
    np.testing.assert_array_equal(model["user.rows"], expected_rows)
    assert model["w.exp_avg"].shape == (20, 30) and model["user.sum"].shape == (3, 4)
    np.testing.assert_array_equal(model["user.steps"], [1, 1, 1])
    # Export from the checkpoint, without a job; bad versions and manifests are named.
    out2 = tmp_path / "from-ckpt.safetensors"
    proc = subprocess.run(PS + ["export", "--checkpoint", str(directory), "--version", "1",
                                "--out", str(out2)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(load_model(out2)["w"], expected_w)
    assert "w.exp_avg" not in load_model(out2)
    proc = subprocess.run(PS + ["export", "--checkpoint", str(directory), "--version", "9",
                                "--out", str(out2)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "checkpoint version 9 does not exist" in proc.stderr and "[1, 2]" in proc.stderr
    manifest = directory / "ckpt-0000000001" / "MANIFEST.json"
    unrestorable(manifest.parent)  # its manifest is replaced, and a file of 2 truncated, below
    unrestorable(directory / "ckpt-0000000002")
    manifest.write_text(json.dumps({"format": "something-else"}))
    proc = subprocess.run(PS + ["export", "--checkpoint", str(manifest.parent), "--out",
                                str(out2)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"{manifest} is not a paramserver checkpoint manifest" in proc.stderr
    shard = next((directory / "ckpt-0000000002").glob("user-*.s0.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = subprocess.run(PS + ["export", "--checkpoint", str(directory / "ckpt-0000000002"),
                                "--out", str(out2)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"{shard}" in proc.stderr and "truncated" in proc.stderr


def test_periodic_checkpoints_keep_the_newest_and_carry_the_last_metadata(cluster_factory,
                                                                          tmp_path):
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(1, scheduler_args=ckpt_args(directory, "--checkpoint-every",
                                                          "0.3", "--keep", "2"))
    with cluster.connect() as client:
        x = client.dense("x", 10, ps.SGD(lr=1.0))
        client.checkpoint({"epoch": 7})
        x.push(-np.ones(10, np.float32))
        start = client.status()["checkpoint"]["completed"]
        wait_for(lambda: client.status()["checkpoint"]["completed"] >= start + 3, 60,
                 "three periodic checkpoints")
    versions = ckpt.list_versions(directory)
    assert len(versions) == 2 and versions[-1] >= 4
    manifest = ckpt.open_checkpoint(directory)
    assert manifest.metadata == {"epoch": 7}
    assert sorted(manifest.tables) == ["x"]


def test_status_cli_shows_checkpoints(cluster_factory, tmp_path):
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(1, scheduler_args=ckpt_args(directory))
    with cluster.connect() as client:
        client.dense("x", 10, ps.SGD(lr=1.0))
        client.checkpoint()
    proc = subprocess.run(PS + ["status", "--scheduler", cluster.scheduler], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"dir {directory}" in proc.stdout and "last version 1" in proc.stdout


def test_held_writes_never_hold_server_threads(cluster_factory, tmp_path):
    """While a cut holds writes, a flood of pushes from many threads is refused and retried
    (not parked on the server's 16 handler threads), so the cut's own calls always get through."""
    directory = tmp_path / "ckpt"
    cluster = cluster_factory(2, scheduler_args=ckpt_args(directory))
    with cluster.connect() as client:
        x = client.dense("x", (100_000,), ps.SGD(lr=1.0))
        stop = threading.Event()
        pushes = [0] * 24

        def hammer(i: int) -> None:
            while not stop.is_set():
                x.push(-np.ones(100_000, np.float32))
                pushes[i] += 1

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        try:
            infos = [client.checkpoint() for _ in range(3)]
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert [i["version"] for i in infos] == [1, 2, 3]
        np.testing.assert_array_equal(x.pull(), np.full(100_000, sum(pushes), np.float32))
    for info in infos:
        model = load_model(export_checkpoint(ckpt.open_checkpoint(info["path"]),
                                             tmp_path / "m.safetensors")["path"])
        assert len(np.unique(model["x"])) == 1


def test_sigterm_to_launch_takes_a_final_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    script = tmp_path / "forever.py"
    script.write_text("import time, numpy as np, paramserver as ps\n"
                      "c = ps.connect()\n"
                      "x = c.dense('x', 10, ps.SGD(lr=1.0))\n"
                      "x.push(-np.ones(10, np.float32))\n"
                      "print('pushed', flush=True)\n"
                      "time.sleep(600)\n")
    proc = subprocess.Popen(PS + ["launch", "--checkpoint-dir", str(directory), "--",
                                  sys.executable, str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if "pushed" in line:
                break
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted: final checkpoint 1" in out
    model = load_model(export_checkpoint(ckpt.open_checkpoint(directory),
                                         tmp_path / "m.safetensors")["path"])
    np.testing.assert_array_equal(model["x"], np.ones(10, np.float32))
