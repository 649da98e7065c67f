"""Smoke test of benchmarks/bench_transport.py: it runs, prints one JSON object of the right shape,
and every figure is positive. Never a check on speed: timings on shared machines are noise, and the
targets live in the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_transport.py"


def _positive_summary(summary: dict) -> None:
    assert summary["ms"] > 0 and summary["gbps"] > 0 and summary["reps"] > 0


def test_bench_transport_quick_json() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # exactly one JSON object on stdout
    sizes = [str(s) for s in report["config"]["sizes"]]
    assert set(report["paramserver"]) == {"shm", "grpc"}
    for key, entry in [(k, e) for jobs in report["paramserver"].values() for k, e in jobs.items()]:
        assert set(entry) == set(sizes)
        for size in sizes:
            assert set(entry[size]) == {"push", "pull", "push_pull"}
            for result in entry[size].values():
                if key.endswith("1w"):
                    _positive_summary(result)
                else:
                    assert result["gbps"] > 0 and len(result["per_worker"]) == 2
                    for worker in result["per_worker"]:
                        _positive_summary(worker)
    for peer in ("raw_tcp", "bare_grpc", "memcpy"):
        assert set(report[peer]) == {"1s1w", "2s1w"}
        for entry in report[peer].values():
            for size in sizes:
                for result in (entry[size].values() if peer != "memcpy" else [entry[size]]):
                    _positive_summary(result)
    ten = report["ten_m_float32"]
    for transport in ("shm", "grpc"):
        _positive_summary(ten[transport]["push"])
        _positive_summary(ten[transport]["pull"])
    assert report["ps_pattern"] is None  # not in --quick
    assert ten["ps_lite"]["push_ms"] > 0 and ten["ps_lite"]["pull_ms"] > 0
    targets = report["targets"]
    assert targets, "no targets reported"
    for target in targets.values():
        assert isinstance(target["met"], bool)
        assert target.get("measured_ms", target.get("measured_gbps", 0)) > 0
        assert target.get("peer_ms", target.get("peer_gbps", 0)) > 0
