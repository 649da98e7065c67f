"""Shared test helpers: polling with a named timeout, and the check that every checkpoint a test
writes restores."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


# -- every checkpoint a test writes must restore ---------------------------------------------------

_UNRESTORABLE = pytest.StashKey[set]()
_CHECKPOINT_DIR = re.compile(r"^(ckpt|table)-\d{10}$")


def committed_checkpoints(root: Path) -> list[Path]:
    """Every committed checkpoint under ``root``: a ``ckpt-N`` directory (or an entry of a
    checkpoint directory's initial values, ``initial/table-N``) with a manifest."""
    return sorted(p.parent for p in root.rglob("MANIFEST.json")
                  if _CHECKPOINT_DIR.match(p.parent.name))


def restore_offline(path: Path) -> None:
    """Restore the checkpoint at ``path`` through the real code, in this process: the manifest
    (checksum), coverage, every file's size and CRC-32, every shard read into tables as a
    server's Restore does (each file checked against its manifest entry), and an export of
    every table with its optimizer state. Raises what they raise."""
    from paramserver import checkpoint as ckpt
    from paramserver.export import export_checkpoint
    from paramserver.snapshot import restore_all

    manifest = ckpt.read_manifest(path)
    restore_all(manifest)
    with tempfile.TemporaryDirectory(prefix="ps-restore-check-") as out:
        export_checkpoint(manifest, Path(out) / "model.safetensors", with_optimizer_state=True)


@pytest.fixture
def unrestorable(request: pytest.FixtureRequest) -> Callable[[str | Path], None]:
    """``unrestorable(path)``: this test makes the checkpoint at ``path`` unrestorable on purpose
    (a corrupt byte, an edited or deleted manifest...). The check after the test then requires it
    to fail to restore, instead of requiring it to restore."""
    def declare(path: str | Path) -> None:
        request.node.stash[_UNRESTORABLE].add(Path(path).resolve())
    return declare


@pytest.fixture(autouse=True)
def every_checkpoint_restores(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, restore every committed checkpoint under its ``tmp_path`` (where the
    integration fixtures put their checkpoint directories too) through the real restore code
    (:func:`restore_offline`): a checkpoint that cannot be restored fails the test that wrote
    it, unless the test declared it with :func:`unrestorable`, and then it must fail to restore."""
    from paramserver.errors import CheckpointError

    request.node.stash[_UNRESTORABLE] = set()
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is None:
        return
    declared = request.node.stash[_UNRESTORABLE]
    problems = []
    for path in committed_checkpoints(root):
        try:
            restore_offline(path)
        except (CheckpointError, ValueError) as exc:
            if path.resolve() not in declared:
                problems.append(f"{path}: {exc}")
        else:
            if path.resolve() in declared:
                problems.append(f"{path}: declared unrestorable, but it restores")
    assert not problems, "checkpoints written by this test do not restore:\n" + "\n".join(problems)
