"""Hosts as Linux network namespaces: each "host" is a namespace with one interface (``eth0``) on
a private subnet, plugged into a bridge that lives in a namespace of its own, so nothing of the
test touches the machine's own network. Loopback stays down in every host: a node that dialled
127.0.0.1, or its own address through loopback, would fail.

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2; :func:`make_hosts` raises
:class:`Unavailable` with the reason when namespaces cannot be created.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: The subnet of the test's hosts (namespaces are isolated: it collides with nothing).
SUBNET = "10.213.0"
#: Where iproute2 keeps a handle (a bind mount) of each named namespace.
RUN_DIR = os.path.realpath("/var/run/netns")


def _is_mount(path: str) -> bool:
    """True if ``path`` is a mount point (bind mounts of a folder onto itself included, which
    os.path.ismount does not see)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return os.path.ismount(path)


class Unavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, no kernel support)."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _must(*args: str) -> None:
    done = _ip(*args)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    """Namespaces by host name, each with its address; processes started in them are stopped by
    :meth:`remove`."""

    tag: str
    addresses: dict[str, str] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    etc: list[Path] = field(default_factory=list)
    #: Whether iproute2's namespace folder existed / was a mount point before (it makes it one
    #: at the first `ip netns add`); if not, :meth:`remove` undoes that once it is empty.
    run_dir_existed: bool = True
    run_dir_mounted: bool = True

    def ns(self, host: str) -> str:
        """The namespace name of ``host``."""
        return f"ps{self.tag}-{host}"

    def popen(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (its own process group, stopped by :meth:`remove`)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv],
                                start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], timeout: float,
            **kwargs) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` to completion (bounded by ``timeout``)."""
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], timeout=timeout,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs)

    def name_hosts(self, names: dict[str, str]) -> None:
        """Make each name resolve to its address in every host: ``ip netns exec`` mounts
        ``/etc/netns/NS/hosts`` over ``/etc/hosts`` (removed by :meth:`remove`)."""
        lines = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in names.items())
        for ns in self.namespaces:
            directory = Path("/etc/netns") / ns
            if not directory.parent.exists():
                directory.parent.mkdir()
                self.etc.append(directory.parent)
            directory.mkdir()
            self.etc.append(directory)
            (directory / "hosts").write_text(lines)

    def leftovers(self) -> list[str]:
        """Namespaces, /etc/netns entries and the namespace folder's mount made by this test
        that are still present (none after :meth:`remove`)."""
        listed = _ip("netns", "list").stdout.split()
        etc = [str(p) for p in Path("/etc/netns").glob(f"ps{self.tag}-*")]
        left = [name for name in listed if name.startswith(f"ps{self.tag}-")] + etc
        if (not self.run_dir_mounted and _is_mount(RUN_DIR)
                and not os.listdir(RUN_DIR)):
            left.append(f"the mount {RUN_DIR}")
        return left

    def remove(self) -> None:
        """Stop every process started here (SIGKILL to its group), then delete the namespaces
        (which deletes their veth ends and unmounts their handles)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.namespaces):
            _ip("netns", "del", name)
        self.namespaces.clear()
        for directory in reversed(self.etc):  # our /etc/netns entries, then the folder if ours
            shutil.rmtree(directory, ignore_errors=True)
        self.etc.clear()
        if os.path.isdir(RUN_DIR) and not os.listdir(RUN_DIR):
            if not self.run_dir_mounted and _is_mount(RUN_DIR):
                subprocess.run(["umount", RUN_DIR], capture_output=True, timeout=30)
            if not self.run_dir_existed and not _is_mount(RUN_DIR):
                os.rmdir(RUN_DIR)


def make_hosts(names: list[str]) -> Hosts:
    """Create one namespace per name, addressed ``SUBNET.1``, ``.2``, ... in order, all on one
    bridge. On any failure everything created so far is removed before raising."""
    if shutil.which("ip") is None:
        raise Unavailable("iproute2's `ip` command is not installed")
    if os.geteuid() != 0:
        raise Unavailable("creating network namespaces needs root")
    hosts = Hosts(secrets.token_hex(3), run_dir_existed=os.path.isdir(RUN_DIR),
                  run_dir_mounted=_is_mount(RUN_DIR))
    switch = hosts.ns("switch")
    probe = _ip("netns", "add", switch)
    if probe.returncode:
        raise Unavailable(f"`ip netns add` failed: {probe.stderr.strip()}")
    hosts.namespaces.append(switch)
    try:
        _must("-n", switch, "link", "add", "br0", "type", "bridge")
        _must("-n", switch, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns = hosts.ns(name)
            _must("netns", "add", ns)
            hosts.namespaces.append(ns)
            # The pair is made inside the switch with its other end inside the host: it never
            # appears in the machine's own namespace.
            _must("-n", switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                  "netns", ns)
            _must("-n", switch, "link", "set", f"p{i}", "master", "br0", "up")
            address = f"{SUBNET}.{i + 1}"
            _must("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _must("-n", ns, "link", "set", "eth0", "up")
            hosts.addresses[name] = address
    except BaseException as exc:
        hosts.remove()
        if isinstance(exc, RuntimeError):
            raise Unavailable(f"cannot set up the namespaces' network: {exc}") from None
        raise
    return hosts


@contextlib.contextmanager
def hosts_or_skip(names: list[str]) -> Iterator[Hosts]:
    """:func:`make_hosts` for a test: skipped (with the reason) where namespaces cannot be made;
    removed afterwards, and the test fails if any namespace, link or mount is left."""
    import pytest

    try:
        made = make_hosts(names)
    except Unavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")
    try:
        yield made
    finally:
        made.remove()
        left = made.leftovers()
        assert not left, f"left behind: {left}"
