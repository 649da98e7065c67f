"""Click-through-rate model on MovieLens-100K with sparse embedding tables (DeepFM-like, numpy).

Task: predict whether a user rates a movie 4 or 5 (55% of the ratings) from sparse id features
(user, movie, demographics, zip, genres, release year) and hashed crosses (user x genre, movie x age
bucket, ...). Every id is a 64-bit hash of (field, value) (see ``movielens_data.py``). The ratings
are sorted by time; the test set is each user's latest 20% (``--split user``, the default) or the
latest 20% of all ratings (``--split global``). The global split is mostly a cold-start task (85%
of its test ratings are by users with no training rating) on which nothing here gets past AUC
~0.70; the per-user split asks the usual question, a known user's next ratings, and reaches ~0.79.

Model (forward and backward written by hand in numpy)::

    e_f   = mean over the ids of field f of their rows      (rows are [w | v], dim 1 + k)
    logit = bias + sum_f w_f                                 first order
                 + sum_{f<g} <v_f, v_g>                      factorization machine
                 + relu(concat(v) @ W1 + b1) @ W2            MLP over the field embeddings

One embedding table per field (14 tables), each row holding the field value's first-order weight in
column 0 and its k-dim factor after it: a table per field lets the job report how many rows each
feature grows (the crosses dominate), and one row per id halves the ids on the wire compared with
separate first-order tables. Ids are salted by field, so the 14 tables could be merged into one
without collisions. Embedding rows train with Adagrad, the dense MLP and bias with Adam.

Run it distributed (every worker trains on its rank-strided shard of the training part; each step
is one pull and one push, each a single RPC per server carrying all 14 tables and the dense
weights; rank 0 evaluates after the final barrier)::

    paramserver launch --num-servers 2 --num-workers 2 -- python examples/movielens_ctr.py

or as the single-process reference, same model, same update rules, tables held in this process::

    python examples/movielens_ctr.py --local

The last line of rank 0 is ``RESULT {json}`` (test AUC, log-loss, training time, rows per table).
Exit status: 0; 2 when ``--target-auc`` is given and not reached (``paramserver launch`` passes a
worker's failing code on); 3 when the data is not installed (``pip install --no-deps recbole``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # movielens_data.py sits next to this file
from movielens_data import FIELDS, SPLITS, Dataset, DatasetMissingError, Field, auc, load  # noqa: E402
from results import result_line  # noqa: E402

DENSE_TABLES = ("bias", "mlp.w1", "mlp.b1", "mlp.w2")
#: Exit code when the test AUC is below --target-auc.
EXIT_BELOW_TARGET = 2
#: Exit code when the MovieLens files (the recbole wheel) are not installed.
EXIT_NO_DATA = 3


@dataclass(frozen=True)
class Config:
    """Hyperparameters; the defaults reach test AUC ~0.79 (per-user split) in one epoch, after
    which the crosses start to overfit."""

    dim: int = 8             # factor size k (rows hold 1 + k floats)
    hidden: int = 32         # MLP hidden units
    epochs: int = 1
    batch_size: int = 256    # examples per step per worker
    emb_lr: float = 0.02     # Adagrad on embedding rows
    emb_l2: float = 1e-4     # Adagrad weight decay, applied to a row when it is pushed
    dense_lr: float = 2e-3   # Adam on the MLP and the bias
    init_std: float = 0.01   # embedding rows start at N(0, init_std)
    seed: int = 0


# -- the single-process reference: tables held here, same API subset and update rules ----------

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


class LocalNormal:
    """N(mean, std) row initializer; a row's values depend only on (seed, id, column)."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    def rows(self, seed: int, ids: np.ndarray, dim: int) -> np.ndarray:
        # Two independent uniforms per value from a counter-based hash, then Box-Muller.
        key = _splitmix64(ids.astype(_U64)[:, None] ^ _splitmix64(np.full((1, 1), seed, _U64)))
        col = np.arange(dim, dtype=_U64)[None, :] * _U64(2)
        bits1, bits2 = _splitmix64(key + col), _splitmix64(key + col + _U64(1))
        u1 = ((bits1 >> _U64(11)).astype(np.float64) + 1.0) * 2.0 ** -53   # (0, 1]
        u2 = (bits2 >> _U64(11)).astype(np.float64) * 2.0 ** -53
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return (self.mean + self.std * z).astype(np.float32)


