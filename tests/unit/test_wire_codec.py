"""The hand-written codec (paramserver.wire) as a trust boundary: it reads what protobuf writes and
writes what protobuf reads, and refuses what protobuf would refuse."""

from __future__ import annotations

import pytest

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.wire import decode_request


def _op_field(varint: bytes) -> bytes:
    return b"\x08" + varint


def test_varints_of_64_bits_are_read_and_larger_ones_refused():
    largest = b"\xff" * 9 + b"\x01"  # 2**64 - 1, as protobuf writes int64 -1
    assert decode_request(_op_field(largest)).op == -1
    assert pb.DataRequest.FromString(_op_field(largest)).op == -1
    for too_big in (b"\xff" * 9 + b"\x02", b"\xff" * 9 + b"\x7f", b"\x80" * 9 + b"\x02"):
        with pytest.raises(ValueError, match="does not fit in 64 bits"):
            decode_request(_op_field(too_big))
    with pytest.raises(ValueError, match="does not fit in 64 bits"):  # 11 bytes
        decode_request(_op_field(b"\xff" * 10 + b"\x01"))
    with pytest.raises(ValueError, match="truncated"):
        decode_request(_op_field(b"\xff\xff"))
