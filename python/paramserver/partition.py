"""Where parameters live: dense blocks balanced over servers, embedding ids spread by hash.

Pure functions of their inputs (no sockets, no state), shared by the scheduler, which builds the
partition map, and by workers, which cut tensors along it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramserver.config import DEFAULT_BLOCK_SIZE, MIN_BLOCK_SIZE

__all__ = ["num_blocks", "default_block_size", "assign_blocks", "BlockLayout", "server_of_ids"]


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

    Each block goes to the server holding the fewest elements so far (``server_load``, updated in
    place), ties to the lowest rank. A table of many blocks is therefore spread over every server,
    and many one-block tables (biases) are dealt round the servers instead of piling on server 0.
    Returns the server rank of every block.
    """
    if not server_load:
        raise ValueError("no servers to assign blocks to")
    owners = []
    for b in range(num_blocks(num_elements, block_size)):
        length = min(block_size, num_elements - b * block_size)
        server = min(range(len(server_load)), key=lambda s: (server_load[s], s))
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


def server_of_ids(ids: np.ndarray, num_servers: int) -> np.ndarray:
    """Server rank of each embedding id (uint64), by the splitmix64 finalizer of the id.

    Sequential ids spread evenly; the same id always maps to the same server for a given count.
    """
    x = ids.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
    return (x % np.uint64(num_servers)).astype(np.int64)
