"""Data-path sanity check, run under ``paramserver launch`` (any number of servers and workers):

    paramserver launch --num-servers 2 --num-workers 2 -- python benchmarks/sanity_transport.py

Each worker pushes, pulls and push_pulls tables from one element to several messages long, one
call over several tables, and a shared table all workers push to, and checks every value exactly;
a non-finite gradient must be refused with nothing applied. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import numpy as np

import paramserver as ps


def main() -> None:
    with ps.connect() as client:
        rank, workers = client.rank, max(1, client.num_workers)
        sizes = [1, 1000, 256 * 1024 + 7, 3_000_001]  # one element .. several 2 MiB messages
        tables = {n: client.dense(f"sanity_{n}_w{rank}", (n,), ps.SGD(lr=1.0)) for n in sizes}
        grads = {t.name: ((np.arange(n) % 7) - 3).astype(np.float32) for n, t in tables.items()}
        for n, t in tables.items():
            g = grads[t.name]
            t.push(g)
            assert np.array_equal(t.pull(), -g), f"{t.name}: pull after push"
            assert np.array_equal(t.push_pull(g), -2 * g), f"{t.name}: push_pull"
        out = client.push_pull(grads)  # every table in one call, one RPC (or stream) per server
        for name, g in grads.items():
            assert np.array_equal(out[name], -3 * g), f"{name}: multi-table push_pull"
        bad = grads[tables[1000].name].copy()
        bad[500] = np.nan
        try:
            tables[1000].push(bad)
        except ps.InvalidRequestError as exc:
            assert tables[1000].name in str(exc), exc
        else:
            raise AssertionError("a NaN gradient was accepted")
        assert np.array_equal(tables[1000].pull(), -3 * grads[tables[1000].name]), "NaN applied"
        # One table shared by every worker: after a barrier it holds the sum of all pushes.
        shared = client.dense("sanity_shared", (1_000_000,), ps.SGD(lr=1.0))
        g = np.ones(1_000_000, dtype=np.float32)
        client.barrier("sanity-before")
        shared.push(g)
        client.barrier("sanity-after")
        assert np.array_equal(shared.pull(), -workers * g), "shared table"
        print(f"worker {rank}: data path sanity OK ({client.num_servers} servers, {workers} "
              f"workers)", flush=True)


if __name__ == "__main__":
    main()
