"""shardfile: safetensors writing and reading, checked against the ``safetensors`` package, CRCs,
corrupt files, and a real file-size limit (a full disk) in a child process."""

from __future__ import annotations

import errno
import json
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from paramserver import shardfile
from paramserver.shardfile import ShardFileError, file_crc32, read_tensors, write_tensors


def sample_tensors() -> dict[str, np.ndarray]:
    """Every stored dtype the checkpoints use, odd sizes so 4-byte tensors end unaligned, and
    empty arrays of several shapes."""
    rng = np.random.default_rng(7)
    return {
        "values": rng.standard_normal(13).astype(np.float32),
        "matrix": rng.standard_normal((3, 5)).astype(np.float32),
        "ids": np.array([0, 1, 2**63, 2**64 - 1, 12345], dtype=np.uint64),
        "steps": np.array([-3, 0, 2**62, 7], dtype=np.int64),
        "slots": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "empty_f32": np.empty(0, np.float32),
        "empty_rows": np.empty((0, 4), np.float32),
        "empty_ids": np.empty(0, np.uint64),
        "empty_steps": np.empty(0, np.int64),
    }


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def header_of(path: Path) -> tuple[int, dict]:
    """The header length and parsed JSON header of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw, 0)
    return length, json.loads(raw[8:8 + length])


def write_raw(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file with a hand-made header (to make malformed ones)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# -- round trips ---------------------------------------------------------------------------------

def test_round_trip_of_every_dtype_with_empty_arrays_and_metadata(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "a.safetensors"
    written = write_tensors(path, tensors, {"table": "emb", "server": 3})
    got, metadata = read_tensors(path)
    assert_same_tensors(got, tensors)
    assert metadata == {"table": "emb", "server": "3"}  # values are stored as strings
    assert written.bytes == path.stat().st_size


def test_without_metadata_reads_an_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_tensors(path, {"x": np.arange(3, dtype=np.float32)})
    got, metadata = read_tensors(path)
    assert metadata == {}
    np.testing.assert_array_equal(got["x"], [0, 1, 2])


def test_header_is_padded_to_eight_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_tensors(path, {"abc": np.arange(3, dtype=np.float32)}, {"k": "v"})
    length, header = header_of(path)
    assert length % 8 == 0
    assert header["abc"] == {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    assert header["__metadata__"] == {"k": "v"}


def test_small_write_chunks_give_the_same_file_and_crc(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = sample_tensors()
    whole = write_tensors(tmp_path / "whole.safetensors", tensors, {"m": "1"})
    monkeypatch.setattr(shardfile, "_CHUNK", 7)  # every tensor is split into many write() calls
    chunked = write_tensors(tmp_path / "chunked.safetensors", tensors, {"m": "1"})
    assert chunked == whole
    assert (tmp_path / "chunked.safetensors").read_bytes() == \
        (tmp_path / "whole.safetensors").read_bytes()
    assert file_crc32(tmp_path / "chunked.safetensors") == chunked.crc32


def test_overwrites_an_existing_longer_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"x" * 10_000)
    written = write_tensors(path, {"x": np.ones(2, np.float32)})
    assert path.stat().st_size == written.bytes < 10_000
    np.testing.assert_array_equal(read_tensors(path)[0]["x"], [1, 1])


# -- the safetensors package, both ways ----------------------------------------------------------

def test_files_written_here_are_read_by_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "a.safetensors"
    write_tensors(path, tensors, {"format": "paramserver-shard", "cut": "4"})
    assert_same_tensors(load_file(str(path)), tensors)
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "paramserver-shard", "cut": "4"}
        assert sorted(f.keys()) == sorted(tensors)
        np.testing.assert_array_equal(f.get_tensor("ids"), tensors["ids"])


def test_files_written_by_safetensors_are_read_here(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "b.safetensors"
    save_file(tensors, str(path), metadata={"origin": "safetensors"})
    got, metadata = read_tensors(path)
    assert_same_tensors(got, tensors)
    assert metadata == {"origin": "safetensors"}


# -- CRC -----------------------------------------------------------------------------------------

def test_crc_is_zlib_crc32_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    written = write_tensors(path, sample_tensors(), {"a": "b"})
    data = path.read_bytes()
    assert written.crc32 == zlib.crc32(data) == file_crc32(path)
    assert written.bytes == len(data)


def test_file_crc32_of_an_empty_file_is_zero(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert file_crc32(tmp_path / "empty") == 0


def test_crc_changes_with_one_flipped_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    written = write_tensors(path, {"x": np.zeros(64, np.float32)})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert file_crc32(path) != written.crc32


# -- returned arrays -----------------------------------------------------------------------------

def test_returned_arrays_are_read_only(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_tensors(path, sample_tensors())
    got, _ = read_tensors(path)
    for name, array in got.items():
        assert not array.flags.writeable, name
    with pytest.raises(ValueError, match="read-only"):
        got["values"][0] = 1.0


def test_eight_byte_tensors_are_aligned_after_odd_sized_float32(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    # An odd number of float32 values would misalign everything after it if written first.
    write_tensors(path, {"a_f32": np.ones(3, np.float32), "b_ids": np.arange(5, dtype=np.uint64),
                         "c_steps": np.arange(3, dtype=np.int64)})
    got, _ = read_tensors(path)
    for name in ("b_ids", "c_steps"):
        assert got[name].flags.aligned, name
        assert got[name].ctypes.data % 8 == 0, name
    assert got["a_f32"].ctypes.data % 4 == 0
    np.testing.assert_array_equal(got["b_ids"], np.arange(5))


def test_arrays_outlive_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_tensors(path, {"x": np.arange(1000, dtype=np.int64)})
    x = read_tensors(path)[0]["x"]
    assert int(x.sum()) == 999 * 1000 // 2


# -- refused input -------------------------------------------------------------------------------

def test_non_contiguous_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    strided = np.arange(10, dtype=np.float32)[::2]
    with pytest.raises(ShardFileError, match="'strided' must be C-contiguous"):
        write_tensors(path, {"strided": strided})
    assert not path.exists()  # refused before the file was created


def test_fortran_order_matrix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ShardFileError, match="C-contiguous"):
        write_tensors(tmp_path / "a.safetensors",
                      {"m": np.asfortranarray(np.ones((3, 4), np.float32))})


@pytest.mark.parametrize("array", [np.ones(3, np.float16), np.ones(3, ">f4"),
                                   np.ones(3, np.complex64)], ids=["f16", "big-endian", "c64"])
def test_unsupported_dtype_is_refused(tmp_path: Path, array: np.ndarray) -> None:
    with pytest.raises(ShardFileError, match="cannot be stored"):
        write_tensors(tmp_path / "a.safetensors", {"t": array})


# -- corrupt files -------------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    write_tensors(path, {"ids": np.arange(10, dtype=np.uint64),
                         "values": np.ones(20, np.float32)}, {"k": "v"})
    return path


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ShardFileError, match="nope.safetensors: cannot open"):
        read_tensors(path)


@pytest.mark.parametrize("keep", [0, 5])
def test_file_shorter_than_the_length_prefix(good_file: Path, keep: int) -> None:
    good_file.write_bytes(good_file.read_bytes()[:keep])
    with pytest.raises(ShardFileError) as info:
        read_tensors(good_file)
    assert str(good_file) in str(info.value)
    assert "truncated" in str(info.value)


def test_truncated_inside_the_header(good_file: Path) -> None:
    good_file.write_bytes(good_file.read_bytes()[:20])
    with pytest.raises(ShardFileError, match="does not fit in the file") as info:
        read_tensors(good_file)
    assert str(good_file) in str(info.value)


def test_truncated_inside_the_data(good_file: Path) -> None:
    good_file.write_bytes(good_file.read_bytes()[:-1])
    with pytest.raises(ShardFileError, match="runs past the end") as info:
        read_tensors(good_file)
    assert str(good_file) in str(info.value)
    assert "truncated or corrupt" in str(info.value)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}" + b" " * 6)
    with pytest.raises(ShardFileError, match="header of 1000 bytes does not fit") as info:
        read_tensors(path)
    assert str(path) in str(info.value)


def test_huge_header_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}" + b" " * 6)
    with pytest.raises(ShardFileError, match="does not fit") as info:
        read_tensors(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("header", [b"not json", b"\xff\xfe\x00\x01", b"[1, 2, 3]"],
                         ids=["text", "not-utf8", "json-list"])
def test_garbage_header(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ShardFileError, match="malformed header") as info:
        read_tensors(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("metadata", [["a", "b"], "text", 5], ids=["list", "string", "number"])
def test_metadata_that_is_not_an_object(tmp_path: Path, metadata: object) -> None:
    """A header whose ``__metadata__`` is not a JSON object is a malformed header, reported as
    ShardFileError like every other one (restores and exports only catch that)."""
    path = tmp_path / "meta.safetensors"
    write_raw(path, {"__metadata__": metadata,
                     "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8)
    with pytest.raises(ShardFileError) as info:
        read_tensors(path)
    assert str(path) in str(info.value)


def test_a_directory_is_not_a_tensor_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.safetensors"
    path.mkdir()
    (path / "filler").write_bytes(b"x")
    with pytest.raises(ShardFileError) as info:
        read_tensors(path)
    assert str(path) in str(info.value)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ShardFileError) as info:
        read_tensors(path)
    assert str(path) in str(info.value)


def test_tensor_offsets_beyond_the_end(tmp_path: Path) -> None:
    path = tmp_path / "offsets.safetensors"
    write_raw(path, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(ShardFileError, match="tensor 'x' at bytes \\[0, 16\\)") as info:
        read_tensors(path)
    assert str(path) in str(info.value)


def test_offsets_that_disagree_with_the_shape(tmp_path: Path) -> None:
    path = tmp_path / "shape.safetensors"
    write_raw(path, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(ShardFileError, match="does not match its shape") as info:
        read_tensors(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("entry", [{"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
                                   {"shape": [1], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [1]},
                                   {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]},
                                   7],
                         ids=["unknown-dtype", "no-dtype", "no-offsets", "bad-shape", "not-dict"])
def test_malformed_tensor_entry(tmp_path: Path, entry: object) -> None:
    path = tmp_path / "entry.safetensors"
    write_raw(path, {"x": entry}, b"\0" * 8)
    with pytest.raises(ShardFileError, match="malformed entry for tensor 'x'") as info:
        read_tensors(path)
    assert str(path) in str(info.value)


# -- a real full disk ----------------------------------------------------------------------------

_FULL_DISK_CHILD = """
import sys
import numpy as np
from paramserver.shardfile import write_tensors
try:
    write_tensors(sys.argv[1], {"big": np.ones(1 << 18, np.float32)})  # 1 MiB
except OSError as exc:
    print("OSError", exc.errno, str(exc))
else:
    print("no error")
"""


def test_a_file_size_limit_raises_efbig_naming_the_path(tmp_path: Path) -> None:
    limit = 64 * 1024
    path = tmp_path / "full.safetensors"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    child = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(path)],
                           preexec_fn=limit_file_size, capture_output=True, text=True,
                           timeout=120, check=False)
    assert child.returncode == 0, child.stderr
    words = child.stdout.split(maxsplit=2)
    assert words[:2] == ["OSError", str(errno.EFBIG)], child.stdout + child.stderr
    assert f"writing {path}" in words[2]
    assert path.stat().st_size <= limit  # the kernel stopped it at the limit
