"""The core's checkpoint and serving methods of EmbeddingTable: ``lookup`` (rows without creating
them) and ``export_rows_into`` (export into caller-owned buffers), against ``pull``,
``initialize_rows`` and ``export_rows`` as oracles."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver import _core
from tests.unit.embedding_helpers import EDGE_IDS, initial_rows, make_table

DIM = 4
INIT = ps.init.normal(0.0, 1.0)
SEED = 11


def trained_table(optimizer: ps.Optimizer | None = None, rows: int = 50) -> _core.EmbeddingTable:
    """A table whose rows have moved away from their initial values and have differing steps."""
    table = make_table(DIM, optimizer or ps.Adam(lr=0.1), INIT, seed=SEED)
    ids = np.concatenate([EDGE_IDS, np.arange(100, 100 + rows - len(EDGE_IDS), dtype=np.uint64)])
    rng = np.random.default_rng(3)
    table.push(ids, rng.standard_normal((len(ids), DIM)).astype(np.float32))
    table.push(np.ascontiguousarray(ids[::3]), np.ones((len(ids[::3]), DIM), np.float32))
    return table


def buffers(table: _core.EmbeddingTable, rows: int, fill: float = -7.0):
    return (np.full(rows, 99, np.uint64), np.full((rows, table.dim), fill, np.float32),
            np.full((rows, table.num_slots, table.dim), fill, np.float32),
            np.full(rows, -5, np.int64))


# -- lookup --------------------------------------------------------------------------------------

def test_lookup_of_existing_ids_equals_pull() -> None:
    table = trained_table()
    ids = np.array([EDGE_IDS[3], 100, 2**64 - 1, 120, 100], np.uint64)
    rows = table.num_rows()
    got = table.lookup(ids)
    assert got.shape == (5, DIM) and got.dtype == np.float32
    np.testing.assert_array_equal(got, table.pull(ids))
    assert table.num_rows() == rows


def test_lookup_of_new_ids_gives_initial_rows_and_creates_nothing() -> None:
    table = trained_table()
    rows = table.num_rows()
    new = np.array([5, 6, 2**62 + 1, 5], np.uint64)
    assert not any(table.contains(int(i)) for i in new)
    got = table.lookup(new)
    np.testing.assert_array_equal(got, initial_rows(INIT, SEED, new, DIM))
    np.testing.assert_array_equal(got[0], got[3])
    assert table.num_rows() == rows
    assert not any(table.contains(int(i)) for i in new)
    # pull would create them with exactly these values
    np.testing.assert_array_equal(table.pull(new), got)
    assert table.num_rows() == rows + 3


def test_lookup_of_mixed_ids_keeps_request_order() -> None:
    table = trained_table()
    ids = np.array([[100, 7], [8, EDGE_IDS[0]]], np.uint64)
    got = table.lookup(ids)
    assert got.shape == (2, 2, DIM)
    np.testing.assert_array_equal(got[0, 0], table.pull(np.array([100], np.uint64))[0])
    np.testing.assert_array_equal(got[1, 1], table.pull(np.array([0], np.uint64))[0])
    np.testing.assert_array_equal(got[0, 1], initial_rows(INIT, SEED, np.array([7]), DIM)[0])
    np.testing.assert_array_equal(got[1, 0], initial_rows(INIT, SEED, np.array([8]), DIM)[0])


def test_lookup_leaves_optimizer_state_and_steps_alone() -> None:
    table = trained_table()
    before = table.export_rows()
    table.lookup(np.arange(90, 130, dtype=np.uint64))
    after = table.export_rows()
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_lookup_with_int64_ids_and_out() -> None:
    table = trained_table()
    ids = EDGE_IDS.view(np.int64)
    out = np.zeros((len(ids), DIM), np.float32)
    result = table.lookup(ids, out=out)
    assert result is out
    np.testing.assert_array_equal(out, table.lookup(EDGE_IDS))


def test_lookup_in_an_empty_table_with_threads() -> None:
    table = make_table(DIM, ps.SGD(lr=1.0), INIT, seed=SEED)
    ids = np.arange(1000, dtype=np.uint64)
    np.testing.assert_array_equal(table.lookup(ids, num_threads=4),
                                  initial_rows(INIT, SEED, ids, DIM))
    assert table.num_rows() == 0


def test_lookup_input_checks() -> None:
    table = trained_table()
    with pytest.raises(TypeError):
        table.lookup(np.array([1.0, 2.0]))
    with pytest.raises(TypeError):
        table.lookup(np.array([1, 2], np.int32))
    with pytest.raises(ValueError):
        table.lookup(np.array([1, 2], np.uint64), out=np.zeros((3, DIM), np.float32))
    rows = table.num_rows()
    with pytest.raises(TypeError):
        table.lookup(np.array([1, 2], np.uint64), out=np.zeros((2, DIM), np.float64))
    assert table.num_rows() == rows


# -- export_rows_into ----------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [ps.Adam(lr=0.1), ps.SGD(lr=0.1), ps.Adagrad()],
                         ids=["adam", "sgd", "adagrad"])
def test_export_rows_into_exact_buffers_equals_export_rows(optimizer: ps.Optimizer) -> None:
    table = trained_table(optimizer)
    n = table.num_rows()
    ids, values, slots, steps = buffers(table, n)
    assert table.export_rows_into(ids, values, slots, steps) == n
    want = table.export_rows()
    order, want_order = np.argsort(ids), np.argsort(want[0])
    np.testing.assert_array_equal(ids[order], want[0][want_order])
    np.testing.assert_array_equal(values[order], want[1][want_order])
    np.testing.assert_array_equal(slots[order], want[2][want_order])
    np.testing.assert_array_equal(steps[order], want[3][want_order])
    assert set(steps.tolist()) == {1, 2}


def test_export_rows_into_larger_buffers_leaves_the_tail() -> None:
    table = trained_table()
    n = table.num_rows()
    ids, values, slots, steps = buffers(table, n + 10)
    assert table.export_rows_into(ids, values, slots, steps) == n
    assert sorted(ids[:n].tolist()) == sorted(table.export_rows()[0].tolist())
    assert (ids[n:] == 99).all() and (values[n:] == -7).all()
    assert (slots[n:] == -7).all() and (steps[n:] == -5).all()


def test_export_rows_into_small_buffers_writes_nothing_and_says_how_many() -> None:
    table = trained_table()
    n = table.num_rows()
    for rows in (0, 1, n - 1):
        ids, values, slots, steps = buffers(table, rows)
        assert table.export_rows_into(ids, values, slots, steps) == n
        assert (ids == 99).all() and (values == -7).all()
        assert (slots == -7).all() and (steps == -5).all()


def test_export_rows_into_of_an_empty_table() -> None:
    table = make_table(DIM, ps.Adam())
    assert table.export_rows_into(*buffers(table, 0)) == 0
    ids, values, slots, steps = buffers(table, 3)
    assert table.export_rows_into(ids, values, slots, steps) == 0
    assert (ids == 99).all()


def test_export_rows_into_then_import_rows_round_trips() -> None:
    table = trained_table()
    ids, values, slots, steps = buffers(table, table.num_rows())
    table.export_rows_into(ids, values, slots, steps)
    copy = make_table(DIM, ps.Adam(lr=0.1), INIT, seed=SEED)
    copy.import_rows(ids, values, slots, steps)
    grads = np.ones((len(ids), DIM), np.float32)
    table.push(ids, grads)
    copy.push(ids, grads)
    np.testing.assert_array_equal(copy.lookup(ids), table.lookup(ids))


@pytest.mark.parametrize("which, dtype", [(0, np.int64), (0, np.float64), (1, np.float64),
                                          (2, np.float64), (3, np.int32), (3, np.uint64)],
                         ids=["ids-int64", "ids-f64", "values-f64", "slots-f64", "steps-i32",
                              "steps-u64"])
def test_export_rows_into_wrong_dtypes(which: int, dtype: type) -> None:
    table = trained_table()
    bufs = list(buffers(table, table.num_rows()))
    bufs[which] = bufs[which].astype(dtype)
    with pytest.raises(TypeError):
        table.export_rows_into(*bufs)


@pytest.mark.parametrize("which, shape", [(1, (50, DIM + 1)), (1, (49, DIM)),
                                          (2, (50, 1, DIM)), (2, (50, 2, DIM - 1)), (3, (49,))],
                         ids=["values-dim", "values-rows", "slots-count", "slots-dim",
                              "steps-rows"])
def test_export_rows_into_mismatched_shapes(which: int, shape: tuple[int, ...]) -> None:
    table = trained_table(rows=50)
    assert table.num_rows() == 50
    bufs = list(buffers(table, 50))
    bufs[which] = np.zeros(shape, bufs[which].dtype)
    with pytest.raises(ValueError):
        table.export_rows_into(*bufs)
    assert (bufs[0] == 99).all()


def test_export_rows_into_read_only_buffer() -> None:
    table = trained_table()
    ids, values, slots, steps = buffers(table, table.num_rows())
    values.setflags(write=False)
    with pytest.raises(ValueError):
        table.export_rows_into(ids, values, slots, steps)
