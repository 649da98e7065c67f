"""paramserver.steps without a network: a BSP step's combine applied to real core tables."""

from __future__ import annotations

import numpy as np

import paramserver as ps
from paramserver import _core
from paramserver.server import _DenseShard
from paramserver.steps import Contribution, StepEngine
from paramserver.sync import Consistency
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import optimizer_to_spec


def _shard() -> _DenseShard:
    spec = pb.TableSpec(name="w", kind=pb.TableSpec.DENSE, shape=[8], block_size=4,
                        optimizer=optimizer_to_spec(ps.SGD(lr=1.0)))
    return _DenseShard(spec, (0, 1), _core.DenseTable(8, 4, ps.SGD(lr=1.0).to_config(), [0, 1]))


def _step(engine: StepEngine, shard: _DenseShard, step: int) -> None:
    blocks = np.array([0, 1], dtype=np.int64)
    for worker, grad in ((0, 1.0), (1, 3.0)):
        share = Contribution([(shard, blocks, np.full(8, grad, np.float32))])
        whole = engine.contribute(worker, step, 0, 1, share)
        assert whole is not None
        engine.add(worker, step, whole, lambda apply: apply())


def _values(shard: _DenseShard) -> np.ndarray:
    out = np.empty(8, np.float32)
    shard.table.read_many(np.array([0, 1], dtype=np.int64), out, 1)
    return out


def test_a_step_applies_the_mean_once_and_a_replaced_table_gets_its_own_sums() -> None:
    engine = StepEngine(Consistency("bsp"), "test", 4, 1)
    engine.set_members([pb.SyncMember(rank=0, first_step=1), pb.SyncMember(rank=1, first_step=1)],
                       restarted=False)
    old = _shard()
    _step(engine, old, 1)
    assert engine.completed == 1
    np.testing.assert_array_equal(_values(old), -2.0)  # mean of 1 and 3, one SGD step
    # The table is replaced (restored from a checkpoint, or dropped and declared again): the
    # next step's sums belong to the new shard, and the old one is left alone.
    new = _shard()
    _step(engine, new, 2)
    np.testing.assert_array_equal(_values(new), -2.0)
    np.testing.assert_array_equal(_values(old), -2.0)
