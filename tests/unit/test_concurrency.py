"""Concurrent updates from many Python threads (apply releases the GIL): nothing lost or torn.

SGD with lr=1 and integer-valued gradients makes every update exact in float32 as long as all
partial sums stay below 2**24, so the final values must equal the serial sum exactly, whatever the
interleaving.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from paramserver import _core, optim

N, BS = 10_000, 1_024  # 10 blocks, the last one ragged (784 elements)
THREADS = 8
ROUNDS = 150


def _table() -> _core.DenseTable:
    return _core.DenseTable(N, BS, optim.SGD(lr=1.0).to_config())


def _run_threads(work: Callable[[int], None], count: int = THREADS) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            barrier.wait()
            work(k)
        except BaseException as exc:  # reported in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "worker thread hung"
    assert not errors, errors


def _integer_grads(seed: int, rounds: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-8, 9, size=(rounds, n)).astype(np.float32)


def _read_all(table: _core.DenseTable) -> np.ndarray:
    out = np.empty(N, np.float32)
    table.read_many(np.arange(table.num_blocks, dtype=np.int64), out)
    return out


def test_many_threads_on_one_block() -> None:
    # Big blocks, so that each update takes long enough for the threads to really overlap in it.
    bs = 1 << 16
    table = _core.DenseTable(4 * bs, bs, optim.SGD(lr=1.0).to_config())
    grads = [_integer_grads(k, 2, bs) for k in range(THREADS)]
    rounds = 40

    def work(k: int) -> None:
        for r in range(rounds):
            table.apply(3, grads[k][r % 2])

    _run_threads(work)
    expected = -np.sum([g.sum(axis=0, dtype=np.float64) * (rounds // 2) for g in grads], axis=0)
    out = np.empty(bs, np.float32)
    table.read(3, out)
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    assert table.step(3) == THREADS * rounds
    assert [table.step(b) for b in range(3)] == [0, 0, 0]


def test_threads_on_different_blocks() -> None:
    table = _table()
    blocks = list(range(table.num_blocks))
    grads = {b: _integer_grads(100 + b, ROUNDS, table.block_length(b)) for b in blocks}

    def work(k: int) -> None:
        # Thread k owns blocks k, k + THREADS, ...; each block gets all of its rounds.
        for r in range(ROUNDS):
            for b in blocks[k::THREADS]:
                table.apply(b, grads[b][r])

    _run_threads(work)
    expected = np.concatenate([-grads[b].sum(axis=0, dtype=np.float64) for b in blocks])
    np.testing.assert_array_equal(_read_all(table), expected.astype(np.float32))
    assert [table.step(b) for b in blocks] == [ROUNDS] * len(blocks)


def test_threads_mixing_apply_and_apply_many_on_two_threads() -> None:
    table = _table()
    ids = np.arange(table.num_blocks, dtype=np.int64)
    rounds = 40
    grads = [_integer_grads(200 + k, rounds, N) for k in range(THREADS)]

    def work(k: int) -> None:
        for r in range(rounds):
            if k % 2:
                table.apply_many(ids, grads[k][r], num_threads=2)
            else:  # the same update, one block at a time, in reverse block order
                for b in reversed(range(table.num_blocks)):
                    off = table.block_offset(b)
                    table.apply(b, grads[k][r][off:off + table.block_length(b)])

    _run_threads(work)
    expected = -np.sum([g.sum(axis=0, dtype=np.float64) for g in grads], axis=0)
    np.testing.assert_array_equal(_read_all(table), expected.astype(np.float32))
    assert all(table.step(b) == THREADS * rounds for b in range(table.num_blocks))


def test_apply_many_two_threads_equals_serial() -> None:
    ids = np.arange(10, dtype=np.int64)[::-1].copy()  # any order, not just ascending
    grads = _integer_grads(7, 30, N)
    a = _table()
    b = _table()
    lengths = [a.block_length(int(i)) for i in ids]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for g in grads:
        # apply_many takes the gradients in the order of `ids`.
        packed = np.concatenate([g[a.block_offset(int(i)):a.block_offset(int(i)) + n]
                                 for i, n in zip(ids, lengths)])
        a.apply_many(ids, packed, num_threads=2)
        for j, i in enumerate(ids):
            b.apply(int(i), packed[offsets[j]:offsets[j + 1]])
    np.testing.assert_array_equal(_read_all(a), _read_all(b))
    expected = -grads.sum(axis=0, dtype=np.float64)
    np.testing.assert_array_equal(_read_all(a), expected.astype(np.float32))


def test_reads_never_see_a_half_applied_update() -> None:
    # Every update adds the same integer to the whole block, so any consistent read of the block
    # has all elements equal; a torn read (some elements updated, some not) would not.
    table = _table()
    stop = threading.Event()
    torn: list[np.ndarray] = []

    def reader() -> None:
        out = np.empty(BS, np.float32)
        while not stop.is_set():
            table.read(0, out)
            if not np.all(out == out[0]):
                torn.append(out.copy())

    r = threading.Thread(target=reader)
    r.start()
    try:
        def work(k: int) -> None:
            for i in range(ROUNDS):
                table.apply(0, np.full(BS, float((k + i) % 5 - 2), np.float32))

        _run_threads(work, 4)
    finally:
        stop.set()
        r.join(timeout=60)
    assert not torn, f"{len(torn)} torn reads, e.g. {np.unique(torn[0])}"
    out = np.empty(BS, np.float32)
    table.read(0, out)
    expected = -sum((k + i) % 5 - 2 for k in range(4) for i in range(ROUNDS))
    np.testing.assert_array_equal(out, np.full(BS, expected, np.float32))
