"""Tensor files in the safetensors format, written and read without copying the arrays.

A file is an 8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, padded with spaces to a multiple of
8 bytes) and the tensors' bytes, back to back. Any safetensors reader (the ``safetensors`` package
for numpy or torch, or another language) reads these files. Checkpoint shards and exported models
both use it.

The writer streams each array's own buffer to the file (no serialized copy in memory), computes a
CRC-32 of the whole file on the way, and fsyncs before returning. The reader maps the file and
returns read-only arrays viewing the mapping. Tensors are laid out with 8-byte types first, so every
tensor is aligned to its element size in the mapping.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ShardFileError", "WrittenFile", "write_tensors", "read_tensors", "file_crc32"]

_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64", np.dtype("<u8"): "U64",
           np.dtype("<i4"): "I32", np.dtype("<f8"): "F64", np.dtype("uint8"): "U8"}
_NUMPY = {v: k for k, v in _DTYPES.items()}
#: Header size limit when reading (the format's own readers use 100 MB).
_MAX_HEADER = 100 * 1024 * 1024
#: Bytes handed to one write() call; also the unit in which the CRC runs beside the writes.
_CHUNK = 64 * 1024 * 1024


class ShardFileError(ValueError):
    """A tensor file that is missing, truncated, corrupt or not in the expected format."""


@dataclass(frozen=True)
class WrittenFile:
    """What :func:`write_tensors` wrote: the file's size in bytes and its zlib CRC-32."""

    bytes: int
    crc32: int


def _header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> tuple[bytes, list]:
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in order:
        array = tensors[name]
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _DTYPES or array.dtype.byteorder == ">":
            raise ShardFileError(f"tensor {name!r}: dtype {array.dtype} cannot be stored")
        if not array.flags.c_contiguous:
            raise ShardFileError(f"tensor {name!r} must be C-contiguous")
        entries[name] = {"dtype": _DTYPES[dtype], "shape": list(array.shape),
                         "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, arrays


def write_tensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                  metadata: Mapping[str, str] | None = None) -> WrittenFile:
    """Write ``tensors`` (name -> C-contiguous little-endian array) to ``path`` as safetensors
    and fsync it. The arrays are written from their own memory; the CRC-32 is computed on a second
    thread while the bytes go to the file.

    Raises OSError from the file system (a full disk is ``ENOSPC`` or ``EFBIG``, with the path);
    ShardFileError for an array that cannot be stored.
    """
    head, arrays = _header(tensors, metadata or {})
    pieces = [memoryview(head)]
    for array in arrays:
        flat = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
        pieces += [flat[i:i + _CHUNK] for i in range(0, len(flat), _CHUNK)]
    total = sum(len(p) for p in pieces)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ps-crc") as crc_pool:
        # zlib.crc32 releases the GIL on large buffers, so it runs while write() does.
        crc = crc_pool.submit(_crc_of, pieces)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for piece in pieces:
                view = piece
                while len(view):
                    n = os.write(fd, view)
                    view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"writing {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return WrittenFile(total, crc.result())


def _crc_of(pieces: list[memoryview]) -> int:
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return crc


def file_crc32(path: str | Path) -> int:
    """The zlib CRC-32 of a whole file (read in 64 MiB chunks)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def read_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Map a safetensors file; return ``({name: read-only array viewing the file}, metadata)``.

    The mapping stays alive as long as any returned array does. Raises ShardFileError naming the
    file and what is wrong with it (missing, truncated, malformed header, offsets out of bounds).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ShardFileError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise ShardFileError(f"{path}: truncated ({size} bytes, no header)")
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except OSError as exc:  # a directory or a special file
        raise ShardFileError(f"{path}: cannot map ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    (length,) = struct.unpack_from("<Q", mapped, 0)
    if length > _MAX_HEADER or 8 + length > size:
        raise ShardFileError(f"{path}: header of {length} bytes does not fit in the file "
                             f"({size} bytes): truncated or not a safetensors file")
    try:
        header = json.loads(bytes(mapped[8:8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFileError(f"{path}: malformed header ({exc})") from None
    if not isinstance(header, dict):
        raise ShardFileError(f"{path}: malformed header (not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise ShardFileError(f"{path}: malformed header (__metadata__ is not a JSON object)")
    base = 8 + length
    buffer = np.frombuffer(mapped, dtype=np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        try:
            dtype = _NUMPY[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFileError(f"{path}: malformed entry for tensor {name!r} ({exc!r})") \
                from None
        count = int(np.prod(shape, dtype=np.int64))
        if begin < 0 or end < begin or base + end > size or end - begin != count * dtype.itemsize:
            raise ShardFileError(f"{path}: tensor {name!r} at bytes [{begin}, {end}) does not "
                                 f"match its shape {shape} or runs past the end ({size} bytes): "
                                 f"truncated or corrupt")
        out[name] = buffer[base + begin:base + end].view(dtype).reshape(shape)
    return out, {str(k): str(v) for k, v in metadata.items()}
