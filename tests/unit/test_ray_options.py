"""paramserver.ray without a cluster: option validation, and the errors a user without Ray (or
with a wrong flag) gets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paramserver.ray import RayOptions


def test_defaults_ask_one_cpu_per_server_and_worker():
    options = RayOptions()
    assert options._bundle() == {"CPU": 1.0}
    assert (options.worker_cpus, options.scheduler_cpus, options.placement_strategy) == (
        1.0, 0.0, "SPREAD")
    bundle = RayOptions(server_cpus=2, server_memory=1 << 30, server_resources={"ps": 1})._bundle()
    assert bundle == {"CPU": 2.0, "memory": float(1 << 30), "ps": 1.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"server_cpus": -1}, r"server_cpus must be a number >= 0, got -1"),
    ({"worker_memory": float("nan")}, r"worker_memory must be a number >= 0"),
    ({"placement_strategy": "SPRAED"}, r"placement_strategy must be one of .*'SPRAED'"),
    ({"worker_resources": {"GPU": -2}}, r"worker_resources maps resource names to amounts"),
    ({"server_cpus": 0}, r"a server must ask for some resource"),
])
def test_bad_options_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RayOptions(**kwargs)


def _cli(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_ray_launch_without_ray_says_what_to_install():
    done = _cli("import sys; sys.modules['ray'] = None\n"
                "import paramserver.ray\n"  # importable without Ray
                "from paramserver.cli import main\n"
                "sys.exit(main(['launch', '--ray', '--num-servers', '1', '--', 'true']))")
    assert done.returncode == 1, done.stderr
    assert 'pip install "paramserver[ray]"' in done.stderr
    assert "Traceback" not in done.stderr


def test_host_with_ray_is_refused():
    done = _cli("import sys\nfrom paramserver.cli import main\n"
                "sys.exit(main(['launch', '--ray', 'h:1', '--host', '0.0.0.0', '--', 'true']))")
    assert done.returncode == 1
    assert "--host cannot be used with --ray" in done.stderr


def test_bad_ray_resources_are_refused():
    done = _cli("import sys\nfrom paramserver.cli import main\n"
                "sys.exit(main(['launch', '--ray', 'h:1', '--ray-worker-resources', '[1]', "
                "'--', 'true']))")
    assert done.returncode == 1
    assert "Ray resources must be a JSON object" in done.stderr


def test_the_jobs_demand_adds_every_role():
    from paramserver.launch import LaunchConfig
    from paramserver.ray import _job_demand

    options = RayOptions(scheduler_cpus=0.5, server_cpus=2, server_memory=1 << 30,
                         worker_cpus=1, worker_resources={"GPU": 1})
    demand = _job_demand(LaunchConfig(command=["train"], num_servers=2, num_workers=3), options)
    assert demand == {"CPU": 0.5 + 2 * 2 + 3 * 1, "memory": 2.0 * (1 << 30), "GPU": 3.0}
