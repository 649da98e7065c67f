"""paramserver.torch step costs beside torch: a CTR embedding step, and DistributedOptimizer on
an MLP.

Section ``embedding`` (one worker, this process; 1 server process, ``LocalCluster(1)``): batches
of 4,096 ids drawn uniformly (with replacement) from 1M ids (about 8 duplicates per batch), rows
of dim 64, ``ps.Adagrad(lr=0.1)``, rows initialized ``normal(0, 0.01)``. Every one of the 1M rows
is created before timing (torch's table has them all too). Four ways to run the same step:

* ``push_with_pull``: ``client.push({"emb": (ids_i, grads)}, pull={"emb": ids_i+1})``: this
  batch's gradients out and the next batch's rows back in one round trip (the rows of batch 0
  are pulled before the clock starts). ``grads`` is a fixed random (4096, 64) float32 array: this
  is the client call alone, no model.
* ``pull_then_push``: the old two calls, ``client.pull({"emb": ids_i})`` then
  ``client.push({"emb": (ids_i, grads)})``.
* ``module``: ``paramserver.torch.Embedding`` in a ``DistributedOptimizer``: forward of the
  batch's ids, loss ``0.5 * sum(rows ** 2)``, backward, ``layer.prefetch(ids_i+1)``,
  ``opt.step()`` (one ``client.push`` with the next batch's rows, as above).
* ``torch``: torch in-process, no servers: ``nn.Embedding(1M, 64, sparse=True)`` and
  ``torch.optim.Adagrad(lr=0.1)``: forward, the same loss, backward, ``step()``, ``zero_grad()``.

The section runs twice on the same server: the worker's data through shared memory
(``embedding``) and through gRPC (``embedding_grpc``).

torch runs with 1 thread in this process by default (``--torch-threads``): the server process
needs the other core of a 2-core machine, and 2 torch threads on a busy 2-core machine were
several times slower than 1 here.

Rows/s per worker = ids per step (4,096, duplicates included) x steps / seconds. The variants run
interleaved, pass by pass (``--passes`` passes of ``--steps`` steps each); the median pass is
reported. ``module_minus_push_with_pull_ms`` is what the module (unique ids, autograd, the loss)
adds to the raw call per step; ``module_own_ms_client_stubbed`` times that work alone (the module
path with ``client.push`` replaced by a stub that returns rows at once).

Section ``optimizer`` (one worker; 1 server process): a 1,050,112-parameter MLP,
``Linear(1024, 512) + ReLU + Linear(512, 1024)`` (4 tables: two weights, two biases), the
server's ``ps.Adam(lr=1e-3)``. The gradients come from one backward (batch 32, MSE) and stay
fixed; only the optimizer step is timed:

* ``distributed_optimizer``: ``DistributedOptimizer.step()`` (every gradient out, the new values
  decoded straight into the parameters).
* ``bare_push_pull``: ``client.push_pull({name: grad})`` of the same gradient arrays to the same
  tables, then the returned values copied into the parameters (``np.copyto``).
* ``bare_push_pull_out``: ``client.push_pull(grads, out=parameter views)``: the call
  DistributedOptimizer makes when every parameter has a gradient, without the wrapper (the
  values decoded into the parameters, no copy).
* ``torch_adam``: local ``torch.optim.Adam(lr=1e-3).step()`` on a copy of the model.

The four variants take turns step by step (so they see the same load); each figure is the
median step time. The wrapper's own cost is ``distributed_optimizer - bare_push_pull`` (beside
it: the median of the step-by-step paired differences, the difference to ``bare_push_pull_out``,
and ``wrapper_own_ms_client_stubbed``, ``step()`` with the client's calls replaced by stubs). After timing, the benchmark checks that the parameters hold the servers'
values and that the pulled embedding rows are finite.

Prints a table on stderr and, with ``--json``, one JSON object on stdout ending in ``"targets"``:
``embedding_step_rows_per_s`` (``push_with_pull`` >= 1.5M rows/s per worker) and
``distributed_optimizer_overhead`` (wrapper cost <= 10% of the bare push_pull step). Figures on a
shared 2-core machine swing by tens of percent: compare within a run.

    python benchmarks/bench_torch.py --json
    python benchmarks/bench_torch.py --quick --json     # small table, few steps (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_cluster import LocalCluster  # noqa: E402  (benchmarks/ is not a package)

import paramserver as ps  # noqa: E402
from paramserver import rpc  # noqa: E402

BATCH = 4096
DIM = 64
EMB_LR = 0.1
MLP_LR = 1e-3
MLP_SHAPE = (1024, 512, 1024)   # Linear(1024, 512) + ReLU + Linear(512, 1024)
MLP_BATCH = 32

TARGET_ROWS_PER_S = 1.5e6
TARGET_OVERHEAD = 0.10          # wrapper cost / bare push_pull step
#: Quoted, not measured by this benchmark: the issue's figure for the torch peer.
TORCH_QUOTED = {"rows_per_s": 0.94e6, "quoted": True,
                "source": "issue 10: nn.Embedding(1M, 64, sparse=True) + torch.optim.Adagrad, "
                          "4,096 ids, measured on this machine type"}


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; --quick shrinks them."""

    universe: int = 1_000_000     # embedding ids (uniform draws), rows created before timing
    steps: int = 40               # embedding steps per pass
    passes: int = 7               # interleaved passes per variant; the median is reported
    mlp_steps: int = 20           # optimizer steps per variant per round
    mlp_rounds: int = 8
    warmup: int = 3               # untimed steps of each variant first


