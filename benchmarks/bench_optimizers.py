"""Optimizer kernel throughput: the paramserver core beside numpy and torch, in the same run.

For SGD, Adagrad and Adam on one large float32 tensor (default 64M elements) this times one
optimizer step of

* ``paramserver``: ``_core.DenseTable.apply_many`` over all blocks (1 MiB blocks by default);
* ``numpy``: an in-place implementation with preallocated scratch (on 2 threads: the tensor split
  in halves, one half per thread; numpy releases the GIL inside ufuncs);
* ``torch_fused`` and ``torch_foreach``: ``torch.optim`` with ``fused=True`` / ``foreach=True``
  under ``torch.set_num_threads(t)``.

Repetitions are interleaved (each rep runs every implementation once, in rotating order), so load
from other processes hits all of them alike; figures are medians in G elements/s (1e9 per second).
Before timing, each implementation's result is checked against torch's single-tensor reference on
a small tensor, and after timing the core's tensor is compared with numpy's (both took the same
steps on the same gradient). A failed check exits non-zero.

Usage::

    python benchmarks/bench_optimizers.py            # 64M elements, 1 and 2 threads, table
    python benchmarks/bench_optimizers.py --json     # one JSON object on stdout
    python benchmarks/bench_optimizers.py --quick --json   # small and fast (smoke test)
    python benchmarks/bench_optimizers.py --torch-thp      # torch on huge pages too: kernels alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# The core backs its tables with transparent huge pages; torch's CPU allocator does so only when
# THP_MEM_ALLOC_ENABLE=1, which it reads once, early. --torch-thp sets it before torch loads, to
# compare the kernels alone on equal pages.
if "--torch-thp" in sys.argv[1:]:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
import torch  # noqa: E402

import paramserver  # noqa: E402
from paramserver import _core, optim  # noqa: E402

OPTIMIZERS = ("sgd", "adagrad", "adam")
IMPLS = ("paramserver", "numpy", "torch_fused", "torch_foreach")
# Hyperparameters of the timed runs: the plain forms (no weight decay, amsgrad or momentum).
HYPER: dict[str, dict[str, Any]] = {"sgd": {"lr": 1e-3}, "adagrad": {"lr": 1e-2},
                                    "adam": {"lr": 1e-3}}
OURS = {"sgd": optim.SGD, "adagrad": optim.Adagrad, "adam": optim.Adam}
THEIRS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}
F32 = np.float32


class NumpyOptimizer:
    """In-place numpy version of a torch optimizer's single-tensor step (no momentum, no decay)."""

    def __init__(self, name: str, param: np.ndarray, threads: int) -> None:
        self.name, self.param, self.t = name, param, 0
        self.hyper = dict(HYPER[name])
        n = param.size
        self.slots = {"sgd": [], "adagrad": [np.zeros(n, F32)],
                      "adam": [np.zeros(n, F32), np.zeros(n, F32)]}[name]
        self.scratch = np.empty(n, F32)
        bounds = np.linspace(0, n, threads + 1).astype(int)
        self.parts = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def step(self, grad: np.ndarray) -> None:
        self.t += 1
        if self.pool is None:
            self._step(grad, slice(None))
        else:
            list(self.pool.map(lambda s: self._step(grad, s), self.parts))

    def _step(self, grad: np.ndarray, s: slice) -> None:
        p, g, tmp = self.param[s], grad[s], self.scratch[s]
        if self.name == "sgd":
            np.multiply(g, F32(self.hyper["lr"]), out=tmp)
            np.subtract(p, tmp, out=p)
        elif self.name == "adagrad":
            (acc,) = (a[s] for a in self.slots)
            clr = self.hyper["lr"]  # lr_decay = 0
            np.multiply(g, g, out=tmp)
            np.add(acc, tmp, out=acc)
            np.sqrt(acc, out=tmp)
            np.add(tmp, F32(1e-10), out=tmp)
            np.divide(g, tmp, out=tmp)
            np.multiply(tmp, F32(clr), out=tmp)
            np.subtract(p, tmp, out=p)
        else:
            m, v = (a[s] for a in self.slots)
            b1, b2, lr = 0.9, 0.999, self.hyper["lr"]
            np.subtract(g, m, out=tmp)  # m = lerp(m, g, 1 - b1)
            np.multiply(tmp, F32(1 - b1), out=tmp)
            np.add(m, tmp, out=m)
            np.multiply(v, F32(b2), out=v)
            np.multiply(g, g, out=tmp)
            np.multiply(tmp, F32(1 - b2), out=tmp)
            np.add(v, tmp, out=v)
            np.sqrt(v, out=tmp)
            np.divide(tmp, F32((1 - b2 ** self.t) ** 0.5), out=tmp)
            np.add(tmp, F32(1e-8), out=tmp)
            np.divide(m, tmp, out=tmp)
            np.multiply(tmp, F32(lr / (1 - b1 ** self.t)), out=tmp)
            np.subtract(p, tmp, out=p)


