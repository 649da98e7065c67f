"""Placement: every table spreads over the servers; embedding routing leaves the core's map bits
alone."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.partition import assign_blocks, default_block_size, mix64, server_of_ids


def test_a_mid_size_tensor_spreads_whatever_the_loads():
    # A lopsided earlier table once made both blocks of a 64x1000 tensor land on one server.
    loads = [100_000, 0]
    size = 64 * 1000
    owners = assign_blocks(size, default_block_size(size, 2), loads)
    assert sorted(owners) == [0, 1]
    loads = [500_000, 0, 0, 0]
    owners = assign_blocks(size, default_block_size(size, 4), loads)
    assert sorted(owners) == [0, 1, 2, 3]


def test_bytes_stay_balanced_and_biases_are_dealt_round():
    loads = [0, 0, 0]
    assert assign_blocks(7 * 10, 10, loads) == [0, 1, 2, 0, 1, 2, 0]
    assert loads == [30, 20, 20]
    assert [assign_blocks(5, 5, loads)[0] for _ in range(3)] == [1, 2, 1]
    assert loads == [30, 30, 25]
    # A short last block goes to the least loaded server of its round.
    loads = [0, 0]
    assert assign_blocks(25, 10, loads) == [0, 1, 0] and loads == [15, 10]


def test_mix64_is_the_cores_hash():
    # cpp/include/paramserver/initializer.h, mix64, in Python integers.
    def reference(z: int) -> int:
        m = (1 << 64) - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    ids = [0, 1, 2, 12345, 2**63, 2**64 - 1]
    assert mix64(np.array(ids, dtype=np.uint64)).tolist() == [reference(i) for i in ids]


@pytest.mark.parametrize("servers", [2, 4, 8, 16, 3])
def test_the_ids_of_one_server_fill_the_core_map_evenly(servers):
    ids = np.arange(400_000, dtype=np.uint64)
    owner = server_of_ids(ids, servers)
    counts = np.bincount(owner, minlength=servers)
    assert counts.min() > 0.95 * ids.size / servers  # balanced
    mine = mix64(ids[owner == 0])
    for name, bits in (("map slot (low bits)", mine & np.uint64(15)),
                       ("stripe (top bits)", mine >> np.uint64(60))):
        histogram = np.bincount(bits.astype(np.int64), minlength=16)
        # With `hash % S` every id of server 0 had the same low bits: one slot value in S.
        assert histogram.min() > 0.9 * mine.size / 16, (name, histogram.tolist())
