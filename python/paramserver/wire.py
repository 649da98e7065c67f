"""Conversions between Python values and the protocol's messages.

Tensors travel as raw little-endian bytes; on the way in they are viewed, never copied, with
:func:`floats`. Requests are cut into messages of about ``message_bytes`` that carry whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import json
from typing import Any

import numpy as np

from paramserver.optim import Adagrad, Adam, AdamW, Optimizer, SGD
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["FLOAT", "floats", "optimizer_to_spec", "optimizer_from_spec", "describe_spec",
           "specs_match", "initializer_to_json", "initializer_from_json", "DenseItem", "SparseItem", "pack_requests", "ids_view"]

#: The wire dtype of tensors: float32, little-endian.
FLOAT = np.dtype("<f4")

_KINDS = {SGD: pb.OptimizerSpec.SGD, Adagrad: pb.OptimizerSpec.ADAGRAD,
          Adam: pb.OptimizerSpec.ADAM, AdamW: pb.OptimizerSpec.ADAMW}


def floats(data: bytes) -> np.ndarray:
    """A read-only float32 view of wire bytes (no copy); ValueError if the length is not 4k."""
    if len(data) % 4:
        raise ValueError(f"tensor payload of {len(data)} bytes is not a whole number of float32")
    return np.frombuffer(data, dtype=FLOAT)


def ids_view(data: bytes) -> np.ndarray:
    """A read-only uint64 view of wire id bytes (no copy); ValueError if the length is not 8k."""
    if len(data) % 8:
        raise ValueError(f"id payload of {len(data)} bytes is not a whole number of uint64")
    return np.frombuffer(data, dtype="<u8")


def optimizer_to_spec(opt: Optimizer) -> pb.OptimizerSpec:
    """The wire form of an optimizer description."""
    spec = pb.OptimizerSpec(kind=_KINDS[type(opt)])
    for name, value in opt.hyperparameters().items():
        if name == "betas":
            spec.beta1, spec.beta2 = value
        else:
            setattr(spec, name, value)
    return spec


def optimizer_from_spec(spec: pb.OptimizerSpec) -> Optimizer:
    """Rebuild (and so validate) an optimizer from its wire form; ValueError if invalid."""
    for cls, kind in _KINDS.items():
        if kind == spec.kind:
            break
    else:
        raise ValueError(f"unknown optimizer kind {spec.kind}")
    args = {}
    for name in cls._fields:
        args[name] = (spec.beta1, spec.beta2) if name == "betas" else getattr(spec, name)
    return cls(**args)


def initializer_to_json(init: Any) -> str:
    """The canonical wire form of a ``paramserver.init`` initializer (sorted-key JSON)."""
    return json.dumps(init.to_dict(), sort_keys=True)


def initializer_from_json(text: str) -> Any:
    """Rebuild (and so validate) an initializer from :func:`initializer_to_json`; ValueError."""
    from paramserver.init import initializer_from_dict
    try:
        description = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed initializer description {text!r}: {exc}") from None
    if not isinstance(description, dict):
        raise ValueError(f"malformed initializer description {text!r}")
    return initializer_from_dict(description)


def describe_spec(spec: pb.TableSpec) -> str:
    """One line naming a table's kind, shape and optimizer, for error messages and status."""
    opt = repr(optimizer_from_spec(spec.optimizer))
    if spec.kind == pb.TableSpec.DENSE:
        return f"dense {tuple(spec.shape)} block_size={spec.block_size} {opt}"
    return (f"embedding dim={spec.dim} init={spec.initializer_json} seed={spec.seed} {opt}")


def specs_match(a: pb.TableSpec, b: pb.TableSpec) -> bool:
    """True when two declarations describe the same table (exact field equality)."""
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


@dataclass
class DenseItem:
    """Whole blocks of one dense table bound for one server.

    ``views`` holds each block's values (float32 arrays, views into the caller's tensor: no copy
    until the message is built), or is empty in pull requests.
    """

    table: str
    blocks: list[int]
    lengths: list[int]
    views: list[np.ndarray]


@dataclass
class SparseItem:
    """Distinct rows of one embedding table bound for one server.

    ``ids`` is a uint64 array; ``rows`` their gradients, shape (len(ids), dim) float32, or None in
    pull requests.
    """

    table: str
    ids: np.ndarray
    dim: int
    rows: np.ndarray | None = None


def pack_requests(op: int, items: list[DenseItem | SparseItem], message_bytes: int,
                  node_id: str) -> list[pb.DataRequest]:
    """Cut ``items`` into DataRequests of about ``message_bytes`` at most.

    Dense items travel as whole blocks, embedding items as whole rows. Small tables share a
    message; a large one is split at block / row boundaries; a block larger than ``message_bytes``
    travels alone. Data is copied once, straight into the message. Always returns at least one
    request.
    """
    requests = [pb.DataRequest(op=op, node_id=node_id)]
    size = 0

    def room() -> int:
        return message_bytes - size

    def next_message() -> None:
        nonlocal size
        requests.append(pb.DataRequest(op=op, node_id=node_id))
        size = 0

    for item in items:
        if isinstance(item, SparseItem):
            # Ids plus (for writes, and in the reply for reads) a row of dim floats each.
            row_bytes = 8 + 4 * item.dim
            i = 0
            while i < len(item.ids):
                take = min(len(item.ids) - i, max(room() // row_bytes, 0))
                if take == 0:
                    if size == 0:
                        take = 1  # a row wider than a message still travels
                    else:
                        next_message()
                        continue
                ids = item.ids[i:i + take]
                data = b"" if item.rows is None else item.rows[i:i + take].tobytes()
                requests[-1].sparse.append(pb.SparseSlice(table=item.table, ids=ids.tobytes(),
                                                          data=data))
                size += take * row_bytes
                i += take
            continue
        i = 0
        while i < len(item.blocks):
            j, take = i, 0
            while j < len(item.blocks) and (size + take == 0 or
                                            size + take + item.lengths[j] * 4 <= message_bytes):
                take += item.lengths[j] * 4
                j += 1
            if j == i:  # the current message is full: start the next one
                next_message()
                continue
            data = b"".join(item.views[i:j]) if item.views else b""
            requests[-1].dense.append(pb.DenseSlice(table=item.table, blocks=item.blocks[i:j],
                                                    data=data))
            size += take
            i = j
    return requests
