"""A port belongs to one node: a second scheduler or server on a taken port exits 1 in one line."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import PS, kill, start_node


def _second_node(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(PS + args, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _assert_address_in_use(result: subprocess.CompletedProcess[str], port: int) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, not a traceback nor gRPC's log
    assert "address in use" in lines[0] and f":{port}" in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("role", ["scheduler", "server"])
def test_a_second_node_on_a_taken_port_exits_naming_it(tmp_path, role):
    sched, info = start_node(["scheduler", "--port", "0", "--num-servers", "1"],
                             tmp_path / "s.json", tmp_path / "s.log")
    procs = [sched]
    try:
        if role == "scheduler":
            port = int(info["address"].rsplit(":", 1)[1])
            result = _second_node(["scheduler", "--port", str(port), "--num-servers", "1"])
        else:
            server, sinfo = start_node(["server", "--scheduler", info["address"]],
                                       tmp_path / "v.json", tmp_path / "v.log")
            procs.append(server)
            port = int(sinfo["address"].rsplit(":", 1)[1])
            result = _second_node(["server", "--scheduler", info["address"], "--port",
                                   str(port), "--timeout", "5"])
        _assert_address_in_use(result, port)
        # The first node still serves: the second did not take part of its port.
        assert all(p.poll() is None for p in procs)
    finally:
        for proc in procs:
            kill(proc)


def test_the_default_scheduler_port_is_exclusive_too(tmp_path):
    # The first scheduler takes the default port 9090; if another process already holds it, the
    # first one is refused instead. Either way a scheduler on a taken 9090 exits naming it.
    with open(tmp_path / "s.err", "w") as err:
        first = subprocess.Popen(PS + ["scheduler", "--num-servers", "1", "--ready-file",
                                       str(tmp_path / "s.json")],
                                 stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "s.json").exists() or first.poll() is not None, 30,
                 "the first scheduler to serve or exit")
        if first.poll() is not None:  # 9090 was taken by someone else
            _assert_address_in_use(subprocess.CompletedProcess(
                first.args, first.returncode, "", (tmp_path / "s.err").read_text()), 9090)
        else:
            _assert_address_in_use(_second_node(["scheduler", "--num-servers", "1"]), 9090)
            assert first.poll() is None
    finally:
        kill(first)
