"""Training step throughput under the job's consistency model, beside torch DDP (gloo) on CPU.

paramserver: one dense float32 table of N parameters (``ps.SGD(lr=0.01)``) on 2 server processes,
W worker processes, under the consistency models ``async``, ``ssp:1``, ``ssp:4`` and ``bsp`` (the
scheduler's ``sync`` setting; a fresh job for each). A step is one ``push_pull`` of a fixed random
float32 gradient of N values: the servers apply it (in BSP, the mean of every worker's gradient,
once per step) and return the new values.

The peer, measured in the same run, interleaved size by size and worker count by worker count:
``torch.nn.parallel.DistributedDataParallel`` with the gloo backend on CPU, W processes, a model
that is a single ``nn.Parameter`` of N floats. A step is a forward that touches every parameter
(``dot(p, x)``), the backward (DDP all-reduces the N-float gradient) and ``torch.optim.SGD(lr=0.01)``
``.step()``; ``gradient_as_bucket_view=True`` (no copy between the gradient and the all-reduce
bucket: 5-15% faster here at 16M). Each DDP process uses cpus // W torch threads (at least 1).

Both are timed the same way: every process does a few untimed steps after a barrier, then a fixed
number of timed steps. ``steps_per_s`` is the per-worker step rate of the job: timed steps / (last
worker's end - first worker's start); in BSP every worker does one push_pull per step, so it is the
job's step rate. ``step_ms`` is its inverse; ``per_worker_steps_per_s`` are each worker's own
rates (they differ in async and SSP).

Results are checked after timing: the final values must be -lr * steps * the sum of the workers'
gradients (async, SSP: every push is applied), their mean (DDP), or either (BSP; which one is
reported as ``gradients_combined``).

N is 1M and 16M (2^20 and 2^24), W is 2 and 4. Every process started here is stopped on every
path. Figures on a shared 2-core machine swing by tens of percent: compare within a run.

Prints a table on stderr and, with ``--json``, one JSON object on stdout ending in ``"targets"``:
BSP step time <= 1.5x DDP-gloo's at 16M parameters and 2 workers (stretch: <= 1.0x).

    python benchmarks/bench_sync.py --json
    python benchmarks/bench_sync.py --quick --json                  # few steps (~2 min)
    python benchmarks/bench_sync.py --modes async,bsp --sizes 16M --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_cluster import LocalCluster, run_processes  # noqa: E402  (not a package)

import paramserver as ps  # noqa: E402
from paramserver.sync import Consistency  # noqa: E402

M = 1 << 20
MODES = ("async", "ssp:1", "ssp:4", "bsp")
SIZES = (M, 16 * M)
WORKERS = (2, 4)
SERVERS = 2
LR = 0.01
TIMEOUT = 600.0  # seconds for one job (all its workers)

#: BSP step time / DDP-gloo step time at 16M parameters, 2 workers.
TARGET_RATIO = 1.5
STRETCH_RATIO = 1.0
TARGET_PARAMS, TARGET_WORKERS = 16 * M, 2


def _steps(params: int, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps) for a model of ``params`` parameters."""
    if params <= 4 * M:
        return (2, 20) if quick else (5, 200)
    return (2, 5) if quick else (3, 30)


def _label(params: int) -> str:
    return f"{params // M}M" if params % M == 0 else str(params)


# --------------------------------------------------------------------------------------------
# Worker processes (spawned; each reports ("ok", rank, result) or ("error", rank, traceback))

def _timed_loop(step: Callable[[], Any], warmup: int, steps: int) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    times = []
    start = time.time()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"start": start, "end": time.time(), "times": times}


def _ps_worker(cfg: dict[str, Any], rank: int) -> dict[str, Any]:
    import numpy as np

    from paramserver import rpc

    rpc.tune_malloc()  # as `paramserver launch` does for its workers (the library does not)
    n = cfg["params"]
    grad = np.random.default_rng(rank).standard_normal(n, dtype=np.float32)
    with ps.connect(cfg["scheduler"], rank=rank, num_workers=cfg["workers"],
                    timeout=cfg["timeout"]) as client:
        table = client.dense("w", (n,), ps.SGD(lr=LR))
        client.barrier("start")
        last: list[Any] = [None]

        def step() -> None:
            last[0] = table.push_pull(grad)

        out = _timed_loop(step, cfg["warmup"], cfg["steps"])
        values = last[0]
        if values is None or values.shape != (n,) or values.dtype != np.float32:
            raise AssertionError(f"worker {rank}: push_pull returned a bad array")
        client.barrier("end")  # every push is applied; nobody leaves while another still steps
        if rank == 0:
            # async and SSP apply every push; BSP one update per step, of the mean (or sum)
            out["check"] = _check(table.pull(), cfg,
                                  ("mean", "sum") if cfg["mode"] == "bsp" else ("sum",))
    return out


