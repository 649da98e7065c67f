"""Train a small CNN on Fashion-MNIST in PyTorch, its parameters on the parameter servers.

The model is an ordinary ``nn.Module``::

    Conv2d(1, 32, 3, padding=1) -> ReLU -> MaxPool(2)        28x28 -> 14x14
    Conv2d(32, 64, 3, padding=1) -> ReLU -> MaxPool(2)       14x14 -> 7x7
    Flatten -> Linear(64 * 7 * 7, 10)                        50,186 parameters

trained with autograd as usual; only the optimizer differs. ``paramserver.torch.DistributedOptimizer``
puts one dense table per parameter on the servers, which apply Adam (``ps.Adam``, torch's update
rule). Every worker trains on its own shard of the training set (images ``rank, rank + W, ...``);
each ``opt.step()`` sends all the gradients and writes the new weights back into the model in one
round trip (one RPC per server). By default workers do not wait for each other (asynchronous SGD);
``paramserver launch --sync bsp|ssp:S`` with the same ``--sync`` here makes them step together.
After the last epoch every worker leaves the step group, they meet at a barrier, and rank 0 pulls
the final weights and reports the test accuracy.

Run it distributed (2 servers, 2 workers)::

    paramserver launch --num-servers 2 --num-workers 2 -- python examples/torch_fashion_mnist.py
    paramserver launch --num-servers 2 --num-workers 2 --sync bsp -- \
        python examples/torch_fashion_mnist.py --sync bsp

or as the single-process reference, the same model with ``torch.optim.Adam`` (no servers)::

    python examples/torch_fashion_mnist.py --local

Rank 0 ends with one machine-readable line, ``RESULT {...}`` (JSON). With ``--target-accuracy A``
it exits with code 2 when the test accuracy is below ``A``; with code 3 when Fashion-MNIST is not
installed (``apt-get install -y dataset-fashion-mnist``, see ``examples/datasets.py``).

Every process uses one torch thread by default (``--threads``): on two cores shared by two
workers and two servers, more threads only make them compete.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # datasets.py sits next to this file
from datasets import DatasetUnavailable, load_fashion_mnist  # noqa: E402
from results import result_line  # noqa: E402

#: Exit code when the final test accuracy is below --target-accuracy.
EXIT_BELOW_TARGET = 2
#: Exit code when Fashion-MNIST is not installed.
EXIT_NO_DATA = 3


# -- model ----------------------------------------------------------------------------------------

class FashionCNN(nn.Module):
    """Two 3x3 convolutions with ReLU and 2x2 max-pooling, then one linear layer to the 10
    classes. ``channels`` are the two convolutions' output channels."""

    def __init__(self, channels: tuple[int, int] = (32, 64), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(c2 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(batch, 10)`` of images ``(batch, 1, 28, 28)``."""
        return self.classifier(self.features(x).flatten(1))


def build_model(args: argparse.Namespace) -> FashionCNN:
    """The model with torch's default initialization, seeded by ``--seed`` (the same in every
    process; in a job, one worker's values become every worker's)."""
    torch.manual_seed(args.seed)
    return FashionCNN(tuple(args.channels))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             chunk: int = 2000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``x, y``."""
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for start in range(0, len(y), chunk):
        logits = model(x[start:start + chunk])
        yb = y[start:start + chunk]
        total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(y), total_loss / len(y)


# -- data -----------------------------------------------------------------------------------------

class Images:
    """Fashion-MNIST as tensors: standardized images ``(n, 1, 28, 28)`` and int64 labels."""

    def __init__(self, limit: int | None = None) -> None:
        data = load_fashion_mnist()
        x_train, y_train = data.x_train, data.y_train
        if limit is not None:
            x_train, y_train = x_train[:limit], y_train[:limit]
        self.x_train = torch.from_numpy(x_train).view(-1, 1, 28, 28)
        self.y_train = torch.from_numpy(y_train)
        self.x_test = torch.from_numpy(data.x_test).view(-1, 1, 28, 28)
        self.y_test = torch.from_numpy(data.y_test)


# -- training loop --------------------------------------------------------------------------------

def train(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor,
          args: argparse.Namespace, generator: torch.Generator, say: Callable[[str], None],
          on_epoch: Callable[[int], str] | None = None, step_name: str = "step") -> dict:
    """``args.epochs`` passes of mini-batch training on ``x, y``. ``optimizer`` is anything with
    torch's ``zero_grad()`` and ``step()`` (a ``torch.optim`` optimizer or a
    ``DistributedOptimizer``); the progress lines give the share of time spent in its ``step`` as
    "% in ``step_name``". Returns statistics of the run."""
    n = len(y)
    steps_per_epoch = -(-n // args.batch_size)
    start = time.perf_counter()
    step_time = 0.0
    stats = {"train_loss": float("nan"), "train_accuracy": float("nan")}
    model.train()
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, epoch_step = 0.0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            xb, yb = x[idx], y[idx]
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            t0 = time.perf_counter()
            optimizer.step()
            epoch_step += time.perf_counter() - t0
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        seconds = time.perf_counter() - epoch_start
        step_time += epoch_step
        extra = on_epoch(epoch) if on_epoch else ""
        say(f"epoch {epoch}/{args.epochs}  loss {loss_sum / n:.4f}  train acc {correct / n:.4f}  "
            f"{n / seconds:,.0f} samples/s  ({100 * epoch_step / seconds:.0f}% in {step_name})"
            f"{extra}")
        stats = {"train_loss": loss_sum / n, "train_accuracy": correct / n}
    seconds = time.perf_counter() - start
    stats.update(steps=steps_per_epoch * args.epochs, train_seconds=seconds,
                 samples_per_second=n * args.epochs / seconds,
                 step_time_fraction=step_time / seconds)
    return stats


def run_local(data: Images, args: argparse.Namespace) -> tuple[nn.Module, dict, dict]:
    """One process, ``torch.optim.Adam``: the reference for the distributed run."""
    model = build_model(args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def on_epoch(epoch: int) -> str:
        if not args.eval_every_epoch:
            return ""
        return f"  test acc {evaluate(model, data.x_test, data.y_test)[0]:.4f}"

    stats = train(model, optimizer, data.x_train, data.y_train, args,
                  torch.Generator().manual_seed(args.seed + 1), lambda s: print(s, flush=True),
                  on_epoch, step_name="Adam")
    return model, stats, {"mode": "local", "num_workers": 1, "num_servers": 0}


def run_distributed(data: Images, args: argparse.Namespace
                    ) -> tuple[nn.Module | None, dict, dict]:
    """Train through the parameter servers of the job this process was launched into.

    Returns the model with the final weights on rank 0 (None on the other ranks), this worker's
    statistics and a description of the job.
    """
    import paramserver as ps
    from paramserver.torch import DistributedOptimizer

    with ps.connect(sync=args.sync) as client:
        rank, workers = client.rank, max(1, client.num_workers)

        def say(message: str) -> None:
            print(f"rank {rank}: {message}", flush=True)

        model = build_model(args)
        optimizer = DistributedOptimizer(client, model, ps.Adam(lr=args.lr))
        x, y = data.x_train[rank::workers], data.y_train[rank::workers]
        if client.restored_version:  # the tables hold the checkpoint's values
            say(f"resumed from checkpoint {client.restored_version} (metadata "
                f"{client.restored_metadata}): training epochs 1-{args.epochs} from its weights")
        say(f"{len(y)} training examples (shard {rank} of {workers}), {client.num_servers} "
            f"servers, {sum(p.numel() for p in model.parameters()):,} parameters in "
            f"{len(optimizer.params)} tables, {client.sync}")

        def on_epoch(epoch: int) -> str:
            if rank != 0 or not args.eval_every_epoch:
                return ""
            return (f"  test acc {evaluate(model, data.x_test, data.y_test)[0]:.4f} "
                    f"(current weights)")

        stats = train(model, optimizer, x, y, args,
                      torch.Generator().manual_seed(args.seed + 1 + rank), say, on_epoch,
                      step_name="DistributedOptimizer.step")
        # Out of data: in a bsp/ssp job the other workers' remaining steps stop waiting for this
        # one (shards can differ by a batch). Every push is applied once the barrier returns.
        client.leave()
        client.barrier("trained")
        final = None
        if rank == 0:  # the others' last steps came after rank 0's: read the final weights
            values = client.pull([name for name, _ in optimizer])
            with torch.no_grad():
                for name, param in optimizer:
                    param.copy_(torch.from_numpy(values[name]).view_as(param))
            final = model
        job = {"mode": "distributed", "num_workers": workers, "num_servers": client.num_servers,
               "rank": rank, "sync": str(client.sync)}
    return final, stats, job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        description="Train a small CNN on Fashion-MNIST in PyTorch through parameter servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="passes over each worker's shard")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="examples per step (per worker)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--channels", type=int, nargs=2, default=[32, 64], metavar=("C1", "C2"),
                        help="output channels of the two convolutions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the shuffling")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="train on the first N training images only (quick runs; the test "
                             "set stays whole)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--eval-every-epoch", action="store_true",
                        help="also report the test accuracy after every epoch (rank 0)")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help=f"exit with code {EXIT_BELOW_TARGET} if the final test accuracy is "
                             f"below this (rank 0)")
    parser.add_argument("--sync", default=None, metavar="MODEL",
                        help="the consistency model this run expects (async, bsp, ssp:S); the "
                             "job's is set by paramserver launch --sync, and a different one is "
                             "an error (default: whatever the job runs)")
    parser.add_argument("--local", action="store_true",
                        help="single process, torch.optim.Adam, no parameter servers (the "
                             "reference)")
    args = parser.parse_args(argv)
    for key in ("epochs", "batch_size", "threads"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit must be positive, got {args.limit}")
    if min(args.channels) <= 0:
        parser.error(f"--channels must be positive, got {args.channels}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the example; the exit code says whether it reached ``--target-accuracy``."""
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:
        data = Images(args.limit)
    except DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_NO_DATA
    run = run_local if args.local else run_distributed
    model, stats, job = run(data, args)
    if model is None:  # a worker other than rank 0: rank 0 reports
        return 0
    accuracy, loss = evaluate(model, data.x_test, data.y_test)
    prefix = "" if args.local else "rank 0: "
    print(f"{prefix}test accuracy {accuracy:.4f}  test loss {loss:.4f}  "
          f"({len(data.y_test)} examples)", flush=True)
    result = {
        "test_accuracy": round(accuracy, 4), "test_loss": round(loss, 4),
        "dataset": "fashion-mnist", **job,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "channels": list(args.channels), "seed": args.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": len(data.y_train),
        "train_loss": round(stats["train_loss"], 4),
        "train_accuracy": round(stats["train_accuracy"], 4),
        "steps": stats["steps"],
        "samples_per_second": round(stats["samples_per_second"], 1),
        "step_time_fraction": round(stats["step_time_fraction"], 3),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    print(result_line(result), flush=True)
    if args.target_accuracy is not None and accuracy < args.target_accuracy:
        print(f"{prefix}test accuracy {accuracy:.4f} is below the target "
              f"{args.target_accuracy:.4f}", file=sys.stderr, flush=True)
        return EXIT_BELOW_TARGET
    return 0


if __name__ == "__main__":
    sys.exit(main())
