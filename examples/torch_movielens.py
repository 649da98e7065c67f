"""Click-through model on MovieLens-100K in PyTorch, its embedding tables on the parameter servers.

The task, features and split are those of ``movielens_ctr.py`` (see ``movielens_data.py``):
predict whether a user rates a movie 4 or 5 from fourteen sparse fields of 64-bit hashed ids
(user, movie, demographics, zip, genres, release year and five crosses), the test set being each
user's latest 20% of ratings (``--split user``) or the latest 20% of all (``--split global``).

The model is an ordinary ``nn.Module`` (DeepFM-like)::

    e_f   = the row of field f's id, or the mean of its rows      rows are [w | v], dim 1 + k
    logit = bias + sum_f w_f                                       first order
                 + sum_{f<g} <v_f, v_g>                            factorization machine
                 + Linear(relu(Linear(concat(v))))                 MLP over the factors

Distributed, each field is a ``paramserver.torch.Embedding`` (single-valued fields) or
``EmbeddingBag`` (genres and the crosses with genres, several ids per example, mean-pooled): the
layer holds no weights, its rows live on the servers (created on first touch, Adagrad), and a
``DistributedOptimizer`` puts the dense head (bias and MLP, Adam) on the servers too. Each step
announces the next batch's ids with ``prefetch()``, so ``opt.step()`` pushes the batch's row and
dense gradients and pulls the dense weights and the next batch's rows in one round trip (one RPC
per server for all fourteen tables and the head). Every worker trains on its rank-strided shard of
the training part; after the barrier rank 0 evaluates with read-only lookups (``eval()``), which
never create rows.

``--local`` is the same model in plain torch: ``nn.Embedding`` / ``nn.EmbeddingBag`` with
``sparse=True`` over each field's ids (hashed ids mapped to rows by a vocabulary), stepped by
``torch.optim.Adagrad``, and the head by ``torch.optim.Adam``: the update rules the servers
apply.

Run it::

    paramserver launch --num-servers 2 --num-workers 2 -- python examples/torch_movielens.py
    python examples/torch_movielens.py --local

The last line of rank 0 is ``RESULT {json}`` (test AUC, log-loss, times, rows per table). Exit
status: 0; 2 when ``--target-auc`` is given and not reached; 3 when the data is not installed
(``pip install --no-deps recbole``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # movielens_data.py sits next to this file
from movielens_data import FIELDS, SPLITS, Dataset, DatasetMissingError, auc, load  # noqa: E402
from results import result_line  # noqa: E402

#: Exit code when the test AUC is below --target-auc.
EXIT_BELOW_TARGET = 2
#: Exit code when the MovieLens files (the recbole wheel) are not installed.
EXIT_NO_DATA = 3

#: A batch as the model takes it: per field, int64 ids and (multi-valued fields) bag offsets.
Batch = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Config:
    """Hyperparameters; the defaults reach test AUC ~0.79 on the per-user split in one epoch."""

    dim: int = 8             # factor size k (rows hold 1 + k floats)
    hidden: int = 32         # MLP hidden units
    epochs: int = 1
    batch_size: int = 256    # examples per step per worker
    emb_lr: float = 0.02     # Adagrad on embedding rows
    dense_lr: float = 2e-3   # Adam on the MLP and the bias
    init_std: float = 0.01   # embedding rows start at N(0, init_std)
    seed: int = 0


# -- the model ------------------------------------------------------------------------------------

class DeepFM(nn.Module):
    """First-order weights + FM + MLP over per-field embedding layers.

    ``tables`` maps each field to its layer: anything called as ``layer(ids)`` (one id per
    example) or ``layer(ids, offsets)`` (bags) that returns ``(batch, 1 + dim)`` rows, i.e.
    ``paramserver.torch.Embedding`` / ``EmbeddingBag`` or ``nn.Embedding`` / ``nn.EmbeddingBag``.
    """

    def __init__(self, tables: dict[str, nn.Module], dim: int, hidden: int, seed: int) -> None:
        super().__init__()
        self.fields = tuple(tables)
        self.tables = nn.ModuleDict(tables)
        nf = len(self.fields)
        generator = torch.Generator().manual_seed(seed)  # the same head in every process
        self.bias = nn.Parameter(torch.zeros(1))
        self.hidden = nn.Linear(nf * dim, hidden)
        self.out = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            self.hidden.weight.normal_(0.0, math.sqrt(2.0 / (nf * dim)), generator=generator)
            self.hidden.bias.zero_()
            self.out.weight.normal_(0.0, math.sqrt(1.0 / hidden), generator=generator)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits ``(batch,)``."""
        e = torch.stack([self.tables[f](ids) if offsets is None
                         else self.tables[f](ids, offsets)
                         for f, (ids, offsets) in ((f, batch[f]) for f in self.fields)], dim=1)
        w, v = e[:, :, 0], e[:, :, 1:]                                  # (B, F), (B, F, k)
        s = v.sum(dim=1)
        fm = 0.5 * (s * s - (v * v).sum(dim=1)).sum(dim=1)
        mlp = self.out(torch.relu(self.hidden(v.flatten(1)))).squeeze(-1)
        return self.bias + w.sum(dim=1) + fm + mlp

    def prefetch(self, batch: Batch) -> None:
        """Announce the next batch's ids to every server-backed layer (no-op for local ones)."""
        for f in self.fields:
            prefetch = getattr(self.tables[f], "prefetch", None)
            if prefetch is not None:
                prefetch(batch[f][0])


