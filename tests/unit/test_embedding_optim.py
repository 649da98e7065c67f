"""Each embedding row is torch.optim applied to that row alone, over the pushes that touched it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import paramserver as ps
from tests.unit.embedding_helpers import id_pool, initial_rows, make_table

DIM = 6
PUSHES = 30
POOL = 40
BATCH = 24
INIT = ps.init.normal(0.0, 0.3)
SEED = 1234

OPTIMIZERS = [
    ps.SGD(lr=0.1),
    ps.SGD(lr=0.05, momentum=0.9),
    ps.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ps.SGD(lr=0.05, momentum=0.5, dampening=0.3, maximize=True),
    ps.Adagrad(lr=0.1),
    ps.Adagrad(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=0.01),
    ps.Adam(lr=0.01),
    ps.Adam(lr=0.01, weight_decay=0.01, amsgrad=True),
    ps.AdamW(lr=0.01),
    ps.AdamW(lr=0.02, betas=(0.8, 0.99), amsgrad=True, maximize=True),
]


def _batches(seed: int, pool: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random pushes over `pool` with duplicates; some rows are never pushed."""
    rng = np.random.default_rng(seed)
    pushed = pool[: POOL - 5]  # the last 5 ids are only pulled
    out = []
    for _ in range(PUSHES):
        idx = rng.integers(0, len(pushed), BATCH)
        idx[:3] = idx[3]  # at least one id three times more
        grads = rng.standard_normal((BATCH, DIM)).astype(np.float32)
        out.append((pushed[idx], grads))
    return out


def _coalesce(pool: np.ndarray, ids: np.ndarray, grads: np.ndarray) -> dict[int, torch.Tensor]:
    """Summed gradient per distinct id, by torch's own sparse coalesce."""
    position = {int(v): i for i, v in enumerate(pool)}
    index = torch.tensor([[position[int(v)] for v in ids]])
    sparse = torch.sparse_coo_tensor(index, torch.from_numpy(grads), (len(pool), grads.shape[1]),
                                     check_invariants=True).coalesce()
    return {int(pool[i]): v.clone() for i, v in zip(sparse.indices()[0].tolist(), sparse.values())}


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=repr)
def test_rows_match_torch_optimizer_per_row(optimizer: ps.Optimizer) -> None:
    pool = id_pool(np.random.default_rng(7), POOL)
    table = make_table(DIM, optimizer, INIT, SEED)
    start = initial_rows(INIT, SEED, pool, DIM)
    params = {int(v): torch.nn.Parameter(torch.from_numpy(start[i].copy()))
              for i, v in enumerate(pool)}
    torch_opt = getattr(torch.optim, type(optimizer).__name__)(
        list(params.values()), **optimizer.hyperparameters(), foreach=False)
    pushes = {int(v): 0 for v in pool}

    for ids, grads in _batches(11, pool):
        table.push(ids, grads)
        summed = _coalesce(pool, ids, grads)
        for key, p in params.items():
            p.grad = summed.get(key)  # None: torch skips the row entirely, state and step included
        torch_opt.step()
        for key in summed:
            pushes[key] += 1

    got = table.pull(pool)
    want = torch.stack([params[int(v)].detach() for v in pool]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Rows never pushed keep their initial values exactly.
    np.testing.assert_array_equal(got[-5:], start[-5:])
    ids, values, slots, steps = table.export_rows()
    step_of = dict(zip(ids.tolist(), steps.tolist()))
    assert step_of == {k: n for k, n in pushes.items()}
    assert slots.shape == (POOL, optimizer.num_slots, DIM)


@pytest.mark.parametrize("optimizer", [ps.SGD(lr=0.1), ps.Adagrad(lr=0.1),
                                       ps.Adagrad(lr=0.3, initial_accumulator_value=0.5, eps=1e-6)],
                         ids=repr)
def test_rows_match_torch_sparse_embedding(optimizer: ps.Optimizer) -> None:
    """torch.nn.Embedding(sparse=True) + optimizer, where torch supports sparse gradients."""
    pool = id_pool(np.random.default_rng(3), POOL)
    table = make_table(DIM, optimizer, INIT, SEED)
    emb = torch.nn.Embedding(POOL, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(initial_rows(INIT, SEED, pool, DIM)))
    torch_opt = getattr(torch.optim, type(optimizer).__name__)(
        emb.parameters(), **optimizer.hyperparameters(), foreach=False)
    position = {int(v): i for i, v in enumerate(pool)}

    # Opting in explicitly: torch warns when its sparse optimizers build tensors unchecked.
    with torch.sparse.check_sparse_tensor_invariants(enable=True):
        for ids, grads in _batches(5, pool):
            table.push(ids, grads)
            torch_opt.zero_grad()
            index = torch.tensor([position[int(v)] for v in ids])
            (emb(index) * torch.from_numpy(grads)).sum().backward()
            torch_opt.step()

    np.testing.assert_allclose(table.pull(pool), emb.weight.detach().numpy(), rtol=1e-5,
                               atol=1e-6)


def test_duplicates_are_summed_in_request_order_like_torch_coalesce() -> None:
    # (1e8 + 1) - 1e8 is 0 in float32, 1e8 + (1 - 1e8) is not: the order is observable.
    table = make_table(1, ps.SGD(lr=1.0))
    ids = np.array([5, 9, 5, 5], dtype=np.int64)
    grads = np.array([[1e8], [1.0], [1.0], [-1e8]], dtype=np.float32)
    table.push(ids, grads)
    summed = _coalesce(np.array([5, 9], dtype=np.uint64), ids.astype(np.uint64), grads)
    np.testing.assert_array_equal(table.pull(np.array([5, 9], dtype=np.int64)),
                                  -torch.stack([summed[5], summed[9]]).numpy())
    assert table.pull(np.array([5], dtype=np.int64))[0, 0] == 0.0


def test_adam_step_counts_are_per_row() -> None:
    """A row first pushed late gets Adam's first-step bias correction, not the table's."""
    opt = ps.Adam(lr=0.1)
    table = make_table(3, opt)
    g = np.ones((1, 3), dtype=np.float32)
    for _ in range(5):
        table.push(np.array([1], dtype=np.int64), g)
    table.push(np.array([2], dtype=np.int64), g)
    # Adam's first step moves every element by lr (m/sqrt(v) = 1 after bias correction).
    np.testing.assert_allclose(table.pull(np.array([2], dtype=np.int64)), [[-0.1] * 3], rtol=1e-5)
    ids, _, _, steps = table.export_rows()
    assert dict(zip(ids.tolist(), steps.tolist())) == {1: 5, 2: 1}


def test_large_batch_on_two_threads_equals_one_thread() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3000, 20000).astype(np.int64)
    grads = rng.standard_normal((20000, 16)).astype(np.float32)
    a = make_table(16, ps.Adam(lr=0.01), ps.init.uniform(), 3)
    b = make_table(16, ps.Adam(lr=0.01), ps.init.uniform(), 3)
    for _ in range(3):
        a.push(ids, grads, num_threads=1)
        b.push(ids, grads, num_threads=2)
    probe = np.arange(3000, dtype=np.int64)
    np.testing.assert_array_equal(a.pull(probe, num_threads=1), b.pull(probe, num_threads=2))
