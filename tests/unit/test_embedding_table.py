"""EmbeddingTable: row creation, ids, concurrency, checkpoints and input checking."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import paramserver as ps
from paramserver import _core
from tests.unit.embedding_helpers import EDGE_IDS, make_table


def test_pull_creates_rows_in_request_order_and_counts_distinct_ids() -> None:
    table = make_table(4, ps.Adagrad(), ps.init.normal(0.0, 1.0), seed=1)
    assert table.num_rows() == 0
    ids = np.array([[7, 3], [7, 2**64 - 1]], dtype=np.uint64)
    out = table.pull(ids)
    assert out.shape == (2, 2, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], out[1, 0])
    assert table.num_rows() == 3
    assert table.contains(7) and table.contains(2**64 - 1) and table.contains(-1)
    assert not table.contains(8)
    # Each row is where the request put it.
    for (i, j), v in np.ndenumerate(ids):
        np.testing.assert_array_equal(out[i, j], table.pull(np.array([v], np.uint64))[0])
    assert table.num_rows() == 3


def test_int64_ids_are_the_same_bits_as_uint64() -> None:
    table = make_table(3, ps.SGD(lr=1.0), ps.init.uniform(), seed=2)
    signed = EDGE_IDS.view(np.int64)
    np.testing.assert_array_equal(table.pull(signed), table.pull(EDGE_IDS))
    table.push(signed, np.ones((len(signed), 3), np.float32))
    assert table.num_rows() == len(EDGE_IDS)
    np.testing.assert_array_equal(sorted(table.export_rows()[0].tolist()),
                                  sorted(int(v) for v in EDGE_IDS))


def test_push_creates_missing_rows_and_leaves_others_untouched() -> None:
    table = make_table(2, ps.SGD(lr=0.5), ps.init.normal(), seed=4)
    before = table.pull(np.array([1, 2], np.int64))
    table.push(np.array([2, 9], np.int64), np.ones((2, 2), np.float32))
    after = table.pull(np.array([1, 2], np.int64))
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1] - 0.5)
    assert table.num_rows() == 3


def test_pull_into_out() -> None:
    table = make_table(3, initializer=ps.init.uniform())
    out = np.zeros((2, 3), np.float32)
    result = table.pull(np.array([4, 5], np.int64), out=out)
    assert result is out and out.any()
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3\), got \(3, 3\)"):
        table.pull(np.array([4, 5], np.int64), out=np.zeros((3, 3), np.float32))


@pytest.mark.parametrize("internal_threads", [1, 2])
def test_concurrent_pushes_lose_no_update(internal_threads: int) -> None:
    """Integer gradients and SGD lr=1: the final values are exact. Batches of 16,384 x 64 (1M
    elements) are large enough for the table to use the threads it is allowed."""
    dim, pool, workers, rounds, batch = 64, 300, 4, 5, 16384
    table = make_table(dim, ps.SGD(lr=1.0))
    expected = np.zeros((pool, dim), np.float64)
    plans = []
    for w in range(workers):
        rng = np.random.default_rng(w)
        plan = []
        for _ in range(rounds):
            ids = rng.integers(0, pool, batch)
            grads = rng.integers(-3, 4, (batch, dim)).astype(np.float32)
            np.add.at(expected, ids, grads)
            plan.append((ids.astype(np.int64), grads))
        plans.append(plan)
    errors: list[BaseException] = []

    def run(plan: list[tuple[np.ndarray, np.ndarray]]) -> None:
        try:
            for ids, grads in plan:
                table.push(ids, grads, num_threads=internal_threads)
                table.pull(ids[:50], num_threads=internal_threads)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_array_equal(table.pull(np.arange(pool, dtype=np.int64)), -expected)
    steps = dict(zip(*[a.tolist() for a in table.export_rows()[::3]]))
    assert sum(steps.values()) == sum(len(np.unique(ids)) for p in plans for ids, _ in p)


def _snapshot(table: _core.EmbeddingTable) -> tuple[int, list[np.ndarray]]:
    return table.num_rows(), [a.copy() for a in table.export_rows()]


def _assert_unchanged(table: _core.EmbeddingTable, snap: tuple[int, list[np.ndarray]]) -> None:
    rows, arrays = snap
    assert table.num_rows() == rows
    for a, b in zip(table.export_rows(), arrays):
        np.testing.assert_array_equal(a, b)


def test_bad_input_raises_clearly_and_changes_nothing() -> None:
    table = make_table(4, ps.Adam(), ps.init.normal(), seed=3)
    table.push(np.array([1, 2], np.int64), np.ones((2, 4), np.float32))
    snap = _snapshot(table)
    ids = np.array([1, 5, 6], np.int64)
    good = np.ones((3, 4), np.float32)
    cases = [
        (TypeError, r"ids must be a numpy int64 or uint64 array in native byte order, got dtype float64",
         lambda: table.push(ids.astype(np.float64), good)),
        (TypeError, r"got dtype int32", lambda: table.pull(ids.astype(np.int32))),
        (TypeError, r"grads must be a numpy float32 array in native byte order, got dtype float64",
         lambda: table.push(ids, good.astype(np.float64))),
        # Big-endian arrays have the right kind and size but other numbers: once misread.
        (TypeError, r"ids must be a numpy int64 or uint64 array in native byte order, got dtype "
                    r">u8", lambda: table.pull(ids.astype(">u8"))),
        (TypeError, r"native byte order, got dtype >i8", lambda: table.push(ids.astype(">i8"),
                                                                           good)),
        (TypeError, r"grads must be a numpy float32 array in native byte order, got dtype >f4",
         lambda: table.push(ids, good.astype(">f4"))),
        (ValueError, r"grads must have shape \(3, 4\), got \(3, 5\)",
         lambda: table.push(ids, np.ones((3, 5), np.float32))),
        (ValueError, r"grads must have shape \(3, 4\), got \(2, 4\)",
         lambda: table.push(ids, good[:2])),
        (ValueError, r"grads must have shape \(3, 4\), got \(12,\)",
         lambda: table.push(ids, good.ravel())),
        (ValueError, r"ids must be C-contiguous",
         lambda: table.push(np.array([1, 9, 5, 9, 6, 9], np.int64)[::2], good)),
        (ValueError, r"grads must be C-contiguous",
         lambda: table.push(ids, np.ones((4, 3), np.float32).T)),
        (ValueError, r"must be aligned",
         lambda: table.pull(np.frombuffer(b"\0" + bytes(24), np.int64, 3, offset=1))),
        (TypeError, r"incompatible function arguments", lambda: table.push([1, 5, 6], good)),
        (ValueError, r"out must be writable",
         lambda: table.pull(ids, out=np.frombuffer(bytes(48), np.float32).reshape(3, 4))),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()
        _assert_unchanged(table, snap)


def test_constructor_rejects_bad_arguments() -> None:
    config = ps.SGD().to_config()
    with pytest.raises(ValueError, match="dim must be > 0"):
        _core.EmbeddingTable(0, config)
    with pytest.raises(ValueError, match="num_stripes must be a power of two"):
        _core.EmbeddingTable(4, config, num_stripes=3)
    bad = ps.init.normal().to_config()
    bad.stddev = -1.0
    with pytest.raises(ValueError, match="std"):
        _core.EmbeddingTable(4, config, bad)
    bad_opt = ps.SGD().to_config()
    bad_opt.lr = -1.0
    with pytest.raises(ValueError, match="lr"):
        _core.EmbeddingTable(4, bad_opt)


def test_export_import_restores_values_state_and_steps() -> None:
    opt = ps.Adam(lr=0.05, amsgrad=True)
    rng = np.random.default_rng(1)
    a = make_table(5, opt, ps.init.normal(), seed=8)
    for _ in range(5):
        ids = rng.integers(0, 50, 40).astype(np.int64)
        a.push(ids, rng.standard_normal((40, 5)).astype(np.float32))
    b = make_table(5, opt, ps.init.normal(), seed=8, num_stripes=1)
    b.pull(np.array([3, 1000], np.int64))  # an existing row is overwritten by the import
    b.import_rows(*a.export_rows())
    assert b.num_rows() == a.num_rows() + 1
    for _ in range(3):  # the restored table continues exactly as the original
        ids = rng.integers(0, 60, 40).astype(np.int64)
        grads = rng.standard_normal((40, 5)).astype(np.float32)
        a.push(ids, grads)
        b.push(ids, grads)
    probe = np.arange(60, dtype=np.int64)
    np.testing.assert_array_equal(a.pull(probe), b.pull(probe))


def test_import_rejects_bad_rows_without_changes() -> None:
    table = make_table(2, ps.Adagrad(), ps.init.uniform())
    table.pull(np.array([1], np.int64))
    snap = _snapshot(table)
    ids = np.array([5, 6], np.uint64)
    values = np.ones((2, 2), np.float32)
    slots = np.ones((2, 1, 2), np.float32)
    with pytest.raises(ValueError, match="id 5 appears more than once"):
        table.import_rows(np.array([5, 5], np.uint64), values, slots, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="must be >= 0"):
        table.import_rows(ids, values, slots, np.array([1, -1], np.int64))
    with pytest.raises(ValueError, match=r"slots must have shape \(2, 1, 2\)"):
        table.import_rows(ids, values, np.ones((2, 2), np.float32), np.zeros(2, np.int64))
    with pytest.raises(TypeError, match="steps must be a numpy int64"):
        table.import_rows(ids, values, slots, np.zeros(2, np.float64))
    _assert_unchanged(table, snap)


def test_bytes_cover_rows_and_clear_frees_them() -> None:
    table = make_table(64, ps.Adagrad())
    empty = table.bytes()
    table.pull(np.arange(20000, dtype=np.int64))
    raw = 20000 * 64 * 4 * 2
    # A stripe's chunks double in size until they reach ~1 MiB, so a mid-sized table may have
    # allocated up to 2x its rows (untouched pages are not resident); large tables ~1.1x.
    assert raw < table.bytes() < 2.1 * raw + empty
    table.clear()
    assert table.num_rows() == 0 and table.bytes() == empty
    assert not table.contains(5)


def test_properties() -> None:
    table = make_table(7, ps.Adam(amsgrad=True), ps.init.normal(0.0, 0.5), seed=2**64 - 1,
                       num_stripes=8)
    assert (table.dim, table.num_slots, table.seed, table.num_stripes) == (7, 3, 2**64 - 1, 8)
    assert table.optimizer.kind == _core.OptimizerKind.Adam
    assert table.initializer.stddev == 0.5
