"""paramserver C++ core (private; use the paramserver package).

Arrays are taken without conversion: values and gradients must be C-contiguous numpy float32 arrays
(any shape) of exactly the expected number of elements, block lists C-contiguous int64 arrays. A
wrong dtype raises TypeError; a wrong size, layout or read-only output raises ValueError; a block
out of range or not held raises IndexError. A call that raises leaves the table unchanged.
"""

from collections.abc import Sequence
from typing import Any, ClassVar, SupportsIndex, SupportsInt, overload

import numpy as np
import numpy.typing as npt

_Int = SupportsInt | SupportsIndex
_F32 = npt.NDArray[np.float32]
_I64 = npt.NDArray[np.int64]

class OptimizerKind:
    """Which update rule an OptimizerConfig describes."""

    SGD: ClassVar[OptimizerKind]
    Adagrad: ClassVar[OptimizerKind]
    Adam: ClassVar[OptimizerKind]
    AdamW: ClassVar[OptimizerKind]
    __members__: ClassVar[dict[str, OptimizerKind]]
    def __init__(self, value: _Int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: _Int) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class OptimizerConfig:
    """Every hyperparameter of the four optimizers (fields an optimizer does not use are ignored).

    Build it with ``paramserver.optim.<Optimizer>(...).to_config()``, which validates; the core
    validates again when a table is created.
    """

    kind: OptimizerKind
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    lr_decay: float
    initial_accumulator_value: float
    beta1: float
    beta2: float
    amsgrad: bool
    bias_correction: bool
    eps: float
    weight_decay: float
    maximize: bool
    def __init__(self) -> None: ...

def validate(config: OptimizerConfig) -> None:
    """Raise ValueError naming the first invalid hyperparameter of ``config``."""

def num_slots(config: OptimizerConfig) -> int:
    """Float32 state arrays kept per parameter: SGD 0 (1 with momentum), Adagrad 1, Adam 2 or 3."""

def kernel_isa() -> str:
    """Instruction set the kernels run with here: "x86-64-v4", "x86-64-v3" or "baseline"."""

def set_kernel_isa(name: str) -> None:
    """Run the kernels at a lower level than detected (tests); process-wide. ValueError if the
    name is unknown or the CPU lacks it."""

