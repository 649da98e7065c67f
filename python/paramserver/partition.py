"""Where parameters live: dense blocks balanced over servers, embedding ids spread by hash.

Pure functions of their inputs (no sockets, no state), shared by the scheduler, which builds the
partition map, and by workers, which cut tensors along it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramserver.config import DEFAULT_BLOCK_SIZE, MIN_BLOCK_SIZE

__all__ = ["num_blocks", "default_block_size", "assign_blocks", "BlockLayout", "mix64",
           "server_of_ids"]


def num_blocks(num_elements: int, block_size: int) -> int:
    """Blocks needed for ``num_elements`` elements in blocks of ``block_size``."""
    if num_elements <= 0 or block_size <= 0:
        raise ValueError(f"need num_elements > 0 and block_size > 0, got {num_elements}, "
                         f"{block_size}")
    return -(-num_elements // block_size)


def default_block_size(num_elements: int, num_servers: int) -> int:
    """Elements per block for a tensor when the user does not say.

    The tensor split evenly over the servers, clamped to [MIN_BLOCK_SIZE, DEFAULT_BLOCK_SIZE]: a big
    tensor gets 1 MiB blocks (whole blocks per ~4 MiB message), a mid-size one (a 784x256 layer)
    still spreads over every server, and a small one (a bias) stays one block.
    """
    share = -(-num_elements // max(1, num_servers))
    return max(MIN_BLOCK_SIZE, min(DEFAULT_BLOCK_SIZE, share))


def assign_blocks(num_elements: int, block_size: int, server_load: list[int]) -> list[int]:
    """Assign each block of a new table to a server, balancing bytes over servers.

    Blocks are dealt in rounds of one block per server: within a round, each block goes to the
    least loaded server (fewest elements so far in ``server_load``, updated in place; ties to the
    lowest rank) not yet used in that round. So a table of k blocks always lands on min(k, S)
    distinct servers, whatever earlier tables did to the loads (pure least-loaded placement could
    put a mid-size tensor wholly on one server after a lopsided one), many one-block tables
    (biases) are dealt round the servers, and bytes stay balanced. Returns the server of every
    block.
    """
    if not server_load:
        raise ValueError("no servers to assign blocks to")
    owners: list[int] = []
    total = num_blocks(num_elements, block_size)
    servers = range(len(server_load))
    while len(owners) < total:
        free = set(servers)  # a new round
        while free and len(owners) < total:
            b = len(owners)
            length = min(block_size, num_elements - b * block_size)
            server = min(free, key=lambda s: (server_load[s], s))
            free.discard(server)
            server_load[server] += length
            owners.append(server)
    return owners


@dataclass(frozen=True)
class BlockLayout:
    """How a flat dense tensor is cut into blocks and which server holds each.

    Attributes:
        num_elements: elements of the tensor.
        block_size: elements per block (the last block may be shorter).
        block_servers: server rank of each block.
    """

    num_elements: int
    block_size: int
    block_servers: tuple[int, ...]

    def block_range(self, block: int) -> tuple[int, int]:
        """``(start, stop)`` element offsets of ``block``."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_elements)

    def blocks_by_server(self) -> dict[int, list[int]]:
        """Block ids grouped by server rank, ascending within each server."""
        out: dict[int, list[int]] = {}
        for block, server in enumerate(self.block_servers):
            out.setdefault(server, []).append(block)
        return out


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def mix64(ids: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer of each uint64 id: the hash the core's id map also uses
    (``EmbeddingTable::hash`` in cpp/include/paramserver/embedding_table.h)."""
    x = ids.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
    return x


#: Hash bits the server choice reads: bits 20-51. The core takes a row's map slot from the
#: hash's low bits and its stripe from the top 12; routing on either would make every id a server
#: holds share those bits, crowding its map (measured in a simulation: 2.5 / 3.6 / 5.9 probes per
#: lookup at 4 / 8 / 16 servers with ``hash % S``, against 1.8 at one).
_ROUTE_SHIFT = np.uint64(20)
_ROUTE_MASK = np.uint64(0xFFFFFFFF)


def server_of_ids(ids: np.ndarray, num_servers: int) -> np.ndarray:
    """Server rank of each embedding id (uint64), from the splitmix64 hash of the id.

    Sequential ids spread evenly; the same id always maps to the same server for a given count.
    The choice reads hash bits 20-51 (multiply-shift: ``(bits * S) >> 32``), which the core's id
    map does not use for the slot or the stripe, so the ids one server holds still fill its map
    evenly.
    """
    window = (mix64(ids) >> _ROUTE_SHIFT) & _ROUTE_MASK
    with np.errstate(over="ignore"):
        return ((window * np.uint64(num_servers)) >> np.uint64(32)).astype(np.int64)
