"""End to end: the PyTorch examples through launched jobs, with quick settings.

``examples/torch_fashion_mnist.py`` (a CNN through ``paramserver.torch.DistributedOptimizer``) on
the first 6,000 training images for one epoch, async and BSP, and its single-process
``torch.optim.Adam`` reference; ``examples/torch_movielens.py`` (embedding tables through
``paramserver.torch.Embedding`` / ``EmbeddingBag`` with prefetch) for its default single epoch,
and its plain-torch reference. Each job takes 5-15 s on 2 busy cores. Fashion-MNIST needs
``apt-get install -y dataset-fashion-mnist`` and MovieLens-100K the recbole wheel
(``pip install --no-deps recbole``); the tests of an example whose data is missing are skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import PS, example_result, launch_example, run_example

pytest.importorskip("torch")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FASHION = EXAMPLES / "torch_fashion_mnist.py"
MOVIELENS = EXAMPLES / "torch_movielens.py"
#: Seconds one job may take; the jobs here take 5-15 s on 2 busy cores.
JOB_TIMEOUT = 120.0

#: 6,000 images, one epoch (47 steps of 64 per worker) reach 74-80% test accuracy (async, bsp)
#: and locally; a model that does not learn (--lr 1e-9) stays at 10%.
FASHION_QUICK = ("--epochs", "1", "--limit", "6000", "--seed", "0")
MIN_FASHION_ACCURACY = 0.65
#: The default run (one epoch of all 80,000 training ratings) reaches test AUC 0.789-0.791
#: distributed and locally; without trained embeddings it is near 0.5, with the item ids alone
#: about 0.73.
MIN_AUC = 0.77
#: Distributed and single-process runs of one seed differ by far less than this.
MAX_AUC_GAP = 0.015
FIELDS = {"user", "item", "occupation", "gender", "age", "zip", "zip3", "genre", "year",
          "user_x_genre", "item_x_age", "item_x_gender", "occupation_x_genre", "age_x_genre"}


@pytest.fixture(scope="module")
def fashion_mnist() -> None:
    """Skip unless Fashion-MNIST is installed (examples/datasets.py raises DatasetUnavailable)."""
    spec = importlib.util.spec_from_file_location("_example_datasets", EXAMPLES / "datasets.py")
    assert spec is not None and spec.loader is not None
    datasets = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = datasets  # its dataclasses look their module up while it loads
    spec.loader.exec_module(datasets)
    try:
        datasets.load_fashion_mnist()
    except datasets.DatasetUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def movielens() -> None:
    """Skip unless the recbole wheel (MovieLens-100K's files) is installed."""
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("MovieLens-100K ships in the recbole wheel: pip install --no-deps recbole")


def _local(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_example([sys.executable, str(script), "--local", *args], JOB_TIMEOUT)


# -- Fashion-MNIST --------------------------------------------------------------------------------

def test_fashion_cnn_learns_through_the_servers(fashion_mnist: None) -> None:
    proc = launch_example(FASHION, *FASHION_QUICK, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = example_result(proc)
    assert result["mode"] == "distributed" and result["sync"] == "async"
    assert result["num_workers"] == 2 and result["num_servers"] == 2
    assert result["train_examples"] == 6000 and result["steps"] == 47  # 3,000 per worker
    assert result["test_accuracy"] >= MIN_FASHION_ACCURACY, result
    for rank in (0, 1):  # both workers trained their shards
        assert f"rank {rank}: epoch 1/1" in proc.stdout, proc.stdout


def test_fashion_cnn_learns_under_bsp(fashion_mnist: None) -> None:
    """``--sync bsp``: every step is one Adam update with both workers' gradients."""
    proc = run_example(PS + ["launch", "--num-servers", "2", "--num-workers", "2", "--sync",
                             "bsp", "--", sys.executable, str(FASHION), *FASHION_QUICK, "--sync",
                             "bsp"], JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = example_result(proc)
    assert result["sync"] == "bsp"
    assert result["test_accuracy"] >= MIN_FASHION_ACCURACY, result


def test_fashion_local_reference_learns(fashion_mnist: None) -> None:
    proc = _local(FASHION, *FASHION_QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = example_result(proc)
    assert result["mode"] == "local" and result["steps"] == 94
    assert result["test_accuracy"] >= MIN_FASHION_ACCURACY, result


# -- MovieLens-100K -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def movielens_local(movielens: None) -> dict:
    proc = _local(MOVIELENS, "--seed", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return example_result(proc)


def test_movielens_local_reference_learns(movielens_local: dict) -> None:
    assert movielens_local["mode"] == "local"
    assert movielens_local["test_auc"] >= MIN_AUC, movielens_local
    assert set(movielens_local["rows_per_table"]) == FIELDS


def test_movielens_embeddings_learn_through_the_servers(movielens_local: dict) -> None:
    proc = launch_example(MOVIELENS, "--seed", "0", "--target-auc", str(MIN_AUC),
                          timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = example_result(proc)
    assert result["mode"] == "distributed"
    assert result["num_workers"] == 2 and result["num_servers"] == 2
    assert result["test_auc"] >= MIN_AUC, result
    assert abs(result["test_auc"] - movielens_local["test_auc"]) <= MAX_AUC_GAP, (
        result, movielens_local)
    for rank in (0, 1):
        assert f"[rank {rank}/2] epoch 1 step 157/157" in proc.stdout, proc.stdout
    # The servers hold exactly the rows of the ids training touched (prefetched rows are the
    # next batch's; evaluation's lookups are read-only): as many as the local run trained.
    assert result["rows_per_table"] == movielens_local["rows_per_table"]
    assert result["rows_per_table"]["user"] == 943


def test_movielens_unmet_target_auc_fails_the_launch(movielens: None) -> None:
    proc = launch_example(MOVIELENS, "--limit", "2000", "--target-auc", "1.01",
                          timeout=JOB_TIMEOUT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    result = example_result(proc)
    assert 0.0 < result["test_auc"] < 1.0 and result["train_examples"] == 2000
    assert "below the target" in proc.stdout + proc.stderr