class DenseTable:
    """A flat float32 tensor cut into fixed-size blocks, each with its own optimizer state and step.

    Block ``b`` covers elements ``[b * block_size, min((b + 1) * block_size, num_elements))``.
    ``held`` lists the blocks stored here (empty: all). Values start at zero. Every method is
    thread safe; the array methods release the GIL while they copy or update. Updates to one block
    serialize, updates to different blocks run in parallel.
    """

    def __init__(self, num_elements: _Int, block_size: _Int, optimizer: OptimizerConfig,
                 held: Sequence[_Int] = ...) -> None: ...
    @property
    def num_elements(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_slots(self) -> int: ...
    def held_blocks(self) -> list[int]:
        """Ids of the blocks held here, ascending."""
    def holds(self, block: _Int) -> bool: ...
    def block_offset(self, block: _Int) -> int:
        """First element of ``block`` (any block of the table); IndexError if out of range."""
    def block_length(self, block: _Int) -> int:
        """Elements in ``block`` (any block of the table); IndexError if out of range."""
    def bytes(self) -> int:
        """Bytes of values plus optimizer state held."""
    def step(self, block: _Int) -> int:
        """Updates applied to a held block so far."""
    def apply(self, block: _Int, grad: _F32) -> None:
        """One optimizer step on a held block with ``grad`` (block_length(block) elements)."""
    def read(self, block: _Int, out: _F32) -> None:
        """Copy a held block's values into ``out`` (writable)."""
    def assign(self, block: _Int, values: _F32) -> None:
        """Overwrite a held block's values; its optimizer state and step are kept."""
    def apply_many(self, blocks: _I64, grads: _F32, num_threads: _Int = 1) -> None:
        """One step on each block of ``blocks``, taking their gradients concatenated in that order.

        All ids are checked before any block is updated. Runs on up to ``num_threads`` threads.
        """
    def read_many(self, blocks: _I64, out: _F32, num_threads: _Int = 1) -> None:
        """Copy the values of ``blocks``, concatenated in that order, into ``out``."""
    def assign_many(self, blocks: _I64, values: _F32) -> None:
        """Overwrite the values of ``blocks`` from their concatenation ``values``."""
    def read_slot(self, block: _Int, slot: _Int, out: _F32) -> None:
        """Copy optimizer state array ``slot`` of a held block into ``out`` (for checkpoints)."""
    def restore_block(self, block: _Int, values: _F32, slots: Sequence[_F32], step: _Int) -> None:
        """Set a held block's values, all num_slots state arrays and step count at once."""

_Ids = npt.NDArray[np.int64] | npt.NDArray[np.uint64]

class InitializerKind:
    """How fresh embedding rows are filled."""

    Zeros: ClassVar[InitializerKind]
    Uniform: ClassVar[InitializerKind]
    Normal: ClassVar[InitializerKind]
    __members__: ClassVar[dict[str, InitializerKind]]
    def __init__(self, value: _Int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: _Int) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class InitializerConfig:
    """An initializer's parameters (fields it does not use are ignored)."""

    kind: InitializerKind
    low: float
    high: float
    mean: float
    stddev: float
    def __init__(self) -> None: ...

def validate_initializer(config: InitializerConfig) -> None:
    """Raise ValueError naming the first bad parameter."""

def initialize_rows(config: InitializerConfig, seed: _Int, ids: _Ids, out: _F32) -> None:
    """Fill ``out`` (shape ``(*ids.shape, dim)``) with the initial rows of ``ids``."""

class EmbeddingTable:
    """One server's shard of an embedding table: 64-bit id -> row of ``dim`` float32 plus that
    row's optimizer state and step count. Thread safe; the GIL is released while it works."""

    def __init__(self, dim: _Int, optimizer: OptimizerConfig,
                 initializer: InitializerConfig = ..., seed: _Int = 0,
                 num_stripes: _Int = 32) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def num_stripes(self) -> int: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def optimizer(self) -> OptimizerConfig: ...
    @property
    def initializer(self) -> InitializerConfig: ...
    def num_rows(self) -> int:
        """Distinct ids held."""
    def bytes(self) -> int:
        """Bytes allocated for rows, state, step counts and maps."""
    def contains(self, id: int) -> bool: ...
    def pull(self, ids: _Ids, out: _F32 | None = None, num_threads: _Int = 0) -> _F32:
        """Rows of ``ids`` in request order, creating missing ones: ``(*ids.shape, dim)``."""
    def lookup(self, ids: _Ids, out: _F32 | None = None, num_threads: _Int = 0) -> _F32:
        """Rows of ``ids`` like :meth:`pull`, but an id not held gets its initial row and is not
        created: the table is never changed."""
    def push(self, ids: _Ids, grads: _F32, num_threads: _Int = 0) -> None:
        """Sum the gradients of equal ids, then one optimizer step per distinct row."""
    def export_rows(self) -> tuple[npt.NDArray[np.uint64], _F32, _F32, _I64]:
        """Every row: (ids, values (n, dim), slots (n, num_slots, dim), steps)."""
    def export_rows_into(self, ids: npt.NDArray[np.uint64], values: _F32, slots: _F32,
                         steps: _I64) -> int:
        """:meth:`export_rows` into buffers of ``len(ids)`` rows. Returns the rows written, or,
        writing nothing, the rows held when they do not fit."""
    def import_rows(self, ids: _Ids, values: _F32, slots: _F32, steps: _I64) -> None:
        """Create or overwrite rows (a checkpoint's content)."""
    def clear(self) -> None:
        """Drop every row."""

@overload
def assemble(parts: list[Any], num_threads: _Int = 1, into: None = None) -> bytes:
    """One bytes object of ``parts`` in order: buffers (bytes, numpy arrays) copied, and
    ``(DenseTable, int64 blocks)`` pairs read from the table into it (a reply with one copy of
    its values). With ``into`` (a writable, 16-byte aligned buffer) large enough, the parts are
    written at its start instead, and the number of bytes written is returned."""
@overload
def assemble(parts: list[Any], num_threads: _Int, into: Any) -> bytes | int:
    """As above, into ``into`` when it is large enough (returns the bytes written)."""
