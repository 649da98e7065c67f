"""The declared minimums of protobuf, grpcio and grpcio-health-checking for this Python.

    python .ci/minimums.py           # print them as pip constraints (name==version)
    python .ci/minimums.py --check   # exit 1 unless exactly those versions are installed

Reads ``pyproject.toml`` (the one source of the window) and evaluates its environment markers
with ``packaging``. Used by ``.ci/compat``.
"""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

WINDOWED = ("protobuf", "grpcio", "grpcio-health-checking")


def minimums() -> dict[str, str]:
    """``{name: minimum}`` of the windowed dependencies that apply to this interpreter."""
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml")
                            .read_text())["project"]
    found: dict[str, str] = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        if req.name in WINDOWED and (req.marker is None or req.marker.evaluate()):
            lows = [s.version for s in req.specifier if s.operator == ">="]
            if len(lows) != 1 or req.name in found:
                sys.exit(f"pyproject.toml: expected one '>=' minimum of {req.name}: {text}")
            found[req.name] = lows[0]
    if sorted(found) != sorted(WINDOWED):
        sys.exit(f"pyproject.toml declares minimums of {sorted(found)} only, not {WINDOWED}")
    return found


def main() -> int:
    wanted = minimums()
    if sys.argv[1:] == ["--check"]:
        installed = {name: importlib.metadata.version(name) for name in wanted}
        if installed != wanted:
            print(f"installed {installed}, not the declared minimums {wanted}", file=sys.stderr)
            return 1
        print(f"installed at the declared minimums: {installed}")
        return 0
    for name, version in wanted.items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
