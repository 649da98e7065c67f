"""Reading the Kubernetes manifests of deploy/kubernetes the way Kubernetes does: the files
kustomization.yaml lists, each container's command line with ``$(VAR)`` references expanded from
the container's environment, and where each variable's value comes from."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def load() -> list[dict]:
    """Every object of every file kustomization.yaml lists, in order."""
    import yaml

    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of ``kind`` (and ``name``)."""
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    """The pod template's spec of a Deployment, StatefulSet or Job."""
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    """The one container of a workload's pods."""
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def env(c: dict) -> dict[str, dict]:
    """A container's environment entries by name."""
    return {e["name"]: e for e in c.get("env", [])}


def references(c: dict) -> set[str]:
    """The variables a container's command and args refer to as ``$(NAME)``."""
    return {m for arg in c.get("command", []) + c.get("args", [])
            for m in _REFERENCE.findall(str(arg))}


def argv(c: dict, values: dict[str, str]) -> list[str]:
    """The container's command line (command + args) with every ``$(NAME)`` replaced by
    ``values[NAME]`` (Kubernetes expands only variables the container defines; a missing one is
    a KeyError here)."""
    return [_REFERENCE.sub(lambda m: values[m.group(1)], str(arg))
            for arg in c.get("command", []) + c.get("args", [])]


def flag(args: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in ``args``."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise KeyError(f"{name} not in {args}")


def named_port(c: dict, port) -> int:
    """A Service's targetPort (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p.get("name") == port)
