"""Embedding table throughput and memory, in-process and through servers, beside torch.


Scenarios (one function each, so a "through servers" section can be added beside them):

* ``throughput_core``: ``_core.EmbeddingTable`` pull, push and pull+push on batches of 4,096 ids
  (all distinct, or 30% distinct with duplicates), at 1 and 2 threads.
* ``throughput_torch``: the peer on the same batches: ``nn.Embedding(sparse=True)``; pull is the
  forward lookup, push builds the sparse gradient and runs the optimizer step (SGD and Adagrad).
* ``memory_core``: process RSS growth and ``bytes()`` after creating 1M rows of dim 64 with
  Adagrad, against the raw row-and-state bytes (dim x 4 x (1 + slots)).
* ``routing_core``: the core's pull rate on the ids that one server of S holds (S = 1 and 4), with
  the router paramserver uses (hash bits 20-51) beside the old ``hash % S``, which made every id of
  a server share the low hash bits the core's id map uses for its slot.
* ``through_servers``: a worker (this process) pulls, pushes, pulls then pushes, and push_pulls
  the same batches through 1 and 2 server processes over gRPC on loopback; and the server's RSS
  growth after 1M rows of dim 64 with Adagrad pushed through it.

Rows/s counts requested ids (4,096 per batch, duplicates included); figures are the median over
repetitions. After timing, the benchmark checks that paramserver and torch hold the same rows
(they applied the same pushes) and fails if not.

    python benchmarks/bench_embedding.py            # table on stdout
    python benchmarks/bench_embedding.py --json     # one JSON object
    python benchmarks/bench_embedding.py --quick    # seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import paramserver as ps
from paramserver import _core, rpc

BATCH = 4096


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; --quick shrinks everything."""

    universe: int = 100_000           # ids the batches draw from (table rows)
    dims: tuple[int, ...] = (16, 64, 256)
    distinct: tuple[float, ...] = (1.0, 0.3)
    optimizers: tuple[str, ...] = ("SGD", "Adagrad")
    threads: tuple[int, ...] = (1, 2)
    batches: int = 16                 # batches per timed pass
    repeats: int = 5                  # timed passes; the median is reported
    memory_rows: int = 1_000_000
    memory_dim: int = 64
    servers: tuple[int, ...] = (1, 2)


QUICK = Settings(universe=5_000, dims=(16,), distinct=(0.3,), optimizers=("Adagrad",),
                 threads=(1, 2), batches=2, repeats=2, memory_rows=20_000, servers=(1,))


def _optimizer(name: str) -> ps.Optimizer:
    return {"SGD": ps.SGD(lr=0.1), "Adagrad": ps.Adagrad(lr=0.1)}[name]


def make_batches(settings: Settings, distinct: float, seed: int) -> list[np.ndarray]:
    """Positions in [0, universe) per batch: round(distinct * BATCH) distinct ones, the rest
    repeats of them, shuffled."""
    rng = np.random.default_rng(seed)
    k = max(1, round(distinct * BATCH))
    out = []
    for _ in range(settings.batches):
        unique = rng.choice(settings.universe, k, replace=False)
        batch = np.concatenate([unique, rng.choice(unique, BATCH - k)])
        out.append(rng.permutation(batch))
    return out


