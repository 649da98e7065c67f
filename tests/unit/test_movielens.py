"""The MovieLens CTR example's parts, without servers or data files: the AUC against scikit-learn,
the 64-bit feature hashing, the time-ordered splits, the hand-written backward pass against finite
differences, and the single-process reference's update rules against ``torch.optim``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import movielens_ctr as ctr  # noqa: E402
import movielens_data as mld  # noqa: E402

# -- AUC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    labels = (rng.random(5000) < 0.55).astype(np.float32)
    # Informative scores rounded to few values, so many are tied across both classes.
    scores = np.round(labels + rng.normal(0.0, 1.5, labels.size), 1)
    expected = metrics.roc_auc_score(labels, scores)
    assert 0.55 < expected < 0.95
    assert mld.auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_auc_extremes_and_errors() -> None:
    labels = np.array([0, 0, 1, 1], np.float32)
    assert mld.auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert mld.auc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert mld.auc(labels, np.zeros(4)) == 0.5  # all tied
    with pytest.raises(ValueError, match="both positive and negative"):
        mld.auc(np.ones(3), np.arange(3.0))
    with pytest.raises(ValueError, match="shape"):
        mld.auc(labels, np.arange(3.0))


# -- features -----------------------------------------------------------------------------------


def test_feature_ids_are_stable_salted_and_span_64_bits() -> None:
    # Pinned: a change of the hash would silently change every id (and every trained table).
    assert mld.stable_id("user", "196") == mld.stable_id("user", "196") == 0x3DBA2556A654E013
    assert mld.stable_id("user", "1") != mld.stable_id("item", "1")
    users = np.array([mld.stable_id("user", u) for u in range(1000)], np.uint64)
    assert (users >= np.uint64(2**63)).mean() == pytest.approx(0.5, abs=0.06)
    a = mld.cross_ids("user_x_genre", users[:, None], users[None, :50])
    b = mld.cross_ids("user_x_age", users[:, None], users[None, :50])
    assert a.shape == (1000, 50) and a.dtype == np.uint64
    assert np.unique(a).size == a.size                       # no collisions among 50,000 crosses
    assert np.intersect1d(a, b).size == 0                    # another field, other ids
    assert np.array_equal(a, mld.cross_ids("user_x_genre", users[:, None], users[None, :50]))


def test_user_split_holds_out_each_users_latest_ratings() -> None:
    rng = np.random.default_rng(0)
    user = rng.integers(0, 30, 2000).astype(np.uint64)  # examples already in time order
    train, test = mld.split_rows(user, "user", 0.2)
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == user.size
    for u in range(30):
        rows = np.flatnonzero(user == u)
        held = np.intersect1d(rows, test)
        assert held.size == round(rows.size * 0.2)
        assert np.array_equal(held, rows[rows.size - held.size:])  # the latest ones
    g_train, g_test = mld.split_rows(user, "global", 0.2)
    assert np.array_equal(g_train, np.arange(1600))
    assert np.array_equal(g_test, np.arange(1600, 2000))
    with pytest.raises(ValueError, match="split must be one of"):
        mld.split_rows(user, "random", 0.2)


# -- the model's backward pass ------------------------------------------------------------------


def _synthetic_batch(rng: np.random.Generator, batch: int) -> dict[str, mld.Field]:
    pool = np.array([mld.stable_id("x", i) for i in range(5)], np.uint64)
    single = lambda: mld.Field(rng.choice(pool, (batch, 1)),  # noqa: E731  (duplicates on purpose)
                               np.ones((batch, 1), np.float32))
    counts = rng.integers(1, 4, batch)
    ids = rng.choice(pool, (batch, 3))
    weights = np.where(np.arange(3)[None, :] < counts[:, None], 1.0 / counts[:, None], 0.0)
    ids = np.where(weights > 0, ids, np.uint64(0))
    return {"a": single(), "b": single(), "m": mld.Field(ids, weights.astype(np.float32))}


def test_backward_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    fields = _synthetic_batch(rng, batch=9)
    cfg = ctr.Config(dim=3, hidden=5)
    model = ctr.DeepFM(ctr.LocalClient(), ctr.LOCAL_API, cfg, fields=tuple(fields))
    lookups = {f: ctr._Lookup.of(field) for f, field in fields.items()}
    y = (rng.random(9) < 0.5).astype(np.float64)
    # float64 values, large enough that the FM and the MLP matter.
    values = {"bias": rng.normal(size=1), "mlp.w1": rng.normal(size=(9, 5)),
              "mlp.b1": rng.normal(size=5), "mlp.w2": rng.normal(size=(5, 1))}
    values.update({f: rng.normal(0.0, 0.7, (lk.uniq.size, 4)) for f, lk in lookups.items()})

    def loss() -> float:
        logits = model.forward(values, lookups)[0]
        return float(np.mean(np.logaddexp(0.0, -np.where(y > 0.5, logits, -logits))))

    logits, cache = model.forward(values, lookups)
    grads = model.backward(values, lookups, cache, (ctr._sigmoid(logits) - y) / y.size)
    checked = 0
    for name, value in values.items():
        grad = grads[name]
        if isinstance(grad, tuple):
            ids, grad = grad
            assert np.array_equal(ids, lookups[name].uniq)
        assert grad.shape == value.shape, name
        for index in np.ndindex(value.shape):
            old = value[index]
            value[index] = old + 1e-6
            up = loss()
            value[index] = old - 1e-6
            down = loss()
            value[index] = old
            assert grad[index] == pytest.approx((up - down) / 2e-6, rel=1e-3, abs=1e-6), (name,
                                                                                          index)
            checked += 1
    assert checked > 90


# -- the single-process reference's tables and optimizers ----------------------------------------


def test_local_adagrad_and_adam_follow_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, 6)).astype(np.float32)
    grads = rng.normal(size=(5, 4, 6)).astype(np.float32)
    for local, make in [
        (ctr.LocalAdagrad(lr=0.05, weight_decay=1e-2),
         lambda p: torch.optim.Adagrad([p], lr=0.05, weight_decay=1e-2)),
        (ctr.LocalAdam(lr=1e-2), lambda p: torch.optim.Adam([p], lr=1e-2)),
    ]:
        param = torch.tensor(start.copy(), requires_grad=True)
        opt = make(param)
        values = start.copy()
        state = [np.zeros_like(values) for _ in range(local.num_slots)]
        for step, g in enumerate(grads, 1):
            param.grad = torch.tensor(g)
            opt.step()
            values = local.step(values, g, state, np.array(step))
            np.testing.assert_allclose(values, param.detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=type(local).__name__)


def test_local_embedding_sums_duplicates_and_steps_each_row_once() -> None:
    client = ctr.LocalClient()
    table = client.embedding("t", dim=2, optimizer=ctr.LocalAdagrad(lr=0.1),
                             init=ctr.LocalNormal(0.0, 0.01), seed=3)
    ids = np.array([2**64 - 1, 5, 2**64 - 1], np.uint64)
    before = table.pull(ids)
    assert before.shape == (3, 2) and table.num_rows() == 2
    assert np.array_equal(before[0], before[2])
    # Initial rows depend only on (seed, id): the same from another table, in another order.
    other = ctr.LocalClient().embedding("u", dim=2, optimizer=ctr.LocalAdagrad(),
                                        init=ctr.LocalNormal(0.0, 0.01), seed=3)
    assert np.array_equal(other.pull(ids[::-1]), before[::-1])
    client.push({"t": (ids, np.array([[1, 0], [0, 2], [3, 0]], np.float32))})
    after = table.pull(ids)
    # One Adagrad step with the summed gradient [4, 0]: theta -= lr * g / |g| per nonzero element.
    np.testing.assert_allclose(after[0] - before[0], [-0.1, 0.0], atol=1e-7)
    np.testing.assert_allclose(after[1] - before[1], [0.0, -0.1], atol=1e-7)
    assert table._steps.tolist() == [1, 1]