# -- batches ----------------------------------------------------------------------------------------

class Encoder:
    """Turns example indices into a :data:`Batch`. Distributed, an id is its 64-bit hash (as
    int64, the same bits); locally, its row in the field's vocabulary, every id of the dataset
    (train and test) sorted, so an id never trained keeps its initial row, as a read-only lookup
    on the servers gives."""

    def __init__(self, data: Dataset, vocabulary: bool) -> None:
        self.data = data
        self.multi = {f for f in FIELDS if data.fields[f].ids.shape[1] > 1}
        self.vocab: dict[str, np.ndarray] | None = None
        if vocabulary:
            self.vocab = {f: np.unique(data.fields[f].ids[data.fields[f].weights > 0])
                          for f in FIELDS}

    def _ids(self, field: str, ids: np.ndarray) -> np.ndarray:
        if self.vocab is None:
            return ids.view(np.int64)
        return np.searchsorted(self.vocab[field], ids).astype(np.int64)

    def batch(self, rows: np.ndarray) -> Batch:
        """The fields of examples ``rows``: ``(ids, None)`` for a single-valued field, the
        flattened ids of every example's bag and each bag's start for a multi-valued one."""
        out: Batch = {}
        for f in FIELDS:
            field = self.data.fields[f].take(rows)
            if f not in self.multi:
                out[f] = (torch.from_numpy(self._ids(f, field.ids[:, 0])), None)
                continue
            valid = field.weights > 0                                   # padding has weight 0
            counts = valid.sum(axis=1)
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            out[f] = (torch.from_numpy(self._ids(f, field.ids[valid])), torch.from_numpy(offsets))
        return out

    def rows_touched(self, rows: np.ndarray) -> dict[str, int]:
        """Distinct ids per field among examples ``rows``: the rows training on them creates."""
        return {f: int(np.unique(self.data.fields[f].ids[rows][self.data.fields[f].weights[rows]
                                                                > 0]).size) for f in FIELDS}


# -- building the two variants ------------------------------------------------------------------------

def build_distributed(client: Any, cfg: Config, multi: set[str]) -> tuple[DeepFM, Any]:
    """The model with server-backed tables and its DistributedOptimizer."""
    import paramserver as ps
    from paramserver.torch import DistributedOptimizer, Embedding, EmbeddingBag

    adagrad = ps.Adagrad(lr=cfg.emb_lr)
    init = ps.init.normal(0.0, cfg.init_std)
    tables: dict[str, nn.Module] = {}
    for f in FIELDS:
        if f in multi:
            tables[f] = EmbeddingBag(client, f"emb.{f}", 1 + cfg.dim, adagrad, init,
                                     seed=cfg.seed, mode="mean")
        else:
            tables[f] = Embedding(client, f"emb.{f}", 1 + cfg.dim, adagrad, init, seed=cfg.seed)
    model = DeepFM(tables, cfg.dim, cfg.hidden, cfg.seed)
    return model, DistributedOptimizer(client, model, ps.Adam(lr=cfg.dense_lr))


class LocalOptimizer:
    """``torch.optim.Adagrad`` on the sparse embedding weights and ``torch.optim.Adam`` on the
    dense head, stepped together (what the servers apply distributed)."""

    def __init__(self, model: DeepFM, cfg: Config) -> None:
        sparse = [p for f in model.fields for p in model.tables[f].parameters()]
        ids = {id(p) for p in sparse}
        dense = [p for p in model.parameters() if id(p) not in ids]
        self.optimizers = [torch.optim.Adagrad(sparse, lr=cfg.emb_lr),
                           torch.optim.Adam(dense, lr=cfg.dense_lr)]

    def zero_grad(self) -> None:
        """Clear every gradient."""
        for opt in self.optimizers:
            opt.zero_grad()

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for opt in self.optimizers:
            opt.step()


