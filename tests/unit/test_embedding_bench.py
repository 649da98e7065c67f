"""Smoke test of benchmarks/bench_embedding.py: --quick --json runs and has the documented shape.

Only the shape is checked: tests never assert wall-clock figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_embedding.py"


def test_quick_json_shape() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True,
                         text=True, timeout=120, check=True)
    report = json.loads(run.stdout)
    assert report["benchmark"] == "embedding" and report["batch"] == 4096
    section = report["in_process"]
    rates = ("pull_rows_per_s", "push_rows_per_s", "pull_push_rows_per_s")
    impls = {r["impl"] for r in section["throughput"]}
    assert impls == {"paramserver", "torch.nn.Embedding(sparse=True)"}
    for r in section["throughput"]:
        assert {"dim", "distinct", "optimizer", "threads", *rates} <= r.keys()
        assert all(r[k] > 0 for k in rates)
    mem = section["memory"]
    assert mem["raw_bytes"] == mem["rows"] * mem["dim"] * 4 * 2
    assert mem["table_bytes"] >= mem["raw_bytes"]
    assert section["checks"] and all(c["rows_match_torch"] for c in section["checks"])
    routing = report["routing_core"]
    assert sorted((r["servers"], r["router"]) for r in routing) == [
        (1, "hash bits 20-51"), (4, "hash % S (before)"), (4, "hash bits 20-51")]
    assert all(r["rows"] > 0 and r["pull_rows_per_s"] > 0 for r in routing)