class LocalAdagrad:
    """``torch.optim.Adagrad`` (lr_decay 0): s += g*g; theta -= lr * g / (sqrt(s) + eps)."""

    num_slots = 1

    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.0, eps: float = 1e-10) -> None:
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps

    def step(self, param: np.ndarray, grad: np.ndarray, state: list[np.ndarray],
             steps: np.ndarray) -> np.ndarray:
        """Update rows ``param`` (a copy) with ``grad``; ``state[0]`` is the sum of squares."""
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        state[0] += grad * grad
        return param - self.lr * grad / (np.sqrt(state[0]) + self.eps)


class LocalAdam:
    """``torch.optim.Adam`` (no weight decay, no amsgrad), with its own step count per tensor."""

    num_slots = 2

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps

    def step(self, param: np.ndarray, grad: np.ndarray, state: list[np.ndarray],
             steps: np.ndarray) -> np.ndarray:
        beta1, beta2 = self.betas
        m, v = state
        m += (1.0 - beta1) * (grad - m)
        v *= beta2
        v += (1.0 - beta2) * grad * grad
        t = steps.astype(np.float64)  # per row (embeddings) or per tensor (dense)
        bc1 = (1.0 - beta1 ** t).astype(np.float32)
        bc2 = np.sqrt(1.0 - beta2 ** t).astype(np.float32)
        return param - (self.lr / bc1) * m / (np.sqrt(v) / bc2 + self.eps)


LOCAL_API = SimpleNamespace(Adagrad=LocalAdagrad, Adam=LocalAdam,
                            init=SimpleNamespace(normal=LocalNormal))


class _LocalEmbedding:
    """Rows keyed by 64-bit id, created on first touch, held in growing arrays."""

    def __init__(self, name: str, dim: int, optimizer: Any, init: LocalNormal, seed: int) -> None:
        self.name, self.dim, self.optimizer, self.init, self.seed = name, dim, optimizer, init, seed
        self._index: dict[int, int] = {}
        self._values = np.zeros((0, dim), np.float32)
        self._state = [np.zeros((0, dim), np.float32) for _ in range(optimizer.num_slots)]
        self._steps = np.zeros(0, np.int64)

    def num_rows(self) -> int:
        return len(self._index)

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        index = self._index
        slots = np.fromiter((index.get(i, -1) for i in ids.tolist()), np.int64, ids.size)
        new = slots < 0
        if new.any():
            new_ids = np.unique(ids[new])
            first = len(index)
            for j, i in enumerate(new_ids.tolist()):
                index[i] = first + j
            grow = lambda a, fill: np.concatenate([a, fill])  # noqa: E731
            self._values = grow(self._values, self.init.rows(self.seed, new_ids, self.dim))
            zeros = np.zeros((new_ids.size, self.dim), np.float32)
            self._state = [grow(s, zeros) for s in self._state]
            self._steps = grow(self._steps, np.zeros(new_ids.size, np.int64))
            slots[new] = np.fromiter((index[i] for i in ids[new].tolist()), np.int64,
                                     int(new.sum()))
        return slots

    def pull(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).astype(_U64, copy=False)
        slots = self._slots(ids.reshape(-1))  # may grow self._values: index it afterwards
        return self._values[slots].reshape(*ids.shape, self.dim)

    def push(self, ids: np.ndarray, grads: np.ndarray) -> None:
        ids = np.asarray(ids).astype(_U64, copy=False).reshape(-1)
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = np.zeros((uniq.size, self.dim), np.float32)
        np.add.at(summed, inverse.reshape(-1), grads.reshape(-1, self.dim))
        slots = self._slots(uniq)
        self._steps[slots] += 1
        state = [s[slots] for s in self._state]
        steps = self._steps[slots][:, None]
        self._values[slots] = self.optimizer.step(self._values[slots], summed, state, steps)
        for full, part in zip(self._state, state):
            full[slots] = part


class _LocalDense:
    def __init__(self, name: str, shape: tuple[int, ...], optimizer: Any, init: Any) -> None:
        self.name, self.optimizer = name, optimizer
        values = init(shape) if callable(init) else init
        self.values = (np.zeros(shape, np.float32) if values is None
                       else np.array(values, dtype=np.float32).reshape(shape))
        self.state = [np.zeros(shape, np.float32) for _ in range(optimizer.num_slots)]
        self.steps = np.zeros((), np.int64)

    def push(self, grad: np.ndarray) -> None:
        self.steps += 1
        self.values = self.optimizer.step(self.values, grad, self.state, self.steps)


