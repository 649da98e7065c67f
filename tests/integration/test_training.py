"""End to end: train the MLP example on real data through a launched job and check what it learned.

Runs ``python -m paramserver launch --num-servers 2 --num-workers 2 -- python examples/mlp.py
--dataset digits`` (scikit-learn's 8x8 digits, a few seconds) as a subprocess and parses the
``RESULT {...}`` line that rank 0 prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import PS, example_result, launch_example, run_example

pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mlp.py"
#: Seconds one launched job may take; the digits run takes about 3 s on 2 busy cores.
JOB_TIMEOUT = 45.0
#: The digits run reaches about 97% (distributed and single-process); 90% leaves room for the
#: nondeterminism of asynchronous updates while still failing if training does not work.
MIN_ACCURACY = 0.90


def _launch(*example_args: str) -> subprocess.CompletedProcess[str]:
    return launch_example(EXAMPLE, "--dataset", "digits", *example_args, timeout=JOB_TIMEOUT)


def _result(proc: subprocess.CompletedProcess[str]) -> dict:
    return example_result(proc)


def test_distributed_training_learns_digits() -> None:
    proc = _launch("--seed", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _result(proc)
    assert result["mode"] == "distributed"
    assert result["num_workers"] == 2 and result["num_servers"] == 2
    assert result["test_accuracy"] >= MIN_ACCURACY, result
    # Both workers trained their shards: each printed its last epoch.
    for rank in (0, 1):
        assert f"rank {rank}: epoch {result['epochs']}/{result['epochs']}" in proc.stdout


def test_unmet_target_accuracy_fails_the_launch() -> None:
    proc = _launch("--epochs", "1", "--target-accuracy", "1.01")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    result = _result(proc)
    assert 0.0 < result["test_accuracy"] <= 1.0
    assert "below the target" in proc.stdout + proc.stderr


def test_local_reference_learns_digits() -> None:
    proc = run_example([sys.executable, str(EXAMPLE), "--dataset", "digits", "--local", "--seed", "0"],
                       JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _result(proc)
    assert result["mode"] == "local"
    assert result["test_accuracy"] >= MIN_ACCURACY, result


@pytest.mark.parametrize("model", ["bsp", "ssp:2"])
def test_distributed_training_learns_digits_in_synchronous_modes(model: str) -> None:
    """The example under ``paramserver launch --sync MODEL``: both shards train (the shorter
    leaves the step group first), the job is the model asked for, and it learns."""
    from tests.integration.conftest import PS
    proc = run_example(PS + ["launch", "--num-servers", "2", "--num-workers", "2", "--sync",
                             model, "--", sys.executable, str(EXAMPLE), "--dataset", "digits",
                             "--seed", "0", "--sync", model], JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _result(proc)
    assert result["sync"] == model
    assert result["test_accuracy"] >= MIN_ACCURACY, result
    for rank in (0, 1):
        assert f"rank {rank}: epoch {result['epochs']}/{result['epochs']}" in proc.stdout


def test_example_expecting_another_model_fails_clearly() -> None:
    proc = _launch("--sync", "bsp")  # the job is async
    assert proc.returncode != 0
    assert "expects a bsp job" in proc.stdout + proc.stderr


def test_the_result_line_is_strict_json_when_training_diverges() -> None:
    """A diverged loss is null in the RESULT line, never NaN (which is not JSON)."""
    proc = run_example([sys.executable, str(EXAMPLE), "--dataset", "digits", "--local",
                        "--epochs", "1", "--lr", "1e30"], JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _result(proc)  # parsed with a parse_constant that refuses NaN and Infinity
    assert result["test_loss"] is None and result["train_loss"] is None, result
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_a_resumed_job_says_what_it_restored_and_where_it_continues(tmp_path) -> None:
    """The scheduler and the servers log the checkpoint version they restored, and the example
    prints where it continues from, also when the checkpoint saved no epoch (it said nothing)."""
    directory = str(tmp_path / "ckpt")

    def launch(*args: str) -> subprocess.CompletedProcess[str]:
        return run_example(PS + ["launch", "--num-servers", "2", "--num-workers", "2",
                                 "--checkpoint-dir", directory, *args[:args.index("--")],
                                 "--", sys.executable, str(EXAMPLE), "--dataset", "digits",
                                 *args[args.index("--") + 1:]], JOB_TIMEOUT)

    first = launch("--", "--epochs", "1")  # only the launcher's final checkpoint: no epoch
    assert first.returncode == 0, first.stdout + first.stderr
    assert "resumed from" not in first.stdout
    second = launch("--resume", "--", "--epochs", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout
    assert re.search(r"\[scheduler\] .*resuming from checkpoint 1 \(.*ckpt-0000000001\): 4 "
                     r"tables", out), out
    assert re.search(r"\[scheduler\] .*restored 4 tables from checkpoint 1", out), out
    for rank in (0, 1):
        assert re.search(rf"\[server {rank}\] .*server-{rank} restored its part of 4 tables "
                         rf"\(\d+ bytes\) from checkpoint 1", out), out
        assert (f"rank {rank}: resumed from checkpoint 1 which saved no epoch (--checkpoint-epochs "
                f"saves them): training epochs 1-2 from its weights") in out, out