def _median_rate(fn: Callable[[], None], rows: int, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and lazy allocations are not what is measured
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def throughput_core(settings: Settings, dim: int, distinct: float, optimizer: str, threads: int,
                    ids64: np.ndarray, batches: list[np.ndarray],
                    grads: np.ndarray) -> dict[str, Any]:
    """paramserver's core, in-process: rows/s of pull, push and pull then push."""
    table = _core.EmbeddingTable(dim, _optimizer(optimizer).to_config(),
                                 ps.init.normal(0.0, 0.01).to_config(), 0)
    table.pull(ids64)  # every row exists: steady state, not creation
    id_batches = [ids64[b] for b in batches]
    out = np.empty((BATCH, dim), np.float32)

    def pull() -> None:
        for ids in id_batches:
            table.pull(ids, out=out, num_threads=threads)

    def push() -> None:
        for ids in id_batches:
            table.push(ids, grads, num_threads=threads)

    def both() -> None:
        for ids in id_batches:
            table.pull(ids, out=out, num_threads=threads)
            table.push(ids, grads, num_threads=threads)

    rows = BATCH * len(batches)
    result = {"impl": "paramserver", "dim": dim, "distinct": distinct, "optimizer": optimizer,
              "threads": threads,
              "pull_rows_per_s": _median_rate(pull, rows, settings.repeats),
              "push_rows_per_s": _median_rate(push, rows, settings.repeats),
              "pull_push_rows_per_s": _median_rate(both, rows, settings.repeats)}
    return result


def throughput_torch(settings: Settings, dim: int, distinct: float, optimizer: str, threads: int,
                     batches: list[np.ndarray], grads: np.ndarray) -> dict[str, Any]:
    """The peer: nn.Embedding(sparse=True) + torch.optim, same batches, same gradients."""
    import torch

    torch.set_num_threads(threads)
    emb = torch.nn.Embedding(settings.universe, dim, sparse=True)
    opt_desc = _optimizer(optimizer)
    opt = getattr(torch.optim, optimizer)(emb.parameters(), **opt_desc.hyperparameters())
    index_batches = [torch.from_numpy(b) for b in batches]
    g = torch.from_numpy(grads)
    size = (settings.universe, dim)

    def pull() -> None:
        with torch.no_grad():
            for index in index_batches:
                emb(index)

    def push() -> None:
        for index in index_batches:
            emb.weight.grad = torch.sparse_coo_tensor(index[None], g, size, check_invariants=False)
            opt.step()

    def both() -> None:
        for index in index_batches:
            with torch.no_grad():
                emb(index)
            emb.weight.grad = torch.sparse_coo_tensor(index[None], g, size, check_invariants=False)
            opt.step()

    rows = BATCH * len(batches)
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        result = {"impl": "torch.nn.Embedding(sparse=True)", "dim": dim, "distinct": distinct,
                  "optimizer": optimizer, "threads": threads,
                  "pull_rows_per_s": _median_rate(pull, rows, settings.repeats),
                  "push_rows_per_s": _median_rate(push, rows, settings.repeats),
                  "pull_push_rows_per_s": _median_rate(both, rows, settings.repeats)}
    return result


def memory_core(settings: Settings) -> dict[str, Any]:
    """RSS growth and bytes() for `memory_rows` rows of `memory_dim` with Adagrad."""
    import psutil

    proc = psutil.Process()
    dim, n = settings.memory_dim, settings.memory_rows
    table = _core.EmbeddingTable(dim, ps.Adagrad().to_config(),
                                 ps.init.normal(0.0, 0.01).to_config(), 0)
    step = 65_536
    ids = np.empty(step, np.uint64)
    out = np.empty((step, dim), np.float32)
    ids.fill(0)  # touch the scratch buffers now, so their pages are not counted as the table's
    out.fill(0.0)
    rss_before = proc.memory_info().rss
    start = time.perf_counter()
    for first in range(0, n, step):
        count = min(step, n - first)
        ids[:count] = np.arange(first, first + count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        table.pull(ids[:count], out=out[:count])
    seconds = time.perf_counter() - start
    rss_growth = proc.memory_info().rss - rss_before
    raw = n * dim * 4 * (1 + table.num_slots)
    if table.num_rows() != n:
        raise AssertionError(f"expected {n} rows, table has {table.num_rows()}")
    return {"rows": n, "dim": dim, "optimizer": "Adagrad", "raw_bytes": raw,
            "table_bytes": table.bytes(), "rss_growth_bytes": rss_growth,
            "table_bytes_per_raw": table.bytes() / raw, "rss_growth_per_raw": rss_growth / raw,
            "bytes_per_row": table.bytes() / n, "create_rows_per_s": n / seconds}


def check_same_rows(settings: Settings, dim: int, optimizer: str, ids64: np.ndarray,
                    batches: list[np.ndarray], grads: np.ndarray) -> None:
    """Fresh core table and fresh torch peer, same start, same pushes: the rows must agree."""
    import torch

    table = _core.EmbeddingTable(dim, _optimizer(optimizer).to_config(),
                                 ps.init.normal(0.0, 0.01).to_config(), 0)
    emb = torch.nn.Embedding(settings.universe, dim, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(table.pull(ids64)))
    opt = getattr(torch.optim, optimizer)(emb.parameters(),
                                          **_optimizer(optimizer).hyperparameters())
    g = torch.from_numpy(grads)
    with torch.sparse.check_sparse_tensor_invariants(enable=True):
        for batch in batches:
            table.push(ids64[batch], grads)
            emb.weight.grad = torch.sparse_coo_tensor(torch.from_numpy(batch)[None], g,
                                                      emb.weight.shape)
            opt.step()
    np.testing.assert_allclose(table.pull(ids64), emb.weight.detach().numpy(), rtol=1e-4,
                               atol=1e-5)


def in_process(settings: Settings) -> dict[str, Any]:
    """The in-process half: the core and its torch peer on the same batches."""
    memory = memory_core(settings)  # first, before other scenarios leave freed memory around
    rng = np.random.default_rng(0)
    ids64 = rng.integers(0, 2**64, settings.universe, dtype=np.uint64)
    results, checks = [], []
    for dim in settings.dims:
        grads = rng.standard_normal((BATCH, dim)).astype(np.float32)
        for distinct in settings.distinct:
            batches = make_batches(settings, distinct, seed=dim)
            for optimizer in settings.optimizers:
                for threads in settings.threads:
                    results.append(throughput_core(settings, dim, distinct, optimizer, threads,
                                                   ids64, batches, grads))
                for threads in settings.threads:
                    results.append(throughput_torch(settings, dim, distinct, optimizer, threads,
                                                    batches, grads))
                check_same_rows(settings, dim, optimizer, ids64, batches, grads)
                checks.append({"dim": dim, "distinct": distinct, "optimizer": optimizer,
                               "rows_match_torch": True})
    return {"throughput": results, "memory": memory, "checks": checks}


def _server_rss(pids: list[int]) -> int:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def routing_core(settings: Settings) -> list[dict[str, Any]]:
    """Core pull rows/s on the ids server 0 of S holds, for each router (see module doc)."""
    from paramserver.partition import mix64, server_of_ids

    rng = np.random.default_rng(2)
    universe = rng.integers(0, 2**64, settings.universe * 8, dtype=np.uint64)
    routers = {"hash bits 20-51": server_of_ids,
               "hash % S (before)": lambda ids, s: (mix64(ids) % np.uint64(s)).astype(np.int64)}
    out = []
    for servers in (1, 4):
        for router, route in routers.items():
            if servers == 1 and router != "hash bits 20-51":
                continue  # one server: every router is the same
            ids = universe[route(universe, servers) == 0][:settings.universe]
            table = _core.EmbeddingTable(16, ps.SGD(lr=0.1).to_config(),
                                         ps.init.zeros().to_config(), 0)
            table.pull(ids)
            batches = [ids[i:i + BATCH] for i in range(0, ids.size - BATCH + 1, BATCH)]
            batches = batches[:settings.batches] or [ids]
            buf = np.empty((BATCH, 16), np.float32)

            def pull() -> None:
                for b in batches:
                    table.pull(b, out=buf[:b.size], num_threads=1)

            out.append({"servers": servers, "router": router, "rows": int(ids.size),
                        "pull_rows_per_s": _median_rate(pull, sum(b.size for b in batches),
                                                        settings.repeats)})
    return out


def through_servers(settings: Settings) -> dict[str, Any]:
    """The runtime half: one worker, 1 and 2 servers, rows/s per worker; server memory."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from local_cluster import LocalCluster

    rng = np.random.default_rng(1)
    ids64 = rng.integers(0, 2**64, settings.universe, dtype=np.uint64)
    results = []
    rpc.tune_malloc()  # as `paramserver launch` does for its workers (the library does not)
    for servers in settings.servers:
        with LocalCluster(servers) as cluster, ps.connect(cluster.address, timeout=60) as client:
            for dim in settings.dims:
                grads = rng.standard_normal((BATCH, dim)).astype(np.float32)
                for distinct in settings.distinct:
                    batches = [ids64[b] for b in make_batches(settings, distinct, seed=dim)]
                    emb = client.embedding(f"e{dim}_{distinct}", dim=dim,
                                           optimizer=ps.Adagrad(lr=0.1),
                                           init=ps.init.normal(0.0, 0.01))
                    emb.pull(ids64)  # every row exists: steady state, not creation

                    def pull() -> None:
                        for ids in batches:
                            emb.pull(ids)

                    def push() -> None:
                        for ids in batches:
                            emb.push(ids, grads)

                    def pull_then_push() -> None:
                        for ids in batches:
                            emb.pull(ids)
                            emb.push(ids, grads)

                    def push_pull() -> None:
                        for ids in batches:
                            emb.push_pull(ids, grads)

                    rows = BATCH * len(batches)
                    results.append({
                        "servers": servers, "workers": 1, "dim": dim, "distinct": distinct,
                        "optimizer": "Adagrad",
                        "pull_rows_per_s": _median_rate(pull, rows, settings.repeats),
                        "push_rows_per_s": _median_rate(push, rows, settings.repeats),
                        "pull_then_push_rows_per_s": _median_rate(pull_then_push, rows,
                                                                  settings.repeats),
                        "push_pull_rows_per_s": _median_rate(push_pull, rows, settings.repeats)})
    # Server memory: 1M rows of dim 64 with Adagrad pushed through one server.
    dim, n = settings.memory_dim, settings.memory_rows
    with LocalCluster(1) as cluster, ps.connect(cluster.address, timeout=120) as client:
        emb = client.embedding("memory", dim=dim, optimizer=ps.Adagrad(lr=0.1),
                               init=ps.init.normal(0.0, 0.01))
        emb.pull(np.arange(10, dtype=np.uint64))  # the server's first request: buffers, imports
        before = _server_rss(cluster.server_pids)
        step = 65_536
        grads = np.full((step, dim), 0.5, np.float32)
        for first in range(0, n, step):
            count = min(step, n - first)
            ids = np.arange(first, first + count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            emb.push(ids, grads[:count])
        held = emb.num_rows()
        growth = _server_rss(cluster.server_pids) - before
    if held != n + 9:  # id 0 is both a warm-up id and the first pushed id
        raise AssertionError(f"expected {n + 9} rows on the server, it holds {held}")
    raw = n * dim * 4 * 2
    memory = {"rows": held, "dim": dim, "optimizer": "Adagrad", "raw_bytes": raw,
              "server_rss_growth_bytes": growth, "server_rss_growth_per_raw": growth / raw}
    return {"throughput": results, "memory": memory}


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    servers = report["through_servers"]
    one = [r for r in servers["throughput"]
           if r["servers"] == 1 and r["dim"] == 64 and r["distinct"] == 1.0]
    rate = one[0]["pull_then_push_rows_per_s"] if one else None
    mem = servers["memory"]["server_rss_growth_per_raw"]
    return {
        "pull_then_push_4096x64_one_server_rows_per_s": {
            "value": rate, "target": 1e6, "met": rate is not None and rate >= 1e6},
        "server_memory_1M_rows_dim64_adagrad_per_raw": {
            "value": mem, "target": 1.3, "met": mem <= 1.3},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    import torch

    report = {
        "benchmark": "embedding",
        "batch": BATCH,
        "settings": {k: list(v) if isinstance(v, tuple) else v
                     for k, v in settings.__dict__.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__},
        "in_process": in_process(settings),
        "routing_core": routing_core(settings),
        "through_servers": through_servers(settings),
    }
    report["targets"] = _targets(report)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    mem = report["in_process"]["memory"]
    print(f"memory: {mem['rows']:,} rows dim {mem['dim']} Adagrad: raw {mem['raw_bytes'] / 1e6:.0f} MB,"
          f" bytes() {mem['table_bytes'] / 1e6:.0f} MB ({mem['table_bytes_per_raw']:.2f}x),"
          f" RSS growth {mem['rss_growth_bytes'] / 1e6:.0f} MB ({mem['rss_growth_per_raw']:.2f}x),"
          f" creation {mem['create_rows_per_s'] / 1e6:.2f} M rows/s")
    print(f"{'impl':<34}{'dim':>5}{'dist':>6}{'opt':>9}{'thr':>4}"
          f"{'pull Mrow/s':>13}{'push Mrow/s':>13}{'pull+push':>11}")
    for r in report["in_process"]["throughput"]:
        print(f"{r['impl']:<34}{r['dim']:>5}{r['distinct']:>6.1f}{r['optimizer']:>9}{r['threads']:>4}"
              f"{r['pull_rows_per_s'] / 1e6:>13.2f}{r['push_rows_per_s'] / 1e6:>13.2f}"
              f"{r['pull_push_rows_per_s'] / 1e6:>11.2f}")
    print("\ncore pull on the ids of one server of S (dim 16, 1 thread)")
    for r in report["routing_core"]:
        print(f"  S={r['servers']} {r['router']:<20} {r['rows']:>8,} rows "
              f"{r['pull_rows_per_s'] / 1e6:>8.2f} M rows/s")
    print(f"\nthrough servers (1 worker)\n{'servers':>8}{'dim':>5}{'dist':>6}{'pull':>10}"
          f"{'push':>10}{'pull,push':>11}{'push_pull':>11}   (M rows/s)")
    for r in report["through_servers"]["throughput"]:
        print(f"{r['servers']:>8}{r['dim']:>5}{r['distinct']:>6.1f}"
              f"{r['pull_rows_per_s'] / 1e6:>10.2f}{r['push_rows_per_s'] / 1e6:>10.2f}"
              f"{r['pull_then_push_rows_per_s'] / 1e6:>11.2f}"
              f"{r['push_pull_rows_per_s'] / 1e6:>11.2f}")
    mem = report["through_servers"]["memory"]
    print(f"server RSS growth at {mem['rows']:,} rows: {mem['server_rss_growth_bytes'] / 1e6:.0f} MB"
          f" ({mem['server_rss_growth_per_raw']:.2f}x raw)")
    for name, t in report["targets"].items():
        print(f"target {name}: {t['value']} (target {t['target']}) {'MET' if t['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
