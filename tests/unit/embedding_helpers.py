"""Shared helpers of the embedding unit tests."""

from __future__ import annotations

import numpy as np

import paramserver as ps
from paramserver import _core

#: Ids from the whole 64-bit range, the extremes included, as uint64.
EDGE_IDS = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1], dtype=np.uint64)


def make_table(dim: int, optimizer: ps.Optimizer | None = None,
               initializer: ps.init.Initializer | None = None, seed: int = 0,
               num_stripes: int = 32) -> _core.EmbeddingTable:
    """An in-process embedding table from the public optimizer/initializer descriptions."""
    optimizer = optimizer if optimizer is not None else ps.SGD(lr=1.0)
    initializer = initializer if initializer is not None else ps.init.zeros()
    return _core.EmbeddingTable(dim, optimizer.to_config(), initializer.to_config(), seed,
                                num_stripes)


def initial_rows(initializer: ps.init.Initializer, seed: int, ids: np.ndarray,
                 dim: int) -> np.ndarray:
    """The rows a table creates for `ids`, computed without a table."""
    out = np.empty((len(ids), dim), dtype=np.float32)
    _core.initialize_rows(initializer.to_config(), seed, np.ascontiguousarray(ids, np.uint64), out)
    return out


def id_pool(rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` distinct uint64 ids spread over the 64-bit range, EDGE_IDS first."""
    ids = list(EDGE_IDS)
    seen = set(int(i) for i in ids)
    while len(ids) < size:
        v = int(rng.integers(0, 2**64, dtype=np.uint64))
        if v not in seen:
            seen.add(v)
            ids.append(np.uint64(v))
    return np.array(ids[:size], dtype=np.uint64)
