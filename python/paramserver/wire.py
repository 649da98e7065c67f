"""Conversions between Python values and the protocol's messages.

Tensors travel as raw little-endian bytes; on the way in they are viewed, never copied, with
:func:`floats`. Requests are cut into messages of about ``message_bytes`` that carry whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramserver.optim import Adagrad, Adam, AdamW, Optimizer, SGD
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["FLOAT", "floats", "optimizer_to_spec", "optimizer_from_spec", "describe_spec",
           "specs_match", "DenseItem", "pack_requests"]

#: The wire dtype of tensors: float32, little-endian.
FLOAT = np.dtype("<f4")

_KINDS = {SGD: pb.OptimizerSpec.SGD, Adagrad: pb.OptimizerSpec.ADAGRAD,
          Adam: pb.OptimizerSpec.ADAM, AdamW: pb.OptimizerSpec.ADAMW}


def floats(data: bytes) -> np.ndarray:
    """A read-only float32 view of wire bytes (no copy); ValueError if the length is not 4k."""
    if len(data) % 4:
        raise ValueError(f"tensor payload of {len(data)} bytes is not a whole number of float32")
    return np.frombuffer(data, dtype=FLOAT)


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


def pack_requests(op: int, items: list[DenseItem], message_bytes: int,
                  node_id: str) -> list[pb.DataRequest]:
    """Cut ``items`` into DataRequests carrying whole blocks, each about ``message_bytes`` at most.

    Small tables share a message; a table larger than one message is split at block boundaries;
    a block larger than ``message_bytes`` travels alone. Block data is copied once, straight into
    the message. Always returns at least one request.
    """
    requests = [pb.DataRequest(op=op, node_id=node_id)]
    size = 0
    for item in items:
        i = 0
        while i < len(item.blocks):
            j, take = i, 0
            while j < len(item.blocks) and (size + take == 0 or
                                            size + take + item.lengths[j] * 4 <= message_bytes):
                take += item.lengths[j] * 4
                j += 1
            if j == i:  # the current message is full: start the next one
                requests.append(pb.DataRequest(op=op, node_id=node_id))
                size = 0
                continue
            data = b"".join(item.views[i:j]) if item.views else b""
            requests[-1].dense.append(pb.DenseSlice(table=item.table, blocks=item.blocks[i:j],
                                                    data=data))
            size += take
            i = j
    return requests
