"""Node configs refuse bad values when made, naming the field (not on the first request)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paramserver.config import ClientConfig, SchedulerConfig, ServerConfig


@pytest.mark.parametrize("fields, match", [
    ({"apply_threads": 0}, "apply_threads must be a number > 0, got 0"),
    ({"threads": -1}, "threads must be"),
    ({"timeout": float("nan")}, "timeout must be"),
    ({"port": 70000}, r"port must be an int in \[0, 65535\]"),
    ({"rank": -2}, "rank must be >= 0, or -1"),
    ({"max_memory": -1}, "max_memory must be >= 0"),
    ({"scheduler": "nohost"}, "scheduler must be 'host:port'"),
    ({"advertise": "b:0"}, "advertise must be 'host:port'"),
    ({"security": "token"}, "security must be a paramserver.Security"),
])
def test_server_config_refuses(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ServerConfig(**{"scheduler": "127.0.0.1:9090", **fields})


@pytest.mark.parametrize("fields, match", [
    ({"message_bytes": 0}, "message_bytes must be a number > 0"),
    ({"timeout": 0}, "timeout must be"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"scheduler": "127.0.0.1:x"}, "scheduler must be 'host:port'"),
])
def test_client_config_refuses(fields, match):
    with pytest.raises(ValueError, match=match):
        ClientConfig(**{"scheduler": "127.0.0.1:9090", **fields})


def test_scheduler_config_refuses_zero_threads():
    with pytest.raises(ValueError, match="max_threads must be"):
        SchedulerConfig(max_threads=0)


def test_good_configs_are_accepted():
    assert ServerConfig(scheduler="[::1]:9090", advertise="b.example:7000").apply_threads == 2
    assert ClientConfig(scheduler="a.example:9090").rank == -1


def test_the_cli_refuses_apply_threads_0_in_one_line():
    # Before: the server started and failed every request, blamed on the client.
    result = subprocess.run([sys.executable, "-m", "paramserver", "server", "--scheduler",
                             "127.0.0.1:1", "--apply-threads", "0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("paramserver server: error: apply_threads must be a number "
                                     "> 0, got 0")