class LocalClient:
    """The subset of ``paramserver.Client`` this example uses, in one process with no servers."""

    rank = 0
    num_workers = 1
    num_servers = 0

    def __init__(self) -> None:
        self._emb: dict[str, _LocalEmbedding] = {}
        self._dense: dict[str, _LocalDense] = {}

    def embedding(self, name: str, dim: int, optimizer: Any, init: LocalNormal,
                  seed: int = 0) -> _LocalEmbedding:
        self._emb[name] = _LocalEmbedding(name, dim, optimizer, init, seed)
        return self._emb[name]

    def dense(self, name: str, shape: tuple[int, ...], optimizer: Any, init: Any = None) -> None:
        self._dense[name] = _LocalDense(name, tuple(shape), optimizer, init)

    def pull(self, tables: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        return {name: (self._dense[name].values.copy() if ids is None
                       else self._emb[name].pull(ids)) for name, ids in tables.items()}

    def push(self, grads: dict[str, Any]) -> None:
        for name, grad in grads.items():
            if name in self._dense:
                self._dense[name].push(grad)
            else:
                self._emb[name].push(*grad)

    def barrier(self, name: str = "default") -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the model ----------------------------------------------------------------------------------

@dataclass
class _Lookup:
    """One field of a batch: the distinct ids to fetch and where each slot's row is among them."""

    uniq: np.ndarray      # (U,) uint64
    pos: np.ndarray       # (B, L) index into uniq (0 on padding slots)
    weights: np.ndarray   # (B, L) mean-pooling weights, 0 on padding slots

    @classmethod
    def of(cls, field: Field) -> _Lookup:
        valid = field.weights > 0
        uniq, inverse = np.unique(field.ids[valid], return_inverse=True)
        pos = np.zeros(field.ids.shape, np.int64)
        pos[valid] = inverse.reshape(-1)
        return cls(uniq, pos, field.weights)


class DeepFM:
    """First-order weights + FM + MLP over per-field embeddings, on any client with the
    paramserver API (``paramserver.Client`` or :class:`LocalClient`)."""

    def __init__(self, client: Any, api: Any, cfg: Config,
                 fields: tuple[str, ...] = FIELDS) -> None:
        self.client, self.cfg, self.fields = client, cfg, fields
        k, h, nf = cfg.dim, cfg.hidden, len(fields)
        self.tables = {
            f: client.embedding(f, dim=1 + k, optimizer=api.Adagrad(lr=cfg.emb_lr,
                                                                    weight_decay=cfg.emb_l2),
                                init=api.init.normal(0.0, cfg.init_std), seed=cfg.seed)
            for f in fields}
        rng = np.random.default_rng(cfg.seed)  # the same arrays on every worker; one of them wins
        adam = api.Adam(lr=cfg.dense_lr)
        client.dense("bias", shape=(1,), optimizer=adam, init=np.zeros(1, np.float32))
        client.dense("mlp.w1", shape=(nf * k, h), optimizer=adam,
                     init=(rng.standard_normal((nf * k, h)) * math.sqrt(2.0 / (nf * k)))
                     .astype(np.float32))
        client.dense("mlp.b1", shape=(h,), optimizer=adam, init=np.zeros(h, np.float32))
        client.dense("mlp.w2", shape=(h, 1), optimizer=adam,
                     init=(rng.standard_normal((h, 1)) * math.sqrt(1.0 / h)).astype(np.float32))

    def lookups(self, data: Dataset, rows: np.ndarray) -> dict[str, _Lookup]:
        return {f: _Lookup.of(data.fields[f].take(rows)) for f in self.fields}

    def pull(self, lookups: dict[str, _Lookup]) -> dict[str, np.ndarray]:
        """Dense weights and the batch's rows: one pull, one RPC per server."""
        request: dict[str, np.ndarray | None] = dict.fromkeys(DENSE_TABLES)
        request.update({f: lk.uniq for f, lk in lookups.items()})
        return self.client.pull(request)

    def forward(self, values: dict[str, np.ndarray], lookups: dict[str, _Lookup]
                ) -> tuple[np.ndarray, dict[str, Any]]:
        """Logits (B,) and what the backward pass needs."""
        pooled = []
        for f in self.fields:
            lk = lookups[f]
            rows = values[f][lk.pos]                                    # (B, L, 1+k)
            pooled.append(rows[:, 0] if lk.pos.shape[1] == 1
                          else np.einsum("bl,bld->bd", lk.weights, rows))
        e = np.stack(pooled, axis=1)                                    # (B, F, 1+k)
        v = e[:, :, 1:]
        s = v.sum(axis=1)                                               # (B, k)
        fm = 0.5 * (s * s - (v * v).sum(axis=1)).sum(axis=1)
        x = v.reshape(v.shape[0], -1)
        pre = x @ values["mlp.w1"] + values["mlp.b1"]
        hid = np.maximum(pre, 0.0)
        mlp = (hid @ values["mlp.w2"])[:, 0]
        logits = values["bias"][0] + e[:, :, 0].sum(axis=1) + fm + mlp
        return logits, {"v": v, "s": s, "x": x, "pre": pre, "hid": hid}

    def backward(self, values: dict[str, np.ndarray], lookups: dict[str, _Lookup],
                 cache: dict[str, Any], g: np.ndarray) -> dict[str, Any]:
        """Gradients for every table given d(loss)/d(logit) ``g`` (B,), in push form."""
        v, s, x, pre, hid = cache["v"], cache["s"], cache["x"], cache["pre"], cache["hid"]
        b, nf, k = v.shape
        g = g.astype(np.float32)
        grads: dict[str, Any] = {"bias": np.array([g.sum()], np.float32),
                                 "mlp.w2": hid.T @ g[:, None]}
        g_pre = (g[:, None] * values["mlp.w2"][:, 0]) * (pre > 0)
        grads["mlp.w1"] = x.T @ g_pre
        grads["mlp.b1"] = g_pre.sum(axis=0)
        g_v = (g[:, None, None] * (s[:, None, :] - v)                 # FM: d/dv_f = s - v_f
               + (g_pre @ values["mlp.w1"].T).reshape(b, nf, k))
        g_e = np.concatenate([np.broadcast_to(g[:, None, None], (b, nf, 1)), g_v], axis=2)
        for i, f in enumerate(self.fields):
            lk = lookups[f]
            row_grads = np.zeros((lk.uniq.size, 1 + k), np.float32)
            if lk.pos.shape[1] == 1:
                np.add.at(row_grads, lk.pos[:, 0], g_e[:, i])
            else:
                valid = lk.weights > 0
                contrib = lk.weights[:, :, None] * g_e[:, i][:, None, :]   # (B, L, 1+k)
                np.add.at(row_grads, lk.pos[valid], contrib[valid])
            grads[f] = (lk.uniq, row_grads)
        return {name: (val if isinstance(val, tuple) else np.ascontiguousarray(val, np.float32))
                for name, val in grads.items()}

    def train_step(self, data: Dataset, rows: np.ndarray) -> float:
        """One step on ``rows``: one pull, forward, backward, one push; returns the loss."""
        lookups = self.lookups(data, rows)
        values = self.pull(lookups)
        logits, cache = self.forward(values, lookups)
        y = data.labels[rows]
        p = _sigmoid(logits)
        self.client.push(self.backward(values, lookups, cache, (p - y) / rows.size))
        return _logloss(y, logits)

    def predict(self, data: Dataset, rows: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Logits of examples ``rows`` (pulls create the rows of ids not seen in training)."""
        out = []
        for start in range(0, rows.size, batch):
            lookups = self.lookups(data, rows[start:start + batch])
            out.append(self.forward(self.pull(lookups), lookups)[0])
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _logloss(y: np.ndarray, logits: np.ndarray) -> float:
    # log(1 + exp(-z)) for y=1 and log(1 + exp(z)) for y=0, computed stably.
    z = np.where(y > 0.5, logits, -logits).astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, -z)))


# -- the job ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--local", action="store_true",
                   help="train in this one process with no servers (the reference)")
    p.add_argument("--split", choices=SPLITS, default="user",
                   help="time-ordered split: each user's latest 20%% (user) or the latest 20%% of "
                        "all ratings (global, mostly unseen users)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="examples per step per worker")
    p.add_argument("--dim", type=int, default=d.dim, help="factor size k")
    p.add_argument("--hidden", type=int, default=d.hidden, help="MLP hidden units")
    p.add_argument("--emb-lr", type=float, default=d.emb_lr, help="Adagrad learning rate")
    p.add_argument("--emb-l2", type=float, default=d.emb_l2, help="Adagrad weight decay")
    p.add_argument("--dense-lr", type=float, default=d.dense_lr, help="Adam learning rate")
    p.add_argument("--init-std", type=float, default=d.init_std)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per remote call")
    p.add_argument("--target-auc", type=float, default=None,
                   help="exit with status 2 if rank 0's test AUC is below this")
    a = p.parse_args(argv)
    cfg = Config(dim=a.dim, hidden=a.hidden, epochs=a.epochs, batch_size=a.batch_size,
                 emb_lr=a.emb_lr, emb_l2=a.emb_l2, dense_lr=a.dense_lr, init_std=a.init_std,
                 seed=a.seed)
    return a, cfg


def _connect(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.local:
        return LocalClient(), LOCAL_API
    import paramserver as ps
    from paramserver import init as ps_init
    api = SimpleNamespace(Adagrad=ps.Adagrad, Adam=ps.Adam, init=ps_init)
    return ps.connect(timeout=args.timeout), api


def run(args: argparse.Namespace, cfg: Config, data: Dataset) -> dict[str, Any] | None:
    """Train and (on rank 0) evaluate; returns the result on rank 0, None on other ranks."""
    client, api = _connect(args)
    with client:
        rank, workers = client.rank, max(1, client.num_workers)
        tag = "local" if args.local else f"rank {rank}/{workers}"
        if getattr(client, "restored_version", 0):  # the tables hold the checkpoint's values
            print(f"[{tag}] resumed from checkpoint {client.restored_version} (metadata "
                  f"{client.restored_metadata}): training epochs 1-{cfg.epochs} from its "
                  f"weights", flush=True)
        model = DeepFM(client, api, cfg)
        shard = data.train[rank::workers]
        steps_per_epoch = -(-shard.size // cfg.batch_size)
        print(f"[{tag}] {shard.size} training examples, {steps_per_epoch} steps/epoch x "
              f"{cfg.epochs} epochs; {len(FIELDS)} embedding tables dim {1 + cfg.dim}", flush=True)
        client.barrier("start")
        t0 = time.perf_counter()
        for epoch in range(cfg.epochs):
            order = np.random.default_rng([cfg.seed, epoch, rank]).permutation(shard)
            losses, tick, seen = [], time.perf_counter(), 0
            for step, start in enumerate(range(0, order.size, cfg.batch_size), 1):
                rows = order[start:start + cfg.batch_size]
                losses.append(model.train_step(data, rows))
                seen += rows.size
                if step % args.log_every == 0 or step == steps_per_epoch:
                    now = time.perf_counter()
                    print(f"[{tag}] epoch {epoch + 1} step {step}/{steps_per_epoch} "
                          f"loss {np.mean(losses[-args.log_every:]):.4f} "
                          f"{seen / max(now - tick, 1e-9):.0f} examples/s", flush=True)
                    tick, seen = now, 0
        client.barrier("trained")
        train_seconds = time.perf_counter() - t0
        if rank != 0:
            return None
        # Count before evaluating: pulling test ids creates rows for ids training never saw.
        rows = {f: int(t.num_rows()) for f, t in model.tables.items()}
        test = data.test
        logits = model.predict(data, test)
        y = data.labels[test]
        result = {
            "mode": "local" if args.local else "distributed",
            "test_auc": round(auc(y, logits), 5),
            "test_logloss": round(_logloss(y, logits), 5),
            "train_seconds": round(train_seconds, 2),
            "num_workers": workers,
            "num_servers": client.num_servers,
            "train_examples": int(data.train.size),
            "split": data.split,
            "test_examples": int(test.size),
            "rows_per_table": rows,
            "total_rows": sum(rows.values()),
            "config": asdict(cfg),
        }
        return result


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    t0 = time.perf_counter()
    try:
        data = load(split=args.split)
    except DatasetMissingError as exc:
        print(f"movielens_ctr: {exc}", file=sys.stderr)
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
