"""The memory this machine (or this process's cgroup) has, and the check that refuses a table that
cannot fit in it before anything is allocated.

A server with no ``--max-memory`` still refuses a table larger than the memory it could ever get:
asked for 2^40 elements it answers :class:`~paramserver.errors.ResourceExhaustedError` naming the
table, the bytes asked and the memory of the machine, instead of failing inside the allocator
(``std::bad_alloc``) or being killed by the kernel while it zero-fills the table. The core checks
the same bound itself (against the machine's physical memory) before it allocates.
"""

from __future__ import annotations

import os
from pathlib import Path

from paramserver.errors import ResourceExhaustedError

__all__ = ["MachineMemory", "machine_memory", "check_fits", "format_bytes"]

_CGROUP = Path("/sys/fs/cgroup")


class MachineMemory:
    """Bytes of memory: ``total`` (physical, or the cgroup's limit if lower) and ``available``
    (what the kernel says can be allocated without swapping, within the cgroup's limit)."""

    def __init__(self, total: int, available: int, limited_by: str = "") -> None:
        self.total = total
        self.available = available
        #: "" for the machine's physical memory, else the cgroup limit that binds.
        self.limited_by = limited_by

    def describe(self) -> str:
        """``this machine has 15.6 GiB of memory, 9.2 GiB of it available``."""
        where = f"this process's cgroup ({self.limited_by}) allows" if self.limited_by \
            else "this machine has"
        return (f"{where} {format_bytes(self.total)} of memory, {format_bytes(self.available)} "
                f"of it available")


def format_bytes(n: int) -> str:
    """``4398046511104`` -> ``4.0 TiB (4398046511104 bytes)``."""
    value, unit = float(n), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            break
        value, unit = value / 1024, name
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({n} bytes)"


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_limit() -> tuple[int, int, str] | None:
    """(limit, usage, file) of this process's memory cgroup, if it has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = _CGROUP / path.lstrip("/")
            limit, usage = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            base = _CGROUP / "memory" / path.lstrip("/")
            limit, usage = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        value = _read_int(limit)
        if value is not None and value < (1 << 60):  # v1 writes "no limit" as a huge number
            return value, _read_int(usage) or 0, str(limit)
    return None


def machine_memory() -> MachineMemory:
    """The memory this process can use: the machine's, bounded by its cgroup's limit if any."""
    info = _meminfo()
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", total)
    limited_by = ""
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup[0] < total:
        limit, usage, limited_by = cgroup
        total = limit
        available = min(available, max(0, limit - usage))
    return MachineMemory(total, min(available, total), limited_by)


def check_fits(table: str, needed: int, node: str, what: str) -> None:
    """Raise ResourceExhaustedError if ``needed`` bytes for ``table`` (``what``: what they hold)
    are more than the memory available on this machine; nothing is allocated either way."""
    memory = machine_memory()
    if memory.total and needed > memory.available:
        raise ResourceExhaustedError(
            f"table {table!r}: {what} need {format_bytes(needed)} on {node}, but "
            f"{memory.describe()}; refused before allocating (make the table smaller, or spread "
            f"it over more servers)")