QUICK = Settings(universe=100_000, steps=8, passes=2, mlp_steps=5, mlp_rounds=4, warmup=1)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Section 1: the CTR embedding step


def _populate(client: ps.Client, name: str, universe: int) -> None:
    """Create every row of ids [0, universe) (a pull creates rows)."""
    chunk = 65_536
    for first in range(0, universe, chunk):
        client.pull({name: np.arange(first, min(first + chunk, universe), dtype=np.int64)})


def embedding(settings: Settings, address: str, transport: str = "auto") -> dict[str, Any]:
    import torch
    from torch import nn

    from paramserver.torch import DistributedOptimizer, Embedding

    rng = np.random.default_rng(0)
    n_batches = settings.steps + 1
    batches = [rng.integers(0, settings.universe, BATCH, dtype=np.int64)
               for _ in range(n_batches)]
    tensors = [torch.from_numpy(b) for b in batches]
    grads = (0.01 * rng.standard_normal((BATCH, DIM))).astype(np.float32)
    duplicates = float(np.mean([BATCH - np.unique(b).size for b in batches]))

    optimizer = ps.Adagrad(lr=EMB_LR)
    init = ps.init.normal(0.0, 0.01)
    with ps.connect(address, timeout=120, transport=transport) as client:
        used = client.transport()
        client.embedding("emb", DIM, optimizer, init)
        start = time.perf_counter()
        _populate(client, "emb", settings.universe)
        populate_s = time.perf_counter() - start
        layer = Embedding(client, "emb", DIM, optimizer, init)  # attaches to the same table
        dist_opt = DistributedOptimizer(client, layer, optimizer)

        torch_emb = nn.Embedding(settings.universe, DIM, sparse=True)
        with torch.no_grad():
            torch_emb.weight.normal_(0.0, 0.01)
        torch_opt = torch.optim.Adagrad(torch_emb.parameters(), **optimizer.hyperparameters())
        last_rows: list[Any] = [None]

        def push_with_pull(steps: int) -> float:
            rows = client.pull({"emb": batches[0]})["emb"]
            t0 = time.perf_counter()
            for i in range(steps):
                rows = client.push({"emb": (batches[i], grads)},
                                   pull={"emb": batches[i + 1]})["emb"]
            elapsed = time.perf_counter() - t0
            last_rows[0] = rows
            return elapsed

        def pull_then_push(steps: int) -> float:
            t0 = time.perf_counter()
            for i in range(steps):
                client.pull({"emb": batches[i]})
                client.push({"emb": (batches[i], grads)})
            return time.perf_counter() - t0

        def module(steps: int) -> float:
            layer.prefetch(tensors[0])
            layer.step()  # pulls batch 0's rows, untimed (as push_with_pull's first pull)
            t0 = time.perf_counter()
            for i in range(steps):
                out = layer(tensors[i])
                (0.5 * out.square().sum()).backward()
                layer.prefetch(tensors[i + 1])
                dist_opt.step()
            elapsed = time.perf_counter() - t0
            layer._prefetched = None  # the last prefetch is not used; not timed
            return elapsed

        def torch_step(steps: int) -> float:
            t0 = time.perf_counter()
            for i in range(steps):
                out = torch_emb(tensors[i])
                (0.5 * out.square().sum()).backward()
                torch_opt.step()
                torch_opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        variants: dict[str, Callable[[int], float]] = {
            "push_with_pull": push_with_pull, "pull_then_push": pull_then_push,
            "module": module, "torch": torch_step}
        samples: dict[str, list[float]] = {k: [] for k in variants}
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            for fn in variants.values():  # warm-up, not recorded
                fn(min(settings.warmup, settings.steps))
            for _ in range(settings.passes):
                for name, fn in variants.items():
                    samples[name].append(fn(settings.steps))
        if not np.isfinite(last_rows[0]).all() or last_rows[0].shape != (BATCH, DIM):
            raise AssertionError("push_with_pull returned bad rows")
        held = client.table("emb").num_rows()
        # The module's own work (unique ids, autograd, the loss, gradients), no round trip:
        # client.push replaced by a stub that hands back rows at once.
        buffer = np.zeros((BATCH, DIM), np.float32)
        client.push = lambda grads, pull=None, *, out=None: (  # type: ignore[method-assign]
            {k: buffer[:len(v)] for k, v in pull.items()} if pull else None)
        try:
            module(min(settings.warmup, settings.steps))
            module_own = statistics.median(module(settings.steps) for _ in range(3))
        finally:
            del client.push

    rows = BATCH * settings.steps
    results: dict[str, Any] = {}
    for name, secs in samples.items():
        med = statistics.median(secs)
        results[name] = {"rows_per_s": rows / med, "ms_per_step": 1e3 * med / settings.steps,
                         "rows_per_s_passes": [rows / s for s in secs]}
    return {
        "config": {"servers": 1, "workers": 1, "transport": used, "batch_ids": BATCH, "dim": DIM,
                   "ids": f"uniform over [0, {settings.universe}) with replacement",
                   "mean_duplicate_ids_per_batch": duplicates, "optimizer": optimizer.to_dict(),
                   "init": "normal(0, 0.01)", "steps_per_pass": settings.steps,
                   "passes": settings.passes, "torch_threads": torch.get_num_threads(),
                   "rows_created_before_timing": settings.universe,
                   "server_rows": held, "populate_s": populate_s},
        "results": results,
        "module_minus_push_with_pull_ms": (results["module"]["ms_per_step"]
                                           - results["push_with_pull"]["ms_per_step"]),
        "module_own_ms_client_stubbed": 1e3 * module_own / settings.steps,
    }