def _core_table(name: str, n: int, block: int) -> tuple[_core.DenseTable, np.ndarray]:
    table = _core.DenseTable(n, block, OURS[name](**HYPER[name]).to_config())
    return table, np.arange(table.num_blocks, dtype=np.int64)


def _torch_optimizer(name: str, param: torch.Tensor, impl: str) -> torch.optim.Optimizer:
    opt: torch.optim.Optimizer = THEIRS[name]([param], **HYPER[name], **{impl: True})
    return opt


def check_small(name: str, steps: int = 5, n: int = 4099) -> dict[str, float]:
    """Max error of each implementation against torch's single-tensor path on a small tensor.

    Error is |x - ref| / (|ref| + 1e-3 * max|ref|): relative, with a floor for near-zero elements.
    """
    rng = np.random.default_rng(11)
    x0 = rng.standard_normal(n).astype(F32)
    grads = [rng.standard_normal(n).astype(F32) for _ in range(steps)]
    results: dict[str, np.ndarray] = {}

    ref = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    opt = THEIRS[name]([ref], **HYPER[name], foreach=False)
    for impl in ("torch_fused", "torch_foreach"):
        p = torch.nn.Parameter(torch.from_numpy(x0.copy()))
        o = _torch_optimizer(name, p, impl.split("_")[1])
        for g in grads:
            p.grad = torch.from_numpy(g.copy())
            o.step()
        results[impl] = p.detach().numpy().copy()
    for g in grads:
        ref.grad = torch.from_numpy(g.copy())
        opt.step()
    table, ids = _core_table(name, n, 1000)  # ragged last block on purpose
    table.assign_many(ids, x0)
    npo = NumpyOptimizer(name, x0.copy(), 1)
    for g in grads:
        table.apply_many(ids, g, 2)
        npo.step(g)
    out = np.empty(n, F32)
    table.read_many(ids, out)
    results["paramserver"], results["numpy"] = out, npo.param
    r = ref.detach().numpy().astype(np.float64)
    scale = np.abs(r) + 1e-3 * np.abs(r).max()
    return {k: float(np.max(np.abs(v - r) / scale)) for k, v in results.items()}


