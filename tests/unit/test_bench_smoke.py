"""The optimizer benchmark runs and prints the documented JSON shape (times are never checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_optimizers.py"


def test_quick_json_shape() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--reps", "2", "--json"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object, nothing else on stdout
    impls = {"paramserver", "numpy", "torch_fused", "torch_foreach"}
    for name in ("sgd", "adagrad", "adam"):
        entry = out[name]
        assert impls <= entry.keys() and impls == entry["2_threads"].keys()
        for value in [*(entry[k] for k in impls), *entry["2_threads"].values()]:
            assert isinstance(value, float) and value > 0
        assert out["checks"][name]["paramserver"] <= 1e-5
    targets = out["targets"]
    assert set(targets) == {"adam_vs_torch_fused", "adagrad_vs_torch_fused", "met"}
    assert targets["adam_vs_torch_fused"] == out["adam"]["paramserver"] / out["adam"]["torch_fused"]
    assert isinstance(targets["met"], bool)
    assert out["checks"]["ok"] is True
    assert out["config"]["quick"] is True and out["config"]["elements"] == 1 << 20