def build_local(encoder: Encoder, cfg: Config) -> tuple[DeepFM, LocalOptimizer]:
    """The same model in plain torch: sparse nn.Embedding / nn.EmbeddingBag over vocabularies."""
    assert encoder.vocab is not None
    # torch.optim.Adagrad builds sparse tensors from valid gradients: opt out of the (slow)
    # invariant checks explicitly, which also silences torch's warning that they are off.
    torch.sparse.check_sparse_tensor_invariants.disable()
    torch.manual_seed(cfg.seed)
    tables: dict[str, nn.Module] = {}
    for f in FIELDS:
        rows = encoder.vocab[f].size
        layer = (nn.EmbeddingBag(rows, 1 + cfg.dim, mode="mean", sparse=True)
                 if f in encoder.multi else nn.Embedding(rows, 1 + cfg.dim, sparse=True))
        nn.init.normal_(layer.weight, 0.0, cfg.init_std)
        tables[f] = layer
    model = DeepFM(tables, cfg.dim, cfg.hidden, cfg.seed)
    return model, LocalOptimizer(model, cfg)


# -- the job ------------------------------------------------------------------------------------------

def _logloss(y: np.ndarray, logits: np.ndarray) -> float:
    z = np.where(y > 0.5, logits, -logits).astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, -z)))


