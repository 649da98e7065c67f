"""Federated learning on Fashion-MNIST through parameter servers: FedAdam (or FedAvg) over 10
participants whose data never leaves them, split non-IID.

Each of 10 participants holds 2 classes (participant ``i`` half of class ``i`` and half of class
``i + 1 mod 10``, 6,000 images). Every round the scheduler selects 5 of them (fair, seeded); each
trains the global model (the MLP of ``examples/mlp.py``: 784 -> 64 -> 10, numpy) for E local
epochs of SGD and submits its new weights with its number of examples; the servers apply the
tables' optimizer once to minus the example-weighted mean of the deltas (``--server-opt fedadam``:
``ps.FedAdam``, Reddi et al. 2021; ``fedavg``: ``ps.SGD(lr=1)``). The worker processes are hosts:
with W workers, worker ``r`` hosts participants ``r, r + W, ...`` and trains the selected ones one
after the other. Rank 0 declares the tables and, when the job has run its rounds, reports the test
accuracy (``RESULT {...}``). With ``--eval-every-round`` the accuracy after every round is in it
too, with when the round was applied; with several workers the last one is then an evaluator
(it follows the model versions and hosts no participants) and reports.

    paramserver launch --num-servers 2 --num-workers 2 --federated --clients-per-round 5 \\
        --min-updates 5 --min-participants 10 --rounds 60 --round-timeout 120 -- \\
        python examples/federated.py

Exits 2 when the final accuracy is below ``--target-accuracy`` (default 0.80), 3 when the dataset
is not installed (``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # datasets.py, mlp.py sit here
from datasets import Dataset, DatasetUnavailable, load  # noqa: E402
from mlp import evaluate, init_params, loss_and_grads  # noqa: E402
from results import result_line  # noqa: E402

EXIT_BELOW_TARGET = 2
EXIT_NO_DATA = 3
PARTICIPANTS = 10
HIDDEN = 64
Params = dict[str, np.ndarray]


def split_non_iid(labels: np.ndarray, participants: int = PARTICIPANTS) -> list[np.ndarray]:
    """Participant ``i`` gets the second half of class ``i``'s examples and the first half of
    class ``i + 1``'s: 2 classes each, every example held by exactly one participant."""
    order = np.argsort(labels, kind="stable")
    by_class = [order[labels[order] == c] for c in range(participants)]
    return [np.concatenate([by_class[i][len(by_class[i]) // 2:],
                            by_class[(i + 1) % participants][:len(by_class[(i + 1) %
                                                                        participants]) // 2]])
            for i in range(participants)]


def local_train(params: Params, x: np.ndarray, y: np.ndarray, epochs: int, batch: int,
                lr: float, seed: int) -> Params:
    """``epochs`` epochs of plain SGD on the participant's data, from the global model."""
    w = {k: v.copy() for k, v in params.items()}
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for start in range(0, len(perm), batch):
            b = perm[start:start + batch]
            _, _, grads = loss_and_grads(w, x[b], y[b])
            for k in w:
                w[k] -= np.float32(lr) * grads[k]
    return w


def initial_model(seed: int = 0) -> Params:
    """The global model before round 1 (the same in every run with the same seed)."""
    return init_params(784, HIDDEN, 10, np.random.default_rng(seed))


def server_optimizer(name: str, lr: float, tau: float):
    """The tables' optimizer: the federated server optimizer."""
    import paramserver as ps

    if name == "fedavg":
        return ps.SGD(lr=lr)
    if name == "fedadam":
        return ps.FedAdam(lr=lr, betas=(0.9, 0.99), tau=tau)
    raise ValueError(f"--server-opt must be fedavg or fedadam, got {name!r}")


def _watch_rounds(client, data: Dataset, names: list[str], log: list[dict],
                  stop: threading.Event, accuracy: bool = True) -> None:
    """Rank 0 with --eval-every-round: the test accuracy of every model version, as it appears."""
    import paramserver as ps

    seen = 0
    while not stop.is_set():
        version, finished = ps.federated.wait_version(client, seen, timeout=600)
        if version > seen:
            seen = version
            applied = time.time()
            if not accuracy:  # timing only
                log.append({"round": seen, "applied_at": applied})
                continue
            params = client.pull(names)
            acc, _ = evaluate(params, data.x_test, data.y_test)
            log.append({"round": seen, "accuracy": round(acc, 4), "applied_at": applied})
            print(f"round {seen}: test accuracy {acc:.4f}", flush=True)
        elif finished:
            return


def run(args: argparse.Namespace) -> int:
    """One host process of the federated job (``paramserver launch`` starts W of them)."""
    import paramserver as ps
    from paramserver.federated import Participant, selected

    try:
        data = load("fashion-mnist")
    except DatasetUnavailable as exc:
        print(exc, file=sys.stderr)
        return EXIT_NO_DATA
    shards = split_non_iid(data.y_train)
    with ps.connect() as client:
        rank, workers = client.rank, max(1, client.num_workers)
        if client.restored_version:  # the global model holds the checkpoint's values
            print(f"rank {rank}: resumed from checkpoint {client.restored_version} (metadata "
                  f"{client.restored_metadata}): the rounds continue from its model", flush=True)
        names = sorted(initial_model())
        if rank == 0:
            optimizer = server_optimizer(args.server_opt, args.server_lr, args.tau)
            for name, value in initial_model(args.seed).items():
                client.dense(name, value.shape, optimizer, init=value)
        client.barrier("tables")
        for name in names:
            client.table(name)  # attach (the evaluator and reporter pull them)
        # With --eval-every-round and several workers, the last one is the evaluator and hosts
        # no participants (as a Flower server evaluates while its clients train).
        evaluates = args.eval_every_round and workers > 1
        hosts = workers - 1 if evaluates else workers
        reporter = workers - 1 if evaluates else 0
        log: list[dict] = []
        started = time.time()
        if evaluates and rank == reporter:
            _watch_rounds(client, data, names, log, threading.Event(), not args.times_only)
        else:
            mine = [Participant(client, names, name=f"participant-{i}")
                    for i in range(rank, PARTICIPANTS, hosts)]
            stop = threading.Event()
            watcher = None
            if args.eval_every_round and not evaluates:  # one process: evaluate on the side
                watcher = threading.Thread(target=_watch_rounds,
                                           args=(client, data, names, log, stop,
                                                 not args.times_only), daemon=True)
                watcher.start()
            trained = 0
            while (chosen := selected(mine, timeout=args.wait)) is not None:
                sending = []
                for p in chosen:
                    model = p.fetch(timeout=args.wait)  # read once per round for all of them
                    if model is None:
                        break
                    i = int(p.name.rsplit("-", 1)[1])
                    idx = shards[i]
                    new = local_train(model.values, data.x_train[idx], data.y_train[idx],
                                      args.local_epochs, args.batch_size, args.lr,
                                      seed=1000 * model.round + i)
                    # sent while the next participant trains
                    sending.append(p.submit_async(new, num_examples=len(idx)))
                    trained += 1
                for future in sending:
                    future.result()
            if watcher is not None:
                watcher.join(timeout=args.wait)
            stop.set()
            print(f"[host {rank}] trained {trained} participant-rounds in "
                  f"{time.time() - started:.1f} s", flush=True)
        client.barrier("done")
        if rank != reporter:
            return 0
        params = client.pull(names)
        acc, loss = evaluate(params, data.x_test, data.y_test)
        status = ps.federated.status(client)
        result = {"test_accuracy": round(acc, 4), "test_loss": round(loss, 4),
                  "rounds": status["rounds_applied"], "server_opt": args.server_opt,
                  "local_epochs": args.local_epochs, "wall_s": round(time.time() - started, 2),
                  "per_round": log}
        print(result_line(result), flush=True)
        return 0 if acc >= args.target_accuracy else EXIT_BELOW_TARGET


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The example's flags (the rounds themselves are the job's: launch --rounds etc.)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-opt", choices=("fedadam", "fedavg"), default="fedadam")
    p.add_argument("--server-lr", type=float, default=None,
                   help="server learning rate (default: 0.01 for fedadam, 1.0 for fedavg)")
    p.add_argument("--tau", type=float, default=1e-3, help="FedAdam's adaptivity tau")
    p.add_argument("--local-epochs", type=int, default=1, help="E, local epochs per round")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial model")
    p.add_argument("--target-accuracy", type=float, default=0.80)
    p.add_argument("--eval-every-round", action="store_true",
                   help="evaluate every model version as it appears (with several workers, "
                        "the last one only evaluates)")
    p.add_argument("--times-only", action="store_true",
                   help="with --eval-every-round: record when each version appeared, no "
                        "accuracy (for timing the protocol)")
    p.add_argument("--wait", type=float, default=300.0,
                   help="seconds a host waits to be selected before giving up")
    args = p.parse_args(argv)
    if args.server_lr is None:
        args.server_lr = 0.01 if args.server_opt == "fedadam" else 1.0
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))
