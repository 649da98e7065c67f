"""A table larger than the machine's memory is refused before anything is allocated, as
ResourceExhaustedError naming the table, the bytes asked and the memory the machine has, by the
core and by a server's tables in-process (no --max-memory needed); nothing changes."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import paramserver as ps
from paramserver import _core, optim
from paramserver.memory import check_fits, format_bytes, machine_memory
from paramserver.server import _Shards
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import optimizer_to_spec

HUGE = 2**40  # elements: 4 TiB of float32 values, more than any test machine has
PHYSICAL = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_the_core_refuses_a_table_larger_than_the_machine_before_allocating():
    with pytest.raises(ps.ResourceExhaustedError) as info:  # not a bare std::bad_alloc
        _core.DenseTable(HUGE, 1 << 22, optim.Adam().to_config())
    message = str(info.value)
    assert isinstance(info.value, MemoryError)
    assert f"a dense table of {HUGE} elements" in message
    needed = int(re.search(r"needs (\d+) bytes", message).group(1))
    assert needed >= HUGE * 4 * 3  # values and Adam's two state arrays
    assert f"this machine has {PHYSICAL} bytes of memory" in message
    assert "nothing was allocated" in message


def _spec(name: str, elements: int, block_size: int = 1 << 22) -> pb.TableSpec:
    return pb.TableSpec(name=name, kind=pb.TableSpec.DENSE, shape=[elements],
                        block_size=block_size, optimizer=optimizer_to_spec(ps.SGD(lr=1.0)))


def test_a_server_refuses_the_table_by_name_and_keeps_its_state():
    shards = _Shards("server-0 at test", apply_threads=1)  # no memory budget
    assert shards.create(pb.CreateTableRequest(spec=_spec("small", 8, 4), blocks=[0, 1]))
    blocks = HUGE // (1 << 22)
    with pytest.raises(ps.ResourceExhaustedError) as info:
        shards.create(pb.CreateTableRequest(spec=_spec("huge", HUGE), blocks=range(blocks)))
    message = str(info.value)
    assert message.startswith("table 'huge': ")
    assert f"({HUGE} elements" in message and f"{HUGE * 4} bytes" in message
    assert "server-0 at test" in message
    memory = machine_memory()
    assert f"{format_bytes(memory.total)} of memory" in message
    assert "refused before allocating" in message
    assert [t.name for t in shards.stats().tables] == ["small"]
    # The same name can be declared again at a size that fits.
    assert shards.create(pb.CreateTableRequest(spec=_spec("huge", 16, 8), blocks=[0, 1]))


def test_check_fits_accepts_what_fits():
    check_fits("t", 1 << 20, "server-0 at test", "1 block")
    with pytest.raises(ps.ResourceExhaustedError, match=r"table 't': 1 block need"):
        check_fits("t", machine_memory().total + 1, "server-0 at test", "1 block")


def test_machine_memory_is_plausible():
    memory = machine_memory()
    assert 0 < memory.available <= memory.total <= PHYSICAL
    assert format_bytes(3 << 30) == f"3.0 GiB ({3 << 30} bytes)"
    assert format_bytes(512) == "512 bytes"
    assert np.isfinite(memory.total)
