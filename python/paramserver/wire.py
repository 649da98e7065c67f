"""Conversions between Python values and the protocol's messages.

Tensors travel as raw little-endian bytes; on the way in they are viewed, not copied, with
:func:`floats` and :func:`ids_view`. Requests are cut into messages of about ``message_bytes`` that
carry whole blocks and whole rows, and the data messages are encoded and decoded by hand (same
wire format as protobuf) so a payload is copied once on each side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.optim import SGD, Adagrad, Adam, AdamW, FedAdam, Optimizer
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["FLOAT", "floats", "ids_view", "first_non_finite", "optimizer_to_spec", "optimizer_from_spec",
           "initializer_to_json", "initializer_from_json", "describe_spec", "specs_match", "spec_to_dict",
           "DenseItem", "SparseItem", "plan_requests", "iter_requests", "iter_messages", "Message", "encode_reply", "encode_pending", "reply_parts", "decode_request",
           "decode_reply", "reply_pending", "RequestView", "SliceView", "SparseView"]

#: The wire dtype of tensors: float32, little-endian.
FLOAT = np.dtype("<f4")

_KINDS = {SGD: pb.OptimizerSpec.SGD, Adagrad: pb.OptimizerSpec.ADAGRAD,
          Adam: pb.OptimizerSpec.ADAM, AdamW: pb.OptimizerSpec.ADAMW}
# Adam without bias correction is FedAdam (OptimizerSpec.no_bias_correction).


def floats(data: bytes) -> np.ndarray:
    """A read-only float32 view of wire bytes (no copy unless misaligned); ValueError if the
    length is not 4k."""
    if len(data) % 4:
        raise ValueError(f"tensor payload of {len(data)} bytes is not a whole number of float32")
    array = np.frombuffer(data, dtype=FLOAT)
    if not array.flags.aligned:
        # The C++ kernels need float-aligned data. Our encoder aligns payloads (see _ALIGN); a
        # message from another protobuf writer may not be, and pays one copy.
        array = array.copy()
    return array


def first_non_finite(values: np.ndarray) -> int:
    """The index of the first NaN or infinity in a flat float32 array, or -1 if there is none.

    One float32 pass in the common case: NaN and inf propagate through the sum (inf + -inf is
    NaN). Finite values can overflow the sum, so a non-finite sum is checked element by element,
    which is exact. (Half the time of a float64 sum: that costs about 2.75 ms per 16 MB.)
    """
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(np.add.reduce(values)):
            return -1
    bad = np.flatnonzero(~np.isfinite(values))
    return int(bad[0]) if bad.size else -1


def ids_view(data: bytes) -> np.ndarray:
    """A read-only uint64 view of wire id bytes (no copy unless misaligned); ValueError if the
    length is not 8k."""
    if len(data) % 8:
        raise ValueError(f"id payload of {len(data)} bytes is not a whole number of uint64")
    array = np.frombuffer(data, dtype="<u8")
    # The core needs aligned ids; embedding slices are not padded (ids are small), so a
    # misaligned one pays a copy.
    return array if array.flags.aligned else array.copy()


def optimizer_to_spec(opt: Optimizer) -> pb.OptimizerSpec:
    """The wire form of an optimizer description."""
    if isinstance(opt, FedAdam):
        return pb.OptimizerSpec(kind=pb.OptimizerSpec.ADAM, no_bias_correction=True,
                                **opt.flat_hyperparameters())
    return pb.OptimizerSpec(kind=_KINDS[type(opt)], **opt.flat_hyperparameters())


def optimizer_from_spec(spec: pb.OptimizerSpec) -> Optimizer:
    """Rebuild (and so validate) an optimizer from its wire form; ValueError if invalid."""
    if spec.no_bias_correction:
        if spec.kind != pb.OptimizerSpec.ADAM:
            raise ValueError(f"no_bias_correction is for Adam (FedAdam) only, got kind "
                             f"{spec.kind}")
        return FedAdam(lr=spec.lr, betas=(spec.beta1, spec.beta2), tau=spec.eps)
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
        combine = " combine=sum" if spec.combine == pb.TableSpec.SUM else ""
        return f"dense {tuple(spec.shape)} block_size={spec.block_size or 'default'}{combine} {opt}"
    return (f"embedding dim={spec.dim} init={spec.initializer_json} seed={spec.seed} {opt}")


def specs_match(existing: pb.TableSpec, declared: pb.TableSpec) -> bool:
    """True when a declaration describes an existing table (exact field equality, except that a
    dense declaration with ``block_size`` 0, "the default", matches any block size)."""
    if declared.kind == pb.TableSpec.DENSE and declared.block_size == 0:
        copy = pb.TableSpec()
        copy.CopyFrom(declared)
        copy.block_size = existing.block_size
        declared = copy
    return existing.SerializeToString(deterministic=True) == \
        declared.SerializeToString(deterministic=True)


def spec_to_dict(spec: pb.TableSpec) -> dict[str, Any]:
    """A table spec as JSON-ready data: name, kind, optimizer, and shape and block_size (dense)
    or dim, initializer and seed (embedding)."""
    entry: dict[str, Any] = {
        "name": spec.name,
        "kind": "dense" if spec.kind == pb.TableSpec.DENSE else "embedding",
        "optimizer": optimizer_from_spec(spec.optimizer).to_dict(),
    }
    if spec.kind == pb.TableSpec.DENSE:
        entry.update(shape=list(spec.shape), block_size=spec.block_size,
                     combine="sum" if spec.combine == pb.TableSpec.SUM else "mean")
    else:
        entry.update(dim=spec.dim, initializer=json.loads(spec.initializer_json or "{}"),
                     seed=spec.seed)
    return entry


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


Run = tuple[Any, int, int]


def _plan_messages(items: list[DenseItem | SparseItem], message_bytes: int) -> list[list[Run]]:
    """Cut ``items`` into messages of about ``message_bytes`` at most each way: for each message,
    the ``(item, i, j)`` runs it carries (blocks ``item.blocks[i:j]`` or rows ``item.ids[i:j]``).

    A message's request (the data written) and its reply (the values read) are counted apart: a
    write item fills the request, a read item (no data: a pull's, or a push's ``pull``) the reply,
    so a push that also reads fills both directions of one message instead of two messages. (A
    push_pull's reply is its request's size: counting the request covers it.) Small tables share
    a message; a large one is split at block / row boundaries; a block larger than
    ``message_bytes`` travels alone. Always at least one (maybe empty) message.
    """
    messages: list[list[Run]] = [[]]
    sent = back = 0  # bytes of the current message's request and reply

    def fits(units: int, send: int, recv: int) -> int:
        """How many of the next ``units`` fit (each costs ``send`` / ``recv`` bytes)."""
        room = [(message_bytes - sent) // send if send else units,
                (message_bytes - back) // recv if recv else units]
        return max(0, min(units, *room))

    for item in items:
        if isinstance(item, SparseItem):
            reads = item.rows is None
            # An id travels in the request; its row in the request (write) or the reply (read).
            send, recv = (8, 8 + 4 * item.dim) if reads else (8 + 4 * item.dim, 0)
            i = 0
            while i < len(item.ids):
                take = fits(len(item.ids) - i, send, recv)
                if take <= 0:
                    if sent or back:
                        messages.append([])
                        sent = back = 0
                        continue
                    take = 1  # a row wider than a message still travels
                messages[-1].append((item, i, i + take))
                sent += take * send
                back += take * recv
                i += take
            continue
        reads = not item.views
        i = 0
        while i < len(item.blocks):
            j, take = i, 0
            while j < len(item.blocks):
                size = item.lengths[j] * 4
                fill = (back if reads else sent) + take + size
                if (sent or back or take) and fill > message_bytes:
                    break
                take += size
                j += 1
            if j == i:  # the current message is full: start the next one
                messages.append([])
                sent = back = 0
                continue
            messages[-1].append((item, i, j))
            if reads:
                back += take
            else:
                sent += take
            i = j
    return messages


# ---------------------------------------------------------------------------------------------
# DataRequest / DataReply by hand, in protobuf's wire format.
#
# Why: the protobuf Python API copies a tensor payload three to four times per message (join into
# bytes, copy into the message, SerializeToString; on the way in: parse, then a copy on every
# ``.data`` access), which costs more than gRPC's own transfer at 4 MB messages. Encoding the
# handful of fields of these two messages by hand copies the payload once on each side (one
# ``b"".join`` of the header and the block views; a zero-copy memoryview when decoding). The bytes
# on the wire are exactly those protobuf writes (the schema in paramserver.proto is unchanged), so
# any protobuf client or server still interoperates; unknown fields are skipped as protobuf does.

def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64: negative numbers are 10-byte two's complement varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [_varint(v) for v in range(1 << 14)]


def _uvarint(value: int) -> bytes:
    return _SMALL_VARINTS[value] if 0 <= value < (1 << 14) else _varint(value)


#: Payload alignment inside a message. A received message is a Python ``bytes`` object, whose data
#: starts 16-byte aligned, so a payload at an offset that is a multiple of 16 can be viewed as
#: float32 and handed to the C++ kernels without a copy (a misaligned float* is not safe there).
_ALIGN = 16
_PAD_TAG = b"\x7a"  # DenseSlice.align: field 15, length-delimited


def _slice_head(outer_tag: bytes, pos: int, table: str, blocks: list[int], data_len: int) -> bytes:
    """A DenseSlice field (as field ``outer_tag`` of its message, starting at offset ``pos``) up to
    and including its data field's length prefix: all but the payload, which follows it and then
    starts at a multiple of ``_ALIGN`` (padded with the ``align`` field before ``data``)."""
    name = table.encode()
    packed = b"".join([_uvarint(b) for b in blocks])
    body = b"\x0a" + _uvarint(len(name)) + name
    if blocks:
        body += b"\x12" + _uvarint(len(packed)) + packed
    if not data_len:
        return outer_tag + _uvarint(len(body)) + body
    data_hdr = b"\x1a" + _uvarint(data_len)
    k = 0
    for _ in range(3):  # k changes the length prefix, whose size rarely changes: 1-2 rounds
        pad = _PAD_TAG + _SMALL_VARINTS[k] + bytes(k)
        head = b"".join([outer_tag, _uvarint(len(body) + len(pad) + len(data_hdr) + data_len),
                         body, pad, data_hdr])
        miss = -(pos + len(head)) % _ALIGN
        if not miss:
            return head
        k = (k + miss) % _ALIGN
    # The rounds above can oscillate when the slice's length sits at a varint boundary (127/128
    # bytes): every k < 16 that fixes the offset also lengthens the prefix (found by the fuzz
    # tests). The prefix's size changes at most once while k grows by 32, so 16 consecutive k
    # of one prefix size exist among k < 32, and one of them aligns the payload.
    for k in range(2 * _ALIGN):
        pad = _PAD_TAG + _SMALL_VARINTS[k] + bytes(k)
        head = b"".join([outer_tag, _uvarint(len(body) + len(pad) + len(data_hdr) + data_len),
                         body, pad, data_hdr])
        if (pos + len(head)) % _ALIGN == 0:
            return head
    raise AssertionError("unreachable: some padding of 2-33 bytes aligns the payload")


def _sparse_field(tag: bytes, table: str, ids: np.ndarray, rows: np.ndarray | None) -> list[Any]:
    """A SparseSlice as field ``tag`` of its message: parts to join (ids and rows not copied)."""
    name = table.encode()
    body = [b"\x0a" + _uvarint(len(name)) + name, b"\x12" + _uvarint(ids.nbytes), ids]
    size = len(body[0]) + len(body[1]) + ids.nbytes
    if rows is not None and rows.nbytes:
        head = b"\x1a" + _uvarint(rows.nbytes)
        body += [head, rows]
        size += len(head) + rows.nbytes
    return [tag + _uvarint(size)] + body


def plan_requests(items: list[DenseItem | SparseItem], message_bytes: int) -> list[list[Run]]:
    """How ``items`` are cut into messages of about ``message_bytes``: one list of runs per
    message (its length is the number of messages). Encode them with :func:`iter_requests`."""
    return _plan_messages(items, message_bytes)


@dataclass
class Message:
    """One serialized DataRequest, as the pieces to write one after the other (headers, and the
    caller's arrays uncopied): ``size`` bytes in all. ``reply_bytes`` bounds its reply's size
    (the values it reads, their headers, and room for a *pending* reply)."""

    parts: list[Any]
    size: int
    reply_bytes: int

    def join(self) -> bytes:
        """The message as one bytes object (one copy of every payload)."""
        return b"".join(self.parts)


#: Reply headroom of a message: a pending reply, and per slice its header (name, block ids).
_REPLY_ROOM, _REPLY_PER_SLICE = 4200, 64


def iter_messages(op: int, items: list[DenseItem | SparseItem] | list[list[Run]],
                  message_bytes: int, node_id: str, op_tag: pb.OpTag | None = None,
                  step: pb.StepTag | None = None) -> tuple[int, Iterator[Message]]:
    """As :func:`iter_requests`, the messages as :class:`Message` pieces (not yet joined), so a
    transport can write them where they travel (a shared-memory segment) with one copy."""
    plan = items if items and isinstance(items[0], list) else _plan_messages(items, message_bytes)
    prefix = (b"\x08" + _uvarint(op)) if op else b""
    name = node_id.encode()
    suffix = b"\x22" + _uvarint(len(name)) + name if name else b""
    if op_tag is not None:
        tag = op_tag.SerializeToString()
        suffix += b"\x2a" + _uvarint(len(tag)) + tag
    if step is not None:
        encoded = step.SerializeToString()
        suffix += b"\x3a" + _uvarint(len(encoded)) + encoded
    reads_all = op in (pb.PULL, pb.PUSH_PULL, pb.LOOKUP)

    def encode(runs: list[Run], part: int) -> Message:
        parts: list[Any] = [prefix]
        pos = len(prefix)
        back = _REPLY_ROOM
        for item, i, j in runs:
            if isinstance(item, SparseItem):
                rows = None if item.rows is None else item.rows[i:j]
                field = _sparse_field(b"\x1a", item.table, item.ids[i:j], rows)
                parts += field
                pos += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in field)
                if reads_all or rows is None:
                    back += (j - i) * (8 + 4 * item.dim) + _REPLY_PER_SLICE + len(item.table)
                continue
            views = item.views[i:j]
            nbytes = sum(v.nbytes for v in views)
            head = _slice_head(b"\x12", pos, item.table, item.blocks[i:j], nbytes)
            parts.append(head)
            parts += views
            pos += len(head) + nbytes
            if reads_all or not views:
                back += 4 * sum(item.lengths[i:j]) + len(head) + _REPLY_PER_SLICE
        parts.append(suffix)
        pos += len(suffix)
        if op_tag is not None and part:
            tail = b"\x30" + _uvarint(part)
            parts.append(tail)
            pos += len(tail)
        return Message(parts, pos, back)

    return len(plan), (encode(runs, i) for i, runs in enumerate(plan))


def iter_requests(op: int, items: list[DenseItem | SparseItem] | list[list[Run]],
                  message_bytes: int, node_id: str, op_tag: pb.OpTag | None = None,
                  step: pb.StepTag | None = None) -> tuple[int, Iterator[bytes]]:
    """Serialized DataRequests carrying ``items`` (or a :func:`plan_requests` plan of them),
    lazily: the number of messages, and an iterator that encodes each when asked, so the first
    message can be on the wire while the next is being built. Block data is copied once, straight
    from the caller's arrays into the message, and each dense payload is 16-byte aligned in its
    message. ``op_tag`` (writes) names the logical operation every message belongs to; ``step``
    (synchronous jobs) where it sits in the worker's steps."""
    count, messages = iter_messages(op, items, message_bytes, node_id, op_tag, step)
    return count, (message.join() for message in messages)


def reply_parts(dense: list[tuple[str, list[int], int, Any]],
                sparse: list[tuple[str, np.ndarray, np.ndarray]] = ()) -> list[Any]:
    """The pieces of a DataReply, for an assembler that fills the dense payloads itself: for
    each dense slice ``(table, blocks, payload bytes, payload)`` its header then ``payload`` (any
    object standing for the values, e.g. a read the core makes straight into the message; its
    16-byte alignment is kept), then the embedding slices' pieces (headers, ids and rows)."""
    parts: list[Any] = []
    pos = 0
    for table, blocks, nbytes, payload in dense:
        head = _slice_head(b"\x0a", pos, table, blocks, nbytes)
        parts += [head, payload]
        pos += len(head) + nbytes
    for table, ids, rows in sparse:
        parts += _sparse_field(b"\x12", table, ids, rows)
    return parts


def encode_reply(dense: list[tuple[str, list[int], np.ndarray]],
                 sparse: list[tuple[str, np.ndarray, np.ndarray]] = (), pending: str = "") -> bytes:
    """A serialized DataReply: dense slices ``(table, blocks, float32 values)`` and embedding
    slices ``(table, uint64 ids, float32 rows)``; or, with ``pending`` (what the step waits for),
    a pending reply without values."""
    if pending:
        return encode_pending(pending)
    return b"".join(reply_parts([(t, b, v.nbytes, v) for t, b, v in dense], sparse))


def encode_pending(waiting_for: str) -> bytes:
    """A pending DataReply: the step asked for is not reached; ``waiting_for`` says why."""
    text = waiting_for.encode()[:4096]
    return b"\x18\x01" + b"\x22" + _uvarint(len(text)) + text


@dataclass
class SliceView:
    """One decoded DenseSlice: ``data`` is a zero-copy memoryview into the received message."""

    table: str
    blocks: list[int]
    data: memoryview


@dataclass
class SparseView:
    """One decoded SparseSlice: ``ids`` and ``data`` are zero-copy memoryviews."""

    table: str
    ids: memoryview
    data: memoryview


@dataclass
class RequestView:
    """A decoded DataRequest, with the attributes of ``pb.DataRequest`` the server reads."""

    op: int
    dense: list[SliceView]
    sparse: list[SparseView]
    node_id: str
    op_tag: pb.OpTag | None = None
    part: int = 0
    step: pb.StepTag | None = None


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The unsigned 64-bit varint at ``buf[pos]`` and the position after it. ValueError if it is
    truncated, longer than 10 bytes, or >= 2**64 (a 10th byte above 1), as protobuf refuses."""
    if pos < end and buf[pos] < 0x80:  # one byte: tags, small lengths and block ids
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("malformed message: truncated varint")
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:  # also ends every varint longer than 10 bytes
            raise ValueError("malformed message: varint does not fit in 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int):  # -> Iterator[tuple[int, int, Any]]
    """(field number, wire type, value) of each field in buf[pos:end]; value is an int for
    varints and fixed fields, a memoryview for length-delimited ones."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("malformed message: field runs past the end")
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise ValueError("malformed message: truncated fixed field")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        else:
            raise ValueError(f"malformed message: wire type {wire}")
        if field == 0:
            raise ValueError("malformed message: field number 0")
        yield field, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def _decode_slice(buf: memoryview) -> SliceView:
    table, blocks, data = "", [], buf[0:0]
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 2:
            table = bytes(value).decode("utf-8")
        elif field == 2 and wire == 2:  # packed (what protobuf writes)
            pos, end = 0, len(value)
            while pos < end:
                b, pos = _read_varint(value, pos, end)
                blocks.append(_signed64(b))
        elif field == 2 and wire == 0:  # unpacked: parsers must accept both
            blocks.append(_signed64(value))
        elif field == 3 and wire == 2:
            data = value
    return SliceView(table, blocks, data)


def _decode_sparse(buf: memoryview) -> SparseView:
    table, ids, data = "", buf[0:0], buf[0:0]
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 2:
            table = bytes(value).decode("utf-8")
        elif field == 2 and wire == 2:
            ids = value
        elif field == 3 and wire == 2:
            data = value
    return SparseView(table, ids, data)


def decode_request(message: bytes) -> RequestView:
    """Decode serialized DataRequest bytes without copying the payloads; ValueError if malformed."""
    buf = memoryview(message)
    request = RequestView(0, [], [], "")
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 0:
            request.op = _signed64(value)
        elif field == 2 and wire == 2:
            request.dense.append(_decode_slice(value))
        elif field == 3 and wire == 2:
            request.sparse.append(_decode_sparse(value))
        elif field == 4 and wire == 2:
            request.node_id = bytes(value).decode("utf-8")
        elif field == 6 and wire == 0:
            request.part = value
        elif field == 5 and wire == 2:
            try:
                request.op_tag = pb.OpTag.FromString(bytes(value))
            except Exception as exc:  # protobuf's DecodeError
                raise ValueError(f"malformed message: bad op_tag ({exc})") from None
        elif field == 7 and wire == 2:
            try:
                request.step = pb.StepTag.FromString(bytes(value))
            except Exception as exc:
                raise ValueError(f"malformed message: bad step ({exc})") from None
    return request


def decode_reply(message: bytes) -> tuple[list[SliceView], list[SparseView]]:
    """The dense and embedding slices of serialized DataReply bytes (payloads not copied)."""
    buf = memoryview(message)
    dense, sparse = [], []
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 2:
            dense.append(_decode_slice(value))
        elif field == 2 and wire == 2:
            sparse.append(_decode_sparse(value))
    return dense, sparse


def reply_pending(message: bytes) -> str | None:
    """What a *pending* DataReply's step waits for, or None if the reply is complete."""
    buf = memoryview(message)
    pending, waiting_for = False, ""
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == 3 and wire == 0:
            pending = bool(value)
        elif field == 4 and wire == 2:
            waiting_for = bytes(value).decode("utf-8", "replace")
    return (waiting_for or "the step") if pending else None