@torch.no_grad()
def predict(model: DeepFM, encoder: Encoder, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Logits of examples ``rows``, in ``eval()`` mode (server tables: read-only lookups)."""
    model.eval()
    out = [model(encoder.batch(rows[s:s + chunk])).numpy() for s in range(0, rows.size, chunk)]
    model.train()
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train(model: DeepFM, optimizer: Any, encoder: Encoder, shard: np.ndarray, cfg: Config,
          rank: int, tag: str, log_every: int) -> dict[str, Any]:
    """``cfg.epochs`` passes over ``shard``; each step announces the next batch's ids before
    ``optimizer.step()``, so distributed a step is one round trip. Returns loss and timings."""
    labels = torch.from_numpy(encoder.data.labels)
    batches = [order[s:s + cfg.batch_size]
               for epoch in range(cfg.epochs)
               for order in [np.random.default_rng([cfg.seed, epoch, rank]).permutation(shard)]
               for s in range(0, order.size, cfg.batch_size)]
    steps_per_epoch = -(-shard.size // cfg.batch_size)
    loss_fn = nn.BCEWithLogitsLoss()
    start = tick = time.perf_counter()
    step_time, losses, seen = 0.0, [], 0
    nxt = encoder.batch(batches[0]) if batches else None
    model.train()
    for i, rows in enumerate(batches):
        batch = nxt
        loss = loss_fn(model(batch), labels[torch.from_numpy(rows)])
        optimizer.zero_grad()
        loss.backward()
        if i + 1 < len(batches):
            nxt = encoder.batch(batches[i + 1])
            model.prefetch(nxt)
        t0 = time.perf_counter()
        optimizer.step()
        step_time += time.perf_counter() - t0
        losses.append(loss.item())
        seen += rows.size
        step = i % steps_per_epoch + 1
        if step % log_every == 0 or step == steps_per_epoch:
            now = time.perf_counter()
            print(f"[{tag}] epoch {i // steps_per_epoch + 1} step {step}/{steps_per_epoch} "
                  f"loss {np.mean(losses[-log_every:]):.4f} "
                  f"{seen / max(now - tick, 1e-9):.0f} examples/s", flush=True)
            tick, seen = now, 0
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "steps": len(batches),
            "step_time_fraction": step_time / max(seconds, 1e-9),
            "train_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else float("nan")}


def _server_table(model: DeepFM, field: str) -> Any:
    """The ``paramserver.EmbeddingTable`` behind a field's server-backed layer."""
    from paramserver.torch import Embedding
    layer = model.tables[field]
    assert isinstance(layer, Embedding)
    return layer.table


def run(args: argparse.Namespace, cfg: Config, data: Dataset) -> dict[str, Any] | None:
    """Train and (on rank 0) evaluate; returns the result on rank 0, None on other ranks."""
    encoder = Encoder(data, vocabulary=args.local)
    train_rows = data.train if args.limit is None else data.train[:args.limit]
    if args.local:
        model, optimizer = build_local(encoder, cfg)
        stats = train(model, optimizer, encoder, train_rows, cfg, 0, "local", args.log_every)
        rows = encoder.rows_touched(train_rows)
        job: dict[str, Any] = {"mode": "local", "num_workers": 1, "num_servers": 0}
        logits = predict(model, encoder, data.test)
    else:
        import paramserver as ps
        with ps.connect(timeout=args.timeout) as client:
            rank, workers = client.rank, max(1, client.num_workers)
            tag = f"rank {rank}/{workers}"
            if client.restored_version:  # the tables hold the checkpoint's values
                print(f"[{tag}] resumed from checkpoint {client.restored_version} (metadata "
                      f"{client.restored_metadata}): training epochs 1-{cfg.epochs} from its "
                      f"weights", flush=True)
            model, optimizer = build_distributed(client, cfg, encoder.multi)
            shard = train_rows[rank::workers]
            print(f"[{tag}] {shard.size} training examples, {-(-shard.size // cfg.batch_size)} "
                  f"steps/epoch x {cfg.epochs} epochs; {len(FIELDS)} embedding tables dim "
                  f"{1 + cfg.dim} ({len(encoder.multi)} bags), {optimizer}", flush=True)
            client.barrier("start")
            stats = train(model, optimizer, encoder, shard, cfg, rank, tag, args.log_every)
            client.barrier("trained")
            if rank != 0:
                return None
            # The others' last steps came after this worker's: read the final dense weights.
            values = client.pull([name for name, _ in optimizer])
            with torch.no_grad():
                for name, param in optimizer:
                    param.copy_(torch.from_numpy(values[name]).view_as(param))
            rows = {f: int(_server_table(model, f).num_rows()) for f in FIELDS}
            job = {"mode": "distributed", "num_workers": workers,
                   "num_servers": client.num_servers}
            logits = predict(model, encoder, data.test)  # read-only lookups: no new rows
    y = data.labels[data.test]
    return {
        **job,
        "test_auc": round(auc(y, logits), 5),
        "test_logloss": round(_logloss(y, logits), 5),
        "train_seconds": round(stats["train_seconds"], 2),
        "train_loss": round(stats["train_loss"], 5),
        "steps": stats["steps"],
        "step_time_fraction": round(stats["step_time_fraction"], 3),
        "train_examples": int(train_rows.size),
        "split": data.split,
        "test_examples": int(data.test.size),
        "rows_per_table": rows,
        "total_rows": sum(rows.values()),
        "config": asdict(cfg),
    }


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """The command line and the model's configuration; see ``--help``."""
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--local", action="store_true",
                   help="plain torch in this one process, no servers (the reference)")
    p.add_argument("--split", choices=SPLITS, default="user",
                   help="time-ordered split: each user's latest 20%% (user) or the latest 20%% of "
                        "all ratings (global, mostly unseen users)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="examples per step per worker")
    p.add_argument("--dim", type=int, default=d.dim, help="factor size k")
    p.add_argument("--hidden", type=int, default=d.hidden, help="MLP hidden units")
    p.add_argument("--emb-lr", type=float, default=d.emb_lr, help="Adagrad learning rate")
    p.add_argument("--dense-lr", type=float, default=d.dense_lr, help="Adam learning rate")
    p.add_argument("--init-std", type=float, default=d.init_std)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="train on the first N training examples only (quick runs; the test set "
                        "stays whole)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per remote call")
    p.add_argument("--target-auc", type=float, default=None,
                   help="exit with status 2 if rank 0's test AUC is below this")
    a = p.parse_args(argv)
    for key in ("epochs", "batch_size", "dim", "hidden", "threads", "log_every"):
        if getattr(a, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(a, key)}")
    if a.limit is not None and a.limit <= 0:
        p.error(f"--limit must be positive, got {a.limit}")
    cfg = Config(dim=a.dim, hidden=a.hidden, epochs=a.epochs, batch_size=a.batch_size,
                 emb_lr=a.emb_lr, dense_lr=a.dense_lr, init_std=a.init_std, seed=a.seed)
    return a, cfg


def main(argv: list[str] | None = None) -> int:
    """Run the example; the exit code says whether it reached ``--target-auc``."""
    args, cfg = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:
        data = load(split=args.split)
    except DatasetMissingError as exc:
        print(f"torch_movielens: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    result = run(args, cfg, data)
    if result is None:
        return 0
    result["wall_seconds"] = round(time.perf_counter() - t0, 2)
    print(f"test AUC {result['test_auc']:.4f}  log-loss {result['test_logloss']:.4f}  "
          f"train {result['train_seconds']:.1f} s  rows {result['total_rows']}", flush=True)
    print(result_line(result, sort_keys=True), flush=True)
    if args.target_auc is not None and result["test_auc"] < args.target_auc:
        print(f"test AUC {result['test_auc']:.4f} is below the target {args.target_auc}",
              file=sys.stderr)
        return EXIT_BELOW_TARGET
    return 0


if __name__ == "__main__":
    sys.exit(main())