def _gradients_sum(cfg: dict[str, Any]) -> Any:
    import numpy as np

    total = np.zeros(cfg["params"], np.float64)
    for r in range(cfg["workers"]):
        total += np.random.default_rng(r).standard_normal(cfg["params"], dtype=np.float32)
    return total


def _check(values: Any, cfg: dict[str, Any], combined: tuple[str, ...]) -> str:
    """Check that every worker's gradients were applied, and return how they were combined: SGD
    from zeros ends at -lr * steps * (the sum, or the mean, of the workers' gradients)."""
    import numpy as np

    total = -LR * (cfg["warmup"] + cfg["steps"]) * _gradients_sum(cfg)
    for name in combined:
        expected = total / cfg["workers"] if name == "mean" else total
        if np.allclose(values, expected, rtol=1e-3, atol=1e-4):
            return name
    raise AssertionError(f"{cfg['mode']}: the final values are not -lr * steps * the "
                         f"{' or '.join(combined)} of the workers' gradients (max abs error vs "
                         f"the sum {float(np.abs(values - total).max()):.3g})")


def _ddp_worker(cfg: dict[str, Any], rank: int) -> dict[str, Any]:
    from datetime import timedelta

    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(cfg["port"])
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=cfg["workers"],
                            timeout=timedelta(seconds=cfg["timeout"]))
    try:
        n = cfg["params"]

        class Flat(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.p = nn.Parameter(torch.zeros(n))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.dot(self.p, x)

        model = DistributedDataParallel(Flat(), gradient_as_bucket_view=True)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x = torch.from_numpy(np.random.default_rng(rank).standard_normal(n, dtype=np.float32))

        def step() -> None:
            opt.zero_grad()
            model(x).backward()
            opt.step()

        dist.barrier()
        out = _timed_loop(step, cfg["warmup"], cfg["steps"])
        dist.barrier()
        if rank == 0:
            out["check"] = _check(model.module.p.detach().numpy(), dict(cfg, mode="ddp"),
                                  ("mean",))  # DDP averages the gradients
        return out
    finally:
        dist.destroy_process_group()


def _worker_main(kind: str, cfg: dict[str, Any], rank: int, results: Any) -> None:
    try:
        fn = _ps_worker if kind == "paramserver" else _ddp_worker
        results.put(("ok", rank, fn(cfg, rank)))
    except BaseException:  # report, so the orchestrator fails loudly instead of hanging
        results.put(("error", rank, traceback.format_exc()))


# --------------------------------------------------------------------------------------------
# Orchestration

def _run_workers(ctx: Any, kind: str, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Start cfg["workers"] processes of ``kind`` and return their results, by rank."""
    return run_processes(ctx, _worker_main, lambda rank, results: (kind, cfg, rank, results),
                         cfg["workers"], TIMEOUT, f"{kind} worker")


def _summary(outs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    steps = len(outs[0]["times"])
    window = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    rate = steps / window
    return {"steps_per_s": round(rate, 3), "step_ms": round(1e3 / rate, 3),
            "per_worker_steps_per_s": [round(len(o["times"]) / (o["end"] - o["start"]), 3)
                                       for o in outs],
            "step_ms_median": round(1e3 * statistics.median(t for o in outs for t in o["times"]),
                                    3),
            "steps": steps, "warmup": warmup, "gradients_combined": outs[0]["check"]}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    cpus = os.cpu_count() or 1
    modes = args.modes
    report: dict[str, Any] = {
        "benchmark": "sync",
        "machine": {"cpus": cpus, "python": platform.python_version()},
        "units": {"steps_per_s": "timed steps / (last worker's end - first worker's start)",
                  "step_ms": "1000 / steps_per_s",
                  "step_ms_median": "median of every worker's step times"},
        "config": {"sizes": args.sizes, "workers": args.workers, "modes": args.modes,
                   "servers": SERVERS, "optimizer": f"SGD(lr={LR})", "quick": args.quick,
                   "steps": {_label(n): dict(zip(("warmup", "timed"), _steps_for(args, n)))
                             for n in args.sizes},
                   "ddp": {"backend": "gloo", "gradient_as_bucket_view": True,
                           "threads_per_process": {
                       str(w): max(1, cpus // w) for w in args.workers}}},
        "paramserver": {}, "ddp_gloo": {},
    }
    for n in args.sizes:
        warmup, steps = _steps_for(args, n)
        for workers in args.workers:
            base = {"params": n, "workers": workers, "warmup": warmup, "steps": steps,
                    "timeout": TIMEOUT}
            key = (_label(n), f"{workers}w")
            if not args.no_ddp:
                import torch  # noqa: F401  (fail here, not in every worker, if it is missing)
                outs = _run_workers(ctx, "ddp", dict(base, port=_free_port(),
                                                     threads=max(1, cpus // workers)))
                entry = _summary(outs, warmup)
                report["ddp_gloo"].setdefault(key[0], {})[key[1]] = entry
                _log(f"ddp-gloo     {key[0]:>4} {key[1]:>3}: {entry['steps_per_s']:9.2f} steps/s "
                     f"({entry['step_ms']:.1f} ms)")
            for mode in modes:
                options = {} if mode == "async" else {"sync": mode}
                with LocalCluster(SERVERS, workers, **options) as job:
                    outs = _run_workers(ctx, "paramserver",
                                        dict(base, scheduler=job.address, mode=mode))
                entry = _summary(outs, warmup)
                report["paramserver"].setdefault(key[0], {}).setdefault(key[1], {})[mode] = entry
                _log(f"paramserver  {key[0]:>4} {key[1]:>3} {mode:>6}: "
                     f"{entry['steps_per_s']:9.2f} steps/s ({entry['step_ms']:.1f} ms)")
    report["targets"] = _targets(report)
    return report


def _steps_for(args: argparse.Namespace, params: int) -> tuple[int, int]:
    warmup, steps = _steps(params, args.quick)
    return (args.warmup if args.warmup is not None else warmup,
            args.steps if args.steps is not None else steps)


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    size, w = _label(TARGET_PARAMS), f"{TARGET_WORKERS}w"
    bsp = report["paramserver"].get(size, {}).get(w, {}).get("bsp")
    ddp = report["ddp_gloo"].get(size, {}).get(w)
    targets: dict[str, Any] = {}
    for name, limit in (("bsp_vs_ddp_16m_2w", TARGET_RATIO),
                        ("bsp_vs_ddp_16m_2w_stretch", STRETCH_RATIO)):
        entry: dict[str, Any] = {
            "what": f"paramserver BSP step time <= {limit}x DDP-gloo's, {size} float32 "
                    f"parameters, {TARGET_WORKERS} workers, {SERVERS} servers",
            "bsp_step_ms": bsp["step_ms"] if bsp else None,
            "ddp_gloo_step_ms": ddp["step_ms"] if ddp else None,
            "ratio": round(bsp["step_ms"] / ddp["step_ms"], 3) if bsp and ddp else None,
            "goal": f"<= {limit}"}
        if entry["ratio"] is None:
            entry["met"] = False
            entry["error"] = (
                f"not measured in this run (needs --modes with bsp, --sizes with {size}, "
                f"--workers with {TARGET_WORKERS}, and the DDP peer)")
        else:
            entry["met"] = entry["ratio"] <= limit
        targets[name] = entry
    return targets


def _print_table(report: dict[str, Any]) -> None:
    modes = report["config"]["modes"]
    cols = ["ddp-gloo", *modes]
    _log("\nsteps/s per worker (step ms)")
    _log(f"{'params':>7} {'workers':>7} " + " ".join(f"{c:>18}" for c in cols))
    for n in report["config"]["sizes"]:
        size = _label(n)
        for w in report["config"]["workers"]:
            cells = []
            ddp = report["ddp_gloo"].get(size, {}).get(f"{w}w")
            for c in cols:
                r = ddp if c == "ddp-gloo" else \
                    report["paramserver"].get(size, {}).get(f"{w}w", {}).get(c)
                cells.append(f"{r['steps_per_s']:8.2f} ({r['step_ms']:7.1f})" if r else
                             f"{'-':>18}")
            _log(f"{size:>7} {w:>7} " + " ".join(cells))
    _log("\ntargets:")
    for name, t in report["targets"].items():
        shown = {k: v for k, v in t.items() if k not in ("what", "met")}
        _log(f"  {'MET ' if t['met'] else 'MISS'} {name}: {shown}")


def _parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)([kKmM]?)\s*", part)
        if not m or int(m.group(1)) <= 0:
            raise argparse.ArgumentTypeError(f"bad size {part!r}: a positive count, e.g. 1M, "
                                             f"16M (2^20 units) or 4096")
        out.append(int(m.group(1)) * {"": 1, "k": 1024, "m": M}[m.group(2).lower()])
    return out


def _parse_modes(text: str) -> list[str]:
    try:
        return [str(Consistency.parse(m)) for m in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {text!r}: comma-separated ints") from None
    if any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"bad list {text!r}: counts must be >= 1")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="few steps (~2 min)")
    parser.add_argument("--modes", type=_parse_modes, default=list(MODES),
                        help="consistency models (default async,ssp:1,ssp:4,bsp)")
    parser.add_argument("--sizes", type=_parse_sizes, default=list(SIZES),
                        help="parameter counts (default 1M,16M; M = 2^20)")
    parser.add_argument("--workers", type=_parse_ints, default=list(WORKERS),
                        help="worker counts (default 2,4)")
    parser.add_argument("--steps", type=int, help="timed steps (default by size and --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default by size)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the DDP-gloo peer")
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None
                                                       and args.warmup < 0):
        parser.error("--steps must be >= 1 and --warmup >= 0")

    # SIGTERM / SIGHUP: unwind through the finally blocks so every child is stopped.
    def _raise(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    report = run(args)
    _print_table(report)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
