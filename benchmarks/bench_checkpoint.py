"""Checkpoint, restore and export cost, beside a plain write and torch.save of the same bytes.

State (default): about 1 GB of dense tables with Adam state (values and two moments: 83M
parameters in 4 tables) and 1M embedding rows of dim 64 with Adam, on 2 server processes. Measured,
in one run:

* hold: how long the cut held writes, as each server measured it (max over servers), and as a
  worker saw it: the slowest of a stream of small pushes issued during the checkpoints, beside the
  median push outside them;
* persist: state bytes / the time the servers took to write and fsync their shard files (plus the
  manifest), beside a plain sequential write of the same bytes (one file, write + fsync) and
  ``torch.save`` of the same arrays (+ fsync), both into the same directory;
* restore: a new job with ``--resume`` loading the checkpoint onto the servers (bytes / time), and
  the time the scheduler took to check the files' CRCs; beside ``torch.load`` of the torch.save file;
* export: time and size of the safetensors model file;
* overhead: the training throughput (samples/s) of the digits MLP job (2 servers, 2 workers) with
  ``--checkpoint-every 10`` against the same job without checkpoints, alternating runs.

Prints a table, or with ``--json`` one JSON object ending in ``"targets"``:
persist >= 0.8x the plain write; hold <= 100 ms per GB of state; overhead <= 2% at 10 s.

    python benchmarks/bench_checkpoint.py --json
    python benchmarks/bench_checkpoint.py --quick     # small state, short jobs (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_cluster import LocalCluster  # noqa: E402

import paramserver as ps  # noqa: E402
from paramserver import checkpoint as ckpt  # noqa: E402
from paramserver.export import export_checkpoint  # noqa: E402
from paramserver.shardfile import read_tensors  # noqa: E402

GB = 1e9
ROOT = Path(__file__).resolve().parent.parent


def build_state(client: ps.Client, dense_bytes: float, rows: int, dim: int) -> None:
    """Dense tables of ``dense_bytes`` state (Adam: 12 bytes per parameter) and ``rows``
    embedding rows, every one stepped once so the moments are not zero."""
    params = int(dense_bytes / 12)
    per_table = params // 4
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(per_table).astype(np.float32)
    for i in range(4):
        table = client.dense(f"dense{i}", (per_table,), ps.Adam(lr=1e-3))
        table.push(grad)
    emb = client.embedding("emb", dim, ps.Adam(lr=1e-3), init=ps.init.normal(0.0, 0.01))
    batch = 65536
    grads = rng.standard_normal((batch, dim)).astype(np.float32)
    for start in range(0, rows, batch):
        ids = np.arange(start, min(rows, start + batch), dtype=np.int64) * 7919 + 13
        emb.push(ids, grads[:len(ids)])
    client.dense("probe", (1024,), ps.SGD(lr=0.01))


def checkpoints_with_probe(client: ps.Client, count: int) -> dict[str, Any]:
    """Take ``count`` checkpoints while a thread pushes a small table in a loop; the probe's
    latencies during the checkpoints' snapshot phase show what a worker waits."""
    probe = client.table("probe")
    grad = np.ones(1024, np.float32)
    stop = threading.Event()
    calls: list[tuple[float, float]] = []

    def push_loop() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            probe.push(grad)
            calls.append((t0, time.perf_counter()))

    infos, windows = [], []
    thread = threading.Thread(target=push_loop)
    thread.start()
    try:
        time.sleep(0.5)
        for _ in range(count):
            t0 = time.perf_counter()
            infos.append(client.checkpoint({"bench": True}))
            windows.append((t0, time.perf_counter()))
            time.sleep(0.3)
    finally:
        stop.set()
        thread.join()

    def overlaps(call: tuple[float, float]) -> bool:
        return any(call[0] < w1 and call[1] > w0 for w0, w1 in windows)

    during = [c[1] - c[0] for c in calls if overlaps(c)]
    outside = [c[1] - c[0] for c in calls if not overlaps(c)]
    return {"infos": infos,
            "probe_push_max_ms_during": round(1e3 * max(during), 2) if during else None,
            "probe_push_median_ms_outside": round(1e3 * statistics.median(outside), 3)
            if outside else None,
            "probe_pushes_during": len(during)}


