"""Bad calls into _core.DenseTable raise the right Python exception and leave the table untouched.

Every case snapshots the whole table (values, every optimizer slot and the step count of each held
block), makes the bad call, checks the exception type and message, and compares the snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from paramserver import _core, optim

N, BS = 1000, 96  # 11 blocks; the last holds 40 elements
HELD = [0, 2, 3, 10]


def _table() -> _core.DenseTable:
    table = _core.DenseTable(N, BS, optim.Adam(amsgrad=True).to_config(), HELD)
    rng = np.random.default_rng(0)
    for b in HELD:
        table.assign(b, rng.standard_normal(table.block_length(b)).astype(np.float32))
        for _ in range(b % 3 + 1):  # distinct step counts and non-trivial state
            table.apply(b, rng.standard_normal(table.block_length(b)).astype(np.float32))
    return table


def _snapshot(table: _core.DenseTable) -> dict[int, tuple[int, list[np.ndarray]]]:
    out = {}
    for b in table.held_blocks():
        arrays = [np.empty(table.block_length(b), np.float32) for _ in range(1 + table.num_slots)]
        table.read(b, arrays[0])
        for s in range(table.num_slots):
            table.read_slot(b, s, arrays[1 + s])
        out[b] = (table.step(b), arrays)
    return out


def _assert_unchanged(before: dict[int, tuple[int, list[np.ndarray]]],
                      table: _core.DenseTable) -> None:
    after = _snapshot(table)
    assert after.keys() == before.keys()
    for b, (step, arrays) in before.items():
        assert after[b][0] == step, f"step of block {b} changed"
        for i, (x, y) in enumerate(zip(arrays, after[b][1])):
            np.testing.assert_array_equal(y, x, err_msg=f"block {b} array {i} changed")


def _grad(n: int, dtype: Any = np.float32) -> np.ndarray:
    return np.full(n, 0.5, dtype=dtype)


def _ids(*blocks: int) -> np.ndarray:
    return np.array(blocks, dtype=np.int64)


L0, L10 = BS, N - 10 * BS  # lengths of blocks 0 and 10
RO = _grad(L0)
RO.flags.writeable = False
NONCONTIG = _grad(2 * L0)[::2]
BIG_ENDIAN = _grad(L0, ">f4")

# (description, call, exception, message pattern)
CASES: list[tuple[str, Callable[[_core.DenseTable], Any], type[Exception], str]] = [
    ("apply float64", lambda t: t.apply(0, _grad(L0, np.float64)), TypeError,
     "grad must be a numpy float32 array, got dtype float64"),
    ("apply int32", lambda t: t.apply(0, _grad(L0, np.int32)), TypeError,
     "float32.*got dtype int32"),
    ("apply int64", lambda t: t.apply(0, _grad(L0, np.int64)), TypeError,
     "float32.*got dtype int64"),
    ("apply float16", lambda t: t.apply(0, _grad(L0, np.float16)), TypeError, "got dtype float16"),
    ("apply big-endian float32", lambda t: t.apply(0, BIG_ENDIAN), TypeError, "float32"),
    # Not an array at all: pybind11 refuses it, naming the numpy.ndarray it expected.
    ("apply list", lambda t: t.apply(0, [0.5] * L0), TypeError, "grad: numpy.ndarray"),
    ("apply None", lambda t: t.apply(0, None), TypeError, "grad: numpy.ndarray"),
    ("apply short", lambda t: t.apply(0, _grad(L0 - 1)), ValueError,
     f"grad must have {L0} elements, got {L0 - 1}"),
    ("apply long", lambda t: t.apply(10, _grad(L0)), ValueError, f"must have {L10} elements"),
    ("apply non-contiguous", lambda t: t.apply(0, NONCONTIG), ValueError, "C-contiguous"),
    ("apply block -1", lambda t: t.apply(-1, _grad(L0)), IndexError,
     r"block -1 out of range \[0, 11\)"),
    ("apply block 11", lambda t: t.apply(11, _grad(L0)), IndexError, "block 11 out of range"),
    ("apply not held", lambda t: t.apply(1, _grad(L0)), IndexError, "block 1 is not held"),
    ("assign float64", lambda t: t.assign(2, _grad(L0, np.float64)), TypeError, "values.*float64"),
    ("assign short", lambda t: t.assign(2, _grad(5)), ValueError, "values must have"),
    ("assign not held", lambda t: t.assign(4, _grad(L0)), IndexError, "not held"),
    ("read into float64", lambda t: t.read(0, np.empty(L0)), TypeError, "out.*float64"),
    ("read into read-only", lambda t: t.read(0, RO), ValueError, "writable"),
    ("read into non-contiguous", lambda t: t.read(0, np.empty(2 * L0, np.float32)[::2]),
     ValueError, "C-contiguous"),
    ("read not held", lambda t: t.read(5, np.empty(L0, np.float32)), IndexError, "not held"),
    ("step out of range", lambda t: t.step(99), IndexError, "out of range"),
    ("read_slot bad slot", lambda t: t.read_slot(0, 3, np.empty(L0, np.float32)), IndexError,
     r"slot 3 out of range \[0, 3\)"),
    ("read_slot negative slot", lambda t: t.read_slot(0, -1, np.empty(L0, np.float32)),
     IndexError, "slot -1"),
    ("read_slot not held", lambda t: t.read_slot(1, 0, np.empty(L0, np.float32)), IndexError,
     "not held"),
    ("apply_many int32 ids", lambda t: t.apply_many(np.array([0], np.int32), _grad(L0)),
     TypeError, "blocks must be a numpy int64 array, got dtype int32"),
    ("apply_many float ids", lambda t: t.apply_many(np.array([0.0]), _grad(L0)), TypeError,
     "blocks must be a numpy int64"),
    # The bad id comes last: nothing may be applied to the good ones before it is found.
    ("apply_many one id not held", lambda t: t.apply_many(_ids(0, 2, 1), _grad(3 * L0)),
     IndexError, "block 1 is not held"),
    ("apply_many one id out of range", lambda t: t.apply_many(_ids(0, 2, 11), _grad(3 * L0)),
     IndexError, "block 11 out of range"),
    ("apply_many wrong total", lambda t: t.apply_many(_ids(0, 10), _grad(2 * L0)), ValueError,
     f"grads must have {L0 + L10} elements"),
    ("apply_many float64", lambda t: t.apply_many(_ids(0, 10), _grad(L0 + L10, np.float64)),
     TypeError, "grads.*float64"),
    ("apply_many zero threads", lambda t: t.apply_many(_ids(0, 2), _grad(2 * L0), num_threads=0),
     ValueError, "num_threads must be >= 1, got 0"),
    ("read_many not held", lambda t: t.read_many(_ids(0, 4), np.empty(2 * L0, np.float32)),
     IndexError, "not held"),
    ("read_many read-only", lambda t: t.read_many(_ids(0), RO), ValueError, "writable"),
    ("assign_many one not held", lambda t: t.assign_many(_ids(0, 2, 3, 9), _grad(4 * L0)),
     IndexError, "block 9 is not held"),
    ("assign_many short", lambda t: t.assign_many(_ids(0, 2), _grad(L0)), ValueError,
     "values must have"),
    ("restore_block too few slots",
     lambda t: t.restore_block(0, _grad(L0), [_grad(L0), _grad(L0)], 5), ValueError,
     "expected 3 slot arrays, got 2"),
    ("restore_block slot float64",
     lambda t: t.restore_block(0, _grad(L0), [_grad(L0), _grad(L0), _grad(L0, np.float64)], 5),
     TypeError, "slot.*float64"),
    ("restore_block slot short",
     lambda t: t.restore_block(0, _grad(L0), [_grad(L0), _grad(L0 - 1), _grad(L0)], 5),
     ValueError, "slot must have"),
    ("restore_block negative step",
     lambda t: t.restore_block(0, _grad(L0), [_grad(L0)] * 3, -1), ValueError,
     "step must be >= 0, got -1"),
    ("restore_block not held", lambda t: t.restore_block(1, _grad(L0), [_grad(L0)] * 3, 1),
     IndexError, "not held"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_call_raises_and_leaves_state_unchanged(call: Callable[[_core.DenseTable], Any],
                                                    exc: type[Exception], pattern: str) -> None:
    table = _table()
    before = _snapshot(table)
    with pytest.raises(exc, match=pattern):
        call(table)
    _assert_unchanged(before, table)
    # The table still works after the error.
    table.apply(0, _grad(L0))
    assert table.step(0) == before[0][0] + 1


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_elements=0, block_size=4), "num_elements must be > 0"),
    (dict(num_elements=10, block_size=0), "block_size must be > 0"),
    (dict(num_elements=10, block_size=4, held=[3]), r"block 3 out of range \[0, 3\)"),
    (dict(num_elements=10, block_size=4, held=[-1]), "block -1 out of range"),
    (dict(num_elements=10, block_size=4, held=[1, 1]), "block 1 listed twice"),
])
def test_constructor_rejects_bad_shapes(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _core.DenseTable(optimizer=optim.SGD().to_config(), **kwargs)


# Sizes whose byte count overflows size_t: rejected before any allocation (a merely huge size
# would depend on the machine's overcommit policy, so none is tried here).
@pytest.mark.parametrize("num_elements,block_size", [(2**62, 2**62), (2**64 - 1, 2**63),
                                                     (2**64 - 1, 2**64 - 1), (2**63, 2**61)])
def test_absurd_sizes_fail_cleanly(num_elements: int, block_size: int) -> None:
    with pytest.raises(MemoryError):
        _core.DenseTable(num_elements, block_size, optim.Adam().to_config())


def test_negative_sizes_are_type_errors() -> None:
    with pytest.raises(TypeError):
        _core.DenseTable(-1, 4, optim.SGD().to_config())


def test_misaligned_float32_input_is_accepted_and_exact() -> None:
    # A gradient inside a received message need not be 4-byte aligned; x86 reads it correctly.
    raw = bytearray(4 * L0 + 1)
    grad = np.frombuffer(raw, dtype=np.float32, count=L0, offset=1)
    assert not grad.flags.aligned
    a, b = _table(), _table()
    a.apply(0, grad)
    b.apply(0, grad.copy())
    out_a, out_b = np.empty(L0, np.float32), np.empty(L0, np.float32)
    a.read(0, out_a)
    b.read(0, out_b)
    np.testing.assert_array_equal(out_a, out_b)


def test_any_shape_with_the_right_size_is_accepted() -> None:
    table = _table()
    table.assign(0, np.arange(L0, dtype=np.float32).reshape(8, 12))
    out = np.empty((2, L0 // 2), np.float32)
    table.read(0, out)
    np.testing.assert_array_equal(out.ravel(), np.arange(L0, dtype=np.float32))


def test_restore_block_round_trip() -> None:
    src = _table()
    snap = _snapshot(src)
    dst = _core.DenseTable(N, BS, optim.Adam(amsgrad=True).to_config(), HELD)
    for b, (step, arrays) in snap.items():
        dst.restore_block(b, arrays[0], arrays[1:], step)
    _assert_unchanged(snap, dst)
    g = np.linspace(-1, 1, L0, dtype=np.float32)
    src.apply(0, g)
    dst.apply(0, g)
    _assert_unchanged(_snapshot(src), dst)