# --------------------------------------------------------------------------------------------
# Section 2: DistributedOptimizer on a 1M-parameter MLP


def optimizer_overhead(settings: Settings, address: str, servers: int) -> dict[str, Any]:
    import copy

    import torch
    from torch import nn

    from paramserver.torch import DistributedOptimizer

    torch.manual_seed(0)
    d_in, d_hidden, d_out = MLP_SHAPE
    model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))
    local = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(MLP_BATCH, d_in), torch.randn(MLP_BATCH, d_out)
    for m in (model, local):
        nn.functional.mse_loss(m(x), y).backward()

    with ps.connect(address, timeout=120) as client:
        dist_opt = DistributedOptimizer(client, model, ps.Adam(lr=MLP_LR), prefix="mlp.")
        local_opt = torch.optim.Adam(local.parameters(), lr=MLP_LR)
        params = dict(dist_opt)
        grads = {n: p.grad.numpy() for n, p in params.items()}
        views = {n: p.data.numpy().reshape(-1) for n, p in params.items()}
        names = list(params)

        def bare_push_pull() -> None:
            values = client.push_pull(grads)
            for n, v in values.items():
                np.copyto(views[n], v.reshape(-1))

        def bare_push_pull_out() -> None:
            client.push_pull(grads, out=views)

        variants: dict[str, Callable[[], None]] = {
            "distributed_optimizer": dist_opt.step, "bare_push_pull": bare_push_pull,
            "bare_push_pull_out": bare_push_pull_out, "torch_adam": local_opt.step}
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():
            for _ in range(settings.warmup):
                fn()
        # Step by step, the variants in turn (rotated each round): they see the same load.
        order = list(variants)
        for r in range(settings.mlp_rounds):
            turn = order[r % len(order):] + order[:r % len(order)]
            for _ in range(settings.mlp_steps):
                for name in turn:
                    t0 = time.perf_counter()
                    variants[name]()
                    samples[name].append(time.perf_counter() - t0)
        served = client.pull(names)
        for n, p in params.items():
            if not np.array_equal(served[n].reshape(-1), views[n]):
                raise AssertionError(f"parameter {n!r} does not hold the server's values: "
                                     f"{np.abs(served[n].reshape(-1) - views[n]).max()} off, "
                                     f"{int((served[n].reshape(-1) != views[n]).sum())} elements")
        # The wrapper's own work, without the noise of a round trip: step() with client.push
        # replaced by a stub that returns at once.
        # (step() calls push_pull when every parameter has a gradient, else push with pull.)
        client.push = lambda grads, pull=None, *, out=None: {}  # type: ignore[method-assign]
        client.push_pull = lambda grads, *, out=None: {}  # type: ignore[method-assign]
        try:
            own = []
            for _ in range(10 * settings.mlp_steps):
                t0 = time.perf_counter()
                dist_opt.step()
                own.append(time.perf_counter() - t0)
        finally:
            del client.push, client.push_pull
        fwd_bwd = []
        for _ in range(max(3, settings.mlp_steps // 2)):
            t0 = time.perf_counter()
            nn.functional.mse_loss(local(x), y).backward()
            fwd_bwd.append(time.perf_counter() - t0)

    ms = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    wrapper = ms["distributed_optimizer"] - ms["bare_push_pull"]
    paired = 1e3 * statistics.median(
        a - b for a, b in zip(samples["distributed_optimizer"], samples["bare_push_pull"]))
    return {
        "config": {"model": f"Linear({d_in}, {d_hidden}) + ReLU + Linear({d_hidden}, {d_out})",
                   "parameters": n_params, "tables": len(names), "servers": servers,
                   "workers": 1, "optimizer": ps.Adam(lr=MLP_LR).to_dict(),
                   "steps_per_variant": settings.mlp_steps * settings.mlp_rounds,
                   "interleaving": "step by step, variants in turn",
                   "gradients": f"fixed, from one backward of batch {MLP_BATCH} (MSE)"},
        "ms_per_step": ms,
        "ms_per_step_mean": {name: 1e3 * statistics.mean(s) for name, s in samples.items()},
        "forward_backward_ms": 1e3 * statistics.median(fwd_bwd),
        "wrapper_ms": wrapper,
        "wrapper_ms_paired_median": paired,
        "wrapper_vs_bare_push_pull_out_ms": ms["distributed_optimizer"]
        - ms["bare_push_pull_out"],
        "wrapper_own_ms_client_stubbed": 1e3 * statistics.median(own),
        "wrapper_fraction_of_bare_push_pull": wrapper / ms["bare_push_pull"],
    }


# --------------------------------------------------------------------------------------------


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    emb = report["embedding"]["results"]
    rate = emb["push_with_pull"]["rows_per_s"]
    grpc_emb = report["embedding_grpc"]["results"]
    opt = report["optimizer"]
    fraction = opt["wrapper_fraction_of_bare_push_pull"]
    return {
        "embedding_step_rows_per_s": {
            "what": f"rows/s per worker of one client.push(grads, pull=next batch) per step, "
                    f"{BATCH} ids x dim {DIM}, Adagrad, 1 server, 1 worker, shared memory "
                    f"(the gRPC figures beside it)",
            "value": rate,
            "figures": {
                "push_with_pull_rows_per_s": rate,
                "push_with_pull_rows_per_s_grpc": grpc_emb["push_with_pull"]["rows_per_s"],
                "pull_then_push_rows_per_s": emb["pull_then_push"]["rows_per_s"],
                "pull_then_push_rows_per_s_grpc": grpc_emb["pull_then_push"]["rows_per_s"],
                "module_rows_per_s": emb["module"]["rows_per_s"],
                "torch_sparse_adagrad_rows_per_s": emb["torch"]["rows_per_s"],
                "torch_sparse_adagrad_issue": TORCH_QUOTED,
            },
            "goal": f">= {TARGET_ROWS_PER_S:.0f}",
            "met": rate >= TARGET_ROWS_PER_S,
        },
        "distributed_optimizer_overhead": {
            "what": f"DistributedOptimizer.step() minus a bare client.push_pull of the same "
                    f"gradients (values copied back), {opt['config']['parameters']:,}-parameter "
                    f"MLP, {opt['config']['servers']} server, 1 worker",
            "value": fraction,
            "figures": {"distributed_optimizer_ms": opt["ms_per_step"]["distributed_optimizer"],
                        "bare_push_pull_ms": opt["ms_per_step"]["bare_push_pull"],
                        "bare_push_pull_out_ms": opt["ms_per_step"]["bare_push_pull_out"],
                        "torch_adam_ms": opt["ms_per_step"]["torch_adam"],
                        "wrapper_ms": opt["wrapper_ms"],
                        "wrapper_ms_paired_median": opt["wrapper_ms_paired_median"],
                        "wrapper_own_ms_client_stubbed": opt["wrapper_own_ms_client_stubbed"]},
            "goal": f"wrapper_ms <= {TARGET_OVERHEAD:.0%} of bare_push_pull_ms",
            "met": fraction <= TARGET_OVERHEAD,
        },
    }


def _print_table(report: dict[str, Any]) -> None:
    emb = report["embedding"]
    cfg = emb["config"]
    _log(f"\nembedding step: {BATCH} ids ({cfg['ids']}) x dim {DIM}, Adagrad, 1 server, "
         f"1 worker; median of {cfg['passes']} passes of {cfg['steps_per_pass']} steps")
    _log(f"  {'variant':<18}{'M rows/s':>10}{'ms/step':>10}   {'gRPC M rows/s':>14}"
         f"{'ms/step':>10}")
    for name, r in emb["results"].items():
        g = report["embedding_grpc"]["results"][name]
        _log(f"  {name:<18}{r['rows_per_s'] / 1e6:>10.3f}{r['ms_per_step']:>10.2f}   "
             f"{g['rows_per_s'] / 1e6:>14.3f}{g['ms_per_step']:>10.2f}")
    _log(f"  {'torch (issue)':<18}{TORCH_QUOTED['rows_per_s'] / 1e6:>10.3f}{'':>10}  (quoted)")
    _log(f"  module - push_with_pull: {emb['module_minus_push_with_pull_ms']:.2f} ms/step; "
         f"the module's own work (client.push stubbed): "
         f"{emb['module_own_ms_client_stubbed']:.2f} ms/step")
    opt = report["optimizer"]
    _log(f"\noptimizer step: {opt['config']['model']} ({opt['config']['parameters']:,} "
         f"parameters), Adam, {opt['config']['servers']} server, 1 worker; median step")
    for name, value in opt["ms_per_step"].items():
        _log(f"  {name:<24}{value:>9.2f} ms")
    _log(f"  {'(forward+backward)':<24}{opt['forward_backward_ms']:>9.2f} ms")
    _log(f"  wrapper = distributed_optimizer - bare_push_pull: {opt['wrapper_ms']:.2f} ms "
         f"({opt['wrapper_fraction_of_bare_push_pull']:.1%}; paired median "
         f"{opt['wrapper_ms_paired_median']:.2f} ms); - bare_push_pull_out: "
         f"{opt['wrapper_vs_bare_push_pull_out_ms']:.2f} ms")
    _log(f"  wrapper's own work (client.push stubbed): "
         f"{opt['wrapper_own_ms_client_stubbed']:.3f} ms")
    _log("\ntargets:")
    for name, t in report["targets"].items():
        _log(f"  {'MET ' if t['met'] else 'MISS'} {name}: {t['value']:.4g} (goal {t['goal']})")


def run(settings: Settings, quick: bool, servers: int, torch_threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(torch_threads)
    rpc.tune_malloc()  # as `paramserver launch` does for its workers (the library does not)
    report: dict[str, Any] = {
        "benchmark": "torch",
        "quick": quick,
        "settings": asdict(settings),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__,
                    "torch_threads": torch_threads, "loadavg_1min_start": os.getloadavg()[0]},
    }
    with LocalCluster(1) as cluster:
        report["embedding"] = embedding(settings, cluster.address, "shm")
        report["embedding_grpc"] = embedding(settings, cluster.address, "grpc")
    with LocalCluster(servers) as cluster:
        report["optimizer"] = optimizer_overhead(settings, cluster.address, servers)
    report["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    report["targets"] = _targets(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="small table, few steps")
    parser.add_argument("--steps", type=int, help="embedding steps per pass")
    parser.add_argument("--passes", type=int, help="embedding passes per variant")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads in this process (default 1: the server process "
                             "needs the other core of a 2-core machine)")
    parser.add_argument("--mlp-servers", type=int, default=1, choices=(1, 2),
                        help="servers for the MLP section (default 1)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.steps is not None or args.passes is not None:
        if (args.steps or 1) < 1 or (args.passes or 1) < 1:
            parser.error("--steps and --passes must be >= 1")
    if args.torch_threads < 1:
        parser.error("--torch-threads must be >= 1")
        settings = Settings(**{**asdict(settings),
                               **({"steps": args.steps} if args.steps else {}),
                               **({"passes": args.passes} if args.passes else {})})

    def _raise(signum: int, _frame: Any) -> None:  # unwind: LocalCluster stops its servers
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    report = run(settings, args.quick, args.mlp_servers, args.torch_threads)
    _print_table(report)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