def _fsync_write(path: Path, arrays: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def peers_write(manifest: ckpt.Manifest, directory: Path, repeats: int) -> dict[str, Any]:
    """Plain write and torch.save of the same arrays into the same directory."""
    import torch

    arrays: dict[str, np.ndarray] = {}
    for name, files in manifest.files.items():
        for shard in files:
            tensors, _ = read_tensors(manifest.file_path(shard))
            for key, value in tensors.items():
                arrays[f"{shard.file}/{key}"] = np.array(value)  # into memory, like the servers'
    total = sum(a.nbytes for a in arrays.values())
    plain, saved, loaded = [], [], []
    for _ in range(repeats):
        target = directory / "plain.bin"
        plain.append(_fsync_write(target, list(arrays.values())))
        target.unlink()
        target = directory / "torch.pt"
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        t0 = time.perf_counter()
        with open(target, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        saved.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.load(target, weights_only=True)
        loaded.append(time.perf_counter() - t0)
        target.unlink()
    return {"bytes": total,
            "plain_write_GBps": round(total / statistics.median(plain) / GB, 3),
            "torch_save_GBps": round(total / statistics.median(saved) / GB, 3),
            "torch_load_GBps": round(total / statistics.median(loaded) / GB, 3)}


def restore(directory: Path, num_servers: int, timeout: float = 600.0) -> dict[str, Any]:
    """Start a job with --resume and wait until its tables are loaded."""
    t0 = time.perf_counter()
    with LocalCluster(num_servers, checkpoint_dir=str(directory), resume=True) as cluster:
        with ps.connect(cluster.address, timeout=timeout) as client:
            expected = len(ckpt.open_checkpoint(directory).tables)
            deadline = time.monotonic() + timeout
            while len(client.tables()) < expected:
                if time.monotonic() > deadline:
                    raise TimeoutError("restore did not finish")
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            status = client.status()["checkpoint"]
    return {"restore_s": status["restore_s"], "verify_s": status["verify_s"],
            "bytes": status["restore_bytes"],
            "restore_GBps": round(status["restore_bytes"] / status["restore_s"] / GB, 3),
            "job_start_to_ready_s": round(wall, 2)}


def training_overhead(epochs: int, every: float, repeats: int, workdir: Path) -> dict[str, Any]:
    """samples/s of the digits MLP with and without periodic checkpoints, alternating."""
    def run(checkpointing: bool) -> tuple[float, int]:
        directory = workdir / "train-ckpt"
        shutil.rmtree(directory, ignore_errors=True)
        extra = ["--checkpoint-dir", str(directory), "--checkpoint-every", str(every)] \
            if checkpointing else []
        proc = subprocess.run(
            [sys.executable, "-m", "paramserver", "launch", "--num-servers", "2",
             "--num-workers", "2", *extra, "--", sys.executable, str(ROOT / "examples/mlp.py"),
             "--dataset", "digits", "--epochs", str(epochs)],
            capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        line = next(x for x in proc.stdout.splitlines() if "RESULT " in x)
        result = json.loads(line.split("RESULT ", 1)[1])
        taken = len(ckpt.list_versions(directory)) if checkpointing else 0
        shutil.rmtree(directory, ignore_errors=True)
        return result["samples_per_second"], taken

    base, with_ckpt, counts = [], [], []
    for _ in range(repeats):
        base.append(run(False)[0])
        sps, taken = run(True)
        with_ckpt.append(sps)
        counts.append(taken)
    b, c = statistics.median(base), statistics.median(with_ckpt)
    return {"epochs": epochs, "interval_s": every, "baseline_samples_per_s": base,
            "checkpointing_samples_per_s": with_ckpt, "checkpoints_kept_per_run": counts,
            "baseline_median": b, "checkpointing_median": c,
            "overhead_pct": round(100 * (1 - c / b), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small state, short jobs")
    parser.add_argument("--dense-gb", type=float, default=1.0, help="dense state (GB, with Adam)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="peer writes and training runs")
    parser.add_argument("--epochs", type=int, default=500,
                        help="digits MLP epochs per training run (~40 s here)")
    parser.add_argument("--dir", help="directory to write into (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dense_gb, args.rows, args.checkpoints, args.repeats, args.epochs = 0.02, 20_000, 2, 1, 40
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    out: dict[str, Any] = {"benchmark": "checkpoint", "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "dir": "temporary"}}
    try:
        directory = work / "ckpt"
        with LocalCluster(args.servers, checkpoint_dir=str(directory), keep=1) as cluster:
            with ps.connect(cluster.address, timeout=600) as client:
                build_state(client, args.dense_gb * GB, args.rows, args.dim)
                run = checkpoints_with_probe(client, args.checkpoints)
        infos = run.pop("infos")
        state_bytes = statistics.median(i["bytes"] for i in infos)
        hold = statistics.median(i["hold_s"] for i in infos)
        persist = statistics.median(i["persist_s"] for i in infos)
        out["state"] = {"bytes": int(state_bytes), "dense_GB": args.dense_gb, "rows": args.rows,
                        "dim": args.dim, "servers": args.servers, "optimizer": "Adam"}
        out["checkpoint"] = {
            "count": len(infos),
            "hold_ms_per_checkpoint": [round(1e3 * i["hold_s"], 1) for i in infos],
            "hold_ms_median": round(1e3 * hold, 1),
            "snapshot_ms_median": round(1e3 * statistics.median(i["snapshot_s"] for i in infos), 1),
            "persist_s_median": round(persist, 3),
            "total_s_median": round(statistics.median(i["total_s"] for i in infos), 3),
            "persist_GBps": round(state_bytes / persist / GB, 3), **run}
        manifest = ckpt.open_checkpoint(directory)
        out["peers_write"] = peers_write(manifest, work, args.repeats)
        out["restore"] = restore(directory, args.servers)
        t0 = time.perf_counter()
        exported = export_checkpoint(manifest, work / "model.safetensors")
        out["export"] = {"seconds": round(time.perf_counter() - t0, 2),
                         "bytes": exported["bytes"],
                         "values_bytes": int(args.dense_gb * GB / 3) + args.rows * (args.dim * 4 + 8)}
        (work / "model.safetensors").unlink()
        out["overhead"] = training_overhead(args.epochs, 1.0 if args.quick else 10.0,
                                            args.repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = out["checkpoint"]["persist_GBps"] / out["peers_write"]["plain_write_GBps"]
    per_gb = out["checkpoint"]["hold_ms_median"] / (out["state"]["bytes"] / GB)
    out["targets"] = {
        "persist_vs_plain_write": {
            "paramserver_GBps": out["checkpoint"]["persist_GBps"],
            "plain_write_GBps": out["peers_write"]["plain_write_GBps"],
            "torch_save_GBps": out["peers_write"]["torch_save_GBps"],
            "ratio": round(ratio, 3), "goal": ">= 0.8", "met": ratio >= 0.8},
        "hold_ms_per_GB": {
            "hold_ms": out["checkpoint"]["hold_ms_median"],
            "state_GB": round(out["state"]["bytes"] / GB, 3), "ms_per_GB": round(per_gb, 1),
            "goal": "<= 100", "met": per_gb <= 100},
        "training_overhead": {
            "interval_s": out["overhead"]["interval_s"],
            "baseline_samples_per_s": out["overhead"]["baseline_median"],
            "checkpointing_samples_per_s": out["overhead"]["checkpointing_median"],
            "overhead_pct": out["overhead"]["overhead_pct"], "goal": "<= 2%",
            "met": out["overhead"]["overhead_pct"] <= 2.0},
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        c, p, r = out["checkpoint"], out["peers_write"], out["restore"]
        print(f"state {out['state']['bytes'] / GB:.2f} GB on {args.servers} servers")
        print(f"hold {c['hold_ms_median']} ms ({per_gb:.1f} ms/GB); worker push max "
              f"{c['probe_push_max_ms_during']} ms during, median "
              f"{c['probe_push_median_ms_outside']} ms outside")
        print(f"persist {c['persist_GBps']} GB/s; plain write {p['plain_write_GBps']} GB/s; "
              f"torch.save {p['torch_save_GBps']} GB/s")
        print(f"restore {r['restore_GBps']} GB/s ({r['restore_s']} s + verify {r['verify_s']} s);"
              f" torch.load {p['torch_load_GBps']} GB/s")
        print(f"export {out['export']['seconds']} s, {out['export']['bytes'] / GB:.3f} GB")
        o = out["overhead"]
        print(f"training overhead at {o['interval_s']} s: {o['overhead_pct']}% "
              f"({o['checkpointing_median']} vs {o['baseline_median']} samples/s)")
        for name, t in out["targets"].items():
            print(f"target {name}: {'met' if t['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
