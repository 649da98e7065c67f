"""python/paramserver/_core.pyi describes the compiled module honestly."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import paramserver
from paramserver import _core

# Next to the package's Python files (in an editable install _core itself lives elsewhere).
STUB = Path(paramserver.__file__).with_name("_core.pyi")
ALLOWLIST = Path(__file__).with_name("stubtest_allowlist.txt")


def _public(names: list[str]) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _stub_tree() -> ast.Module:
    assert STUB.is_file(), f"{STUB} is not installed with the package"
    assert STUB.with_name("py.typed").is_file()
    return ast.parse(STUB.read_text())


def test_stub_names_every_public_symbol() -> None:
    tree = _stub_tree()
    top = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert top == _public(dir(_core))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, node in classes.items():
        members = {m.name for m in node.body if isinstance(m, ast.FunctionDef)}
        members |= {m.target.id for m in node.body
                    if isinstance(m, ast.AnnAssign) and isinstance(m.target, ast.Name)}
        runtime = _public(dir(getattr(_core, name)))
        assert _public(list(members)) == runtime, name


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_stubtest() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy.stubtest", "paramserver._core",
                           "--allowlist", str(ALLOWLIST)],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