def bench(name: str, n: int, block: int, threads: int, reps: int, warmup: int
          ) -> tuple[dict[str, list[float]], float]:
    """Seconds per step of each implementation (reps samples each) and a core-vs-numpy check."""
    rng = np.random.default_rng(5)
    grad = (rng.standard_normal(n, dtype=F32) * F32(1e-3))
    table, ids = _core_table(name, n, block)
    npo = NumpyOptimizer(name, np.zeros(n, F32), threads)
    tparams = {impl: torch.nn.Parameter(torch.zeros(n)) for impl in ("fused", "foreach")}
    topts = {}
    for impl, p in tparams.items():
        p.grad = torch.from_numpy(grad)  # shares memory with `grad`
        topts[impl] = _torch_optimizer(name, p, impl)

    runs: dict[str, Callable[[], None]] = {
        "paramserver": lambda: table.apply_many(ids, grad, threads),
        "numpy": lambda: npo.step(grad),
        "torch_fused": topts["fused"].step,
        "torch_foreach": topts["foreach"].step,
    }
    torch.set_num_threads(threads)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for _ in range(warmup):
            for run in runs.values():
                run()
        for r in range(reps):
            order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
            for k in order:
                t0 = time.perf_counter()
                runs[k]()
                samples[k].append(time.perf_counter() - t0)
    finally:
        npo.close()
    # Same steps on the same gradient: the core and numpy must agree (to float rounding).
    m = min(n, 1 << 16)
    core_head = np.concatenate([_read(table, b) for b in range((m + block - 1) // block)])[:m]
    ref = npo.param[:m].astype(np.float64)
    err = float(np.max(np.abs(core_head - ref) / (np.abs(ref) + 1e-3 * np.abs(ref).max() + 1e-30)))
    return samples, err


def _read(table: _core.DenseTable, block: int) -> np.ndarray:
    out = np.empty(table.block_length(block), F32)
    table.read(block, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=64 * 1024 * 1024,
                    help="tensor size in float32 elements (default 64M)")
    ap.add_argument("--block-bytes", type=int, default=1 << 20,
                    help="paramserver block size in bytes (default 1 MiB)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (default 7)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="subset of sgd,adagrad,adam")
    ap.add_argument("--quick", action="store_true",
                    help="1M elements, 3 reps: checks that everything runs, figures meaningless")
    ap.add_argument("--torch-thp", action="store_true",
                    help="give torch transparent huge pages too (THP_MEM_ALLOC_ENABLE=1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.quick:
        args.elements, args.reps = 1 << 20, 3
    threads = [int(t) for t in args.threads.split(",")]
    names = [o for o in args.optimizers.split(",") if o]
    if not names or any(o not in OPTIMIZERS for o in names) or 1 not in threads:
        ap.error("--optimizers must name some of sgd,adagrad,adam and --threads must include 1")
    block = max(1, args.block_bytes // 4)

    out: dict[str, Any] = {
        "config": {"elements": args.elements, "block_elements": block, "reps": args.reps,
                   "warmup": args.warmup, "threads": threads, "quick": args.quick,
                   "torch_thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                   "unit": "G elements/s (median)", "kernel_isa": _core.kernel_isa(),
                   "paramserver": paramserver.__version__, "torch": torch.__version__,
                   "numpy": np.__version__, "cpu": platform.processor() or platform.machine()},
        "checks": {},
    }
    ok = True
    for name in names:
        small = check_small(name)
        entry: dict[str, Any] = {}
        for t in threads:
            samples, err = bench(name, args.elements, block, t, args.reps, args.warmup)
            figures = {k: args.elements / statistics.median(v) / 1e9 for k, v in samples.items()}
            if t == 1:
                entry.update(figures)
            else:
                entry[f"{t}_threads"] = figures
            small[f"paramserver_vs_numpy_{t}_threads"] = err
        out[name] = entry
        out["checks"][name] = small
        ok &= all(v <= 1e-5 for v in small.values())

    targets: dict[str, Any] = {}
    for name in ("adam", "adagrad"):
        if name in out:
            targets[f"{name}_vs_torch_fused"] = out[name]["paramserver"] / out[name]["torch_fused"]
    targets["met"] = bool(targets) and all(v >= 1.0 for v in targets.values())
    out["targets"] = targets
    out["checks"]["ok"] = ok

    if args.json:
        print(json.dumps(out, indent=1))
    else:
        cols = [f"{i}@{t}" for t in threads for i in IMPLS]
        print(f"{args.elements} elements, block {block}, {args.reps} reps, "
              f"kernels {out['config']['kernel_isa']} (G elements/s, median)")
        print(f"{'':9s}" + "".join(f"{c:>20s}" for c in cols))
        for name in names:
            row = [out[name][i] if t == 1 else out[name][f"{t}_threads"][i]
                   for t in threads for i in IMPLS]
            print(f"{name:9s}" + "".join(f"{v:20.2f}" for v in row))
        print("targets:", json.dumps(targets), "checks ok:", ok)
    if not ok:
        print(f"CHECK FAILED: {json.dumps(out['checks'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
