"""Run a paramserver job on a Ray cluster: ``paramserver launch --ray`` and :func:`launch`.

Needs Ray (``pip install "paramserver[ray]"``); ``import paramserver.ray`` works without it and
the first call says what to install.

The scheduler, every server and every worker is a process started by a Ray actor of its own, on
the node Ray placed that actor on:

- the scheduler on the driver's node (the node of the process calling :func:`launch`), so its
  address stays the same when it is restarted;
- the servers in one placement group, one bundle per rank, spread over the nodes
  (``placement_strategy``, ``SPREAD`` by default; ``STRICT_SPREAD`` for one server per node),
  each with the CPU, memory and custom resources of :class:`RayOptions`;
- the workers wherever Ray finds their resources.

Every node binds the IP address Ray knows its node by and advertises it: never 127.0.0.1, so
nodes on other hosts reach it. The supervision is :func:`paramserver.launch.run_job`, the same as
``paramserver launch`` on one machine: output lines prefixed with the role and rank (``[worker
1] ...``), the first failing worker's exit code, restarts with ``max_restarts`` (a server whose
node died is started again in its placement-group bundle, which Ray moves to a live node, and
restores its tables from the newest checkpoint), a final checkpoint, and on every path (success,
a failure, Ctrl-C) every process stopped, every actor killed and the placement group removed. A
process whose actor Ray reports dead (its node died, or it was killed) counts as killed by
SIGKILL: exit code 137.

Checkpoints across nodes: every server writes its files into the checkpoint directory and the
scheduler its manifest, so ``checkpoint_dir`` must be storage that every node mounts at the same
path (NFS, a cluster file system); so must TLS files given by path. A restarted server reads the
checkpoint there, from whatever node it now runs on.

Credentials are handed out as by ``paramserver launch`` (:func:`paramserver.launch.run_job`): the
job secret travels (in the actor's call, then the process environment) to the scheduler's and
servers' actors only; a worker's actor gets the token of its role (``worker``, or ``participant``
in a federated job) and never the secret.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from paramserver.errors import NodeUnavailableError, ParamServerError
from paramserver.launch import (
    LaunchConfig,
    LaunchError,
    _Proc,
    _stop_all,
    _Watchdog,
    line_writer,
    node_command,
    process_environment,
    run_job,
)

__all__ = ["RayOptions", "RayJobError", "launch", "run_command", "PLACEMENT_STRATEGIES"]

#: Ray's placement-group strategies, for the servers' bundles.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

#: Replaced, on each node, by the IP address Ray knows that node by (the nodes' ``--host``).
_NODE_IP = "{ray-node-ip}"

#: Exit code of a process whose Ray actor died (its node was lost): as if killed by SIGKILL.
LOST_CODE = 128 + int(signal.SIGKILL)

_INSTALL = 'pip install "paramserver[ray]"'


def _require_ray():
    """The ``ray`` package, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"running a job on Ray needs Ray, which is not installed: {_INSTALL} "
                          f"({exc})") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and with what resources the job's processes run on a Ray cluster.

    Attributes:
        address: the Ray cluster: ``HOST:PORT`` of its head (the GCS), ``auto`` (a cluster this
            machine belongs to), ``ray://HOST:PORT`` (Ray Client), or "" (``$RAY_ADDRESS``, else a
            new Ray instance on this machine). Ignored when this process is already connected
            (``ray.init`` was called).
        scheduler_cpus / scheduler_memory: what the scheduler's actor asks for (CPUs; bytes, 0:
            none). It always runs on the driver's node.
        server_cpus / server_memory / server_resources: each server's placement-group bundle and
            actor (CPUs; bytes; custom resources such as ``{"ps_server": 1}``).
        worker_cpus / worker_memory / worker_resources: each worker's actor (custom resources
            such as ``{"GPU": 1}``).
        placement_strategy: how the servers' bundles are spread over nodes, one of
            :data:`PLACEMENT_STRATEGIES` (``SPREAD``: over as many nodes as possible;
            ``STRICT_SPREAD``: never two on one node, or the job does not start).
    """

    address: str = ""
    scheduler_cpus: float = 0.0
    scheduler_memory: int = 0
    server_cpus: float = 1.0
    server_memory: int = 0
    server_resources: Mapping[str, float] = field(default_factory=dict)
    worker_cpus: float = 1.0
    worker_memory: int = 0
    worker_resources: Mapping[str, float] = field(default_factory=dict)
    placement_strategy: str = "SPREAD"

    def __post_init__(self) -> None:
        for name in ("scheduler_cpus", "server_cpus", "worker_cpus", "scheduler_memory",
                     "server_memory", "worker_memory"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("server_resources", "worker_resources"):
            for key, value in getattr(self, name).items():
                if not isinstance(key, str) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"{name} maps resource names to amounts >= 0, got "
                                     f"{key!r}: {value!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got "
                             f"{self.placement_strategy!r}")
        if not self._bundle():
            raise ValueError("a server must ask for some resource (server_cpus, server_memory "
                             "or server_resources): Ray places no empty bundle")

    def _bundle(self) -> dict[str, float]:
        """One server's placement-group bundle."""
        bundle = {"CPU": float(self.server_cpus), "memory": float(self.server_memory),
                  **{k: float(v) for k, v in self.server_resources.items()}}
        return {k: v for k, v in bundle.items() if v > 0}


class RayJobError(ParamServerError):
    """A job run by :func:`launch` failed; ``exit_code`` is the launcher's exit code and the
    message says why (for a worker: which one and its exit code)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- on each node ------------------------------------------------------------------------------


class _Lines:
    """A file-like sink collecting the prefixed lines of one process (under the caller's lock)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass


#: Run by a function worker (``python -c``): load (fn, args, kwargs), call it, write its return
#: value; an exception prints its traceback and exits 1, ``sys.exit(n)`` exits n.
_RUN_FUNCTION = r"""
import os, pickle, sys
with open(sys.argv[1], "rb") as f:
    fn, args, kwargs = pickle.load(f)
result = fn(*args, **kwargs)
from ray import cloudpickle
data = cloudpickle.dumps(result)
with open(sys.argv[2] + ".tmp", "wb") as f:
    f.write(data)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
"""


class _NodeProcess:
    """The Ray actor behind one process of the job: starts it on the actor's node (with the
    node's own environment and the job's variables), collects its prefixed output, reports its
    exit code and readiness, and stops it. If the actor dies, the kernel (``PR_SET_PDEATHSIG``)
    and a watchdog process stop the process and its children, as for ``paramserver launch``.
    Not thread safe: Ray runs one call at a time."""

    def __init__(self, name: str, grace: float) -> None:
        self._name = name
        self._tmp = Path(tempfile.mkdtemp(prefix="paramserver-ray-"))
        self._lock = threading.Lock()
        self._sink = _Lines()
        self._watchdog = _Watchdog(str(self._tmp), grace)
        self._proc: _Proc | None = None
        self._result = self._tmp / "result.pkl"

    def __repr__(self) -> str:  # Ray's prefix of this actor's own log lines
        return f"paramserver {self._name}"

    def start(self, kind: str, args: list[str], job_env: dict[str, str], cwd: str,
              payload: bytes | None = None) -> dict[str, str]:
        """Start the process: ``kind`` "node" (``paramserver ARGS``), "command" (ARGS) or
        "function" (``payload``: a pickled (fn, args, kwargs)). Returns where it runs."""
        import ray

        ip = ray.util.get_node_ip_address()
        where = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ip,
                 "hostname": socket.gethostname()}
        env = process_environment(job_env)
        ready = None
        if kind == "node":
            ready = self._tmp / "ready.json"
            argv = node_command() + [a.replace(_NODE_IP, ip) for a in args] + [
                "--ready-file", str(ready)]
        elif kind == "command":
            argv = list(args)
        else:
            function = self._tmp / "function.pkl"
            function.write_bytes(payload or b"")
            argv = [sys.executable, "-c", _RUN_FUNCTION, str(function), str(self._result)]
            # The function was pickled by reference to its module where it could be: import it
            # from where this actor does.
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = _Proc(self._name, argv, env, self._sink, self._lock, self._watchdog,
                           ready_file=ready, cwd=cwd if os.path.isdir(cwd) else None)
        return where

    def poll(self) -> tuple[list[str], int | None, dict | None, bytes | None, float | None]:
        """(new output lines, exit code or None, the ready file's JSON or None, the function's
        pickled return value once it exited 0 else None, when it exited (time.time() on this
        node) or None)."""
        with self._lock:
            lines, self._sink.lines = self._sink.lines, []
        if self._proc is None:
            return lines, None, None, None, None
        code = self._proc.exit_code()
        if code is not None:
            self._proc.join_output(2.0)
            with self._lock:
                lines, self._sink.lines = lines + self._sink.lines, []
        result = self._result.read_bytes() if code == 0 and self._result.exists() else None
        exited_at = self._proc.exited_at if code is not None else None
        return lines, code, self._proc.ready_info(), result, exited_at

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process's group."""
        if self._proc is not None:
            self._proc.signal(sig)

    def stop(self, grace: float) -> list[str]:
        """Stop the process (SIGTERM, SIGKILL after ``grace``), remove the actor's files, and
        return the last output lines."""
        if self._proc is not None:
            _stop_all([self._proc], grace)
        self._watchdog.release()
        shutil.rmtree(self._tmp, ignore_errors=True)
        with self._lock:
            lines, self._sink.lines = self._sink.lines, []
        return lines


# -- on the driver -----------------------------------------------------------------------------


class _RayProc:
    """The driver's handle of one process run by a :class:`_NodeProcess` actor; its state is
    refreshed by :meth:`_RaySpawner.poll`."""

    def __init__(self, name: str, actor, start_ref, needs: dict[str, float]) -> None:
        self.name = name
        self.actor = actor
        self.start_ref = start_ref
        self.needs = needs
        self.where: dict[str, str] | None = None
        self.code: int | None = None
        self.ready: dict | None = None
        self.result: bytes | None = None
        self.pending = None  # the poll call in flight
        self.stopped = False
        self.spawned_at = time.monotonic()
        self.exited_at: float | None = None

    def exit_code(self) -> int | None:
        """The process's exit code (137 if its actor died), or None while it runs."""
        return self.code

    def ready_info(self) -> dict | None:
        """The node's ready-file JSON, once it is serving."""
        return self.ready

    @property
    def waiting_for(self) -> str:
        """Why it is not ready yet, for the startup-timeout error."""
        if self.where is None:
            return (f" (its Ray actor was not placed: it needs {self.needs or 'no resources'}; "
                    f"free on the cluster now: {_free_resources(self.needs)})")
        return ""

    def signal(self, sig: int) -> None:
        """Ask the actor to send ``sig`` to the process (not waiting for it)."""
        if self.code is None and not self.stopped:
            self.actor.signal.remote(int(sig))


def _free_resources(needs: Mapping[str, float] | None = None) -> dict[str, float]:
    """What the cluster has free now (for messages): the resources in ``needs`` (0 when none
    is free), or every resource but Ray's internal ones."""
    ray = _require_ray()
    try:
        free = ray.available_resources()
    except Exception:  # noqa: BLE001 - only for an error message
        return {}
    if needs:
        return {k: round(free.get(k, 0.0), 2) for k in needs}
    return {k: round(v, 2) for k, v in free.items()
            if not k.startswith(("node:", "bundle_group")) and "_group_" not in k}


def _job_demand(config: LaunchConfig, options: RayOptions) -> dict[str, float]:
    """What the whole job asks Ray for at once (resource name -> amount)."""
    demand: dict[str, float] = {}

    def add(needs: Mapping[str, float], times: int) -> None:
        for key, value in needs.items():
            if value:
                demand[key] = demand.get(key, 0.0) + float(value) * times

    add({"CPU": options.scheduler_cpus, "memory": options.scheduler_memory}, 1)
    add(options._bundle(), config.num_servers)
    add({"CPU": options.worker_cpus, "memory": options.worker_memory,
         **options.worker_resources}, config.num_workers)
    return demand


def _check_capacity(ray, config: LaunchConfig, options: RayOptions,
                    say: Callable[[str], None]) -> None:
    """Say so up front when the job asks for more than the whole cluster has (its processes
    would wait for resources; an autoscaling cluster may still grow to fit)."""
    total = ray.cluster_resources()
    short = {key: (amount, total.get(key, 0.0))
             for key, amount in _job_demand(config, options).items()
             if amount > total.get(key, 0.0) + 1e-9}
    if short:
        parts = ", ".join(f"{key} {need:g} (the cluster has {have:g})"
                          for key, (need, have) in short.items())
        say(f"warning: the job asks for more than the Ray cluster has: {parts}; its processes "
            f"wait for resources unless the cluster grows (lower --ray-server-cpus / "
            f"--ray-worker-cpus, RayOptions.server_cpus / worker_cpus)")


class _RaySpawner:
    """Starts the job's processes as Ray actors (the spawner interface of
    :class:`paramserver.launch._Job`)."""

    def __init__(self, options: RayOptions, worker: tuple[str, Any], num_servers: int,
                 out: IO[str], lock: threading.Lock, say: Callable[[str], None], grace: float,
                 startup_timeout: float) -> None:
        self._ray = _require_ray()
        self._options = options
        self._num_servers = num_servers
        self._worker = worker
        self._out = out
        self._lock = lock
        self._say = say
        self._grace = grace
        self._startup_timeout = startup_timeout
        self._tag = uuid.uuid4().hex[:8]
        self._cwd = os.getcwd()
        self._driver_node = self._ray.get_runtime_context().get_node_id()
        self._remote = self._ray.remote(_NodeProcess)
        self._pg = None
        self._handles: list[_RayProc] = []
        self._last_poll = 0.0
        self.workers: dict[int, _RayProc] = {}

    def host(self, configured: str) -> str:
        """Every node binds (and advertises) its Ray node's IP address."""
        return _NODE_IP

    def _placement_group(self):
        if self._pg is None:
            from ray.util.placement_group import placement_group

            bundle = self._options._bundle()
            self._pg = placement_group([dict(bundle) for _ in range(self._num_servers)],
                                       strategy=self._options.placement_strategy,
                                       name=f"paramserver-{self._tag}-servers")
            try:
                self._ray.get(self._pg.ready(), timeout=self._startup_timeout)
            except self._ray.exceptions.GetTimeoutError:
                raise LaunchError(
                    f"Ray could not place the {self._num_servers} servers' bundles "
                    f"({bundle} each, {self._options.placement_strategy}) within "
                    f"{self._startup_timeout:.0f} s; free on the cluster: "
                    f"{_free_resources(bundle)}") from None
        return self._pg

    def spawn_node(self, name: str, role: str, rank: int, args: list[str],
                   job_env: dict[str, str]) -> _RayProc:
        """Start ``paramserver ARGS`` as ``name`` in an actor: the scheduler on the driver's
        node, a server in its placement-group bundle."""
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        o = self._options
        if role == "scheduler":
            needs = {"CPU": o.scheduler_cpus, "memory": o.scheduler_memory}
            strategy = NodeAffinitySchedulingStrategy(self._driver_node, soft=False)
        else:
            needs = o._bundle()
            strategy = PlacementGroupSchedulingStrategy(self._placement_group(),
                                                        placement_group_bundle_index=rank)
        return self._spawn(name, needs, strategy, "node", args, job_env)

    def spawn_worker(self, name: str, rank: int, job_env: dict[str, str]) -> _RayProc:
        """Start the worker (command or function) as ``name`` wherever Ray finds its
        resources."""
        o = self._options
        needs = {"CPU": o.worker_cpus, "memory": o.worker_memory, **o.worker_resources}
        kind, what = self._worker
        handle = self._spawn(name, needs, "DEFAULT", kind, what if kind == "command" else [],
                             job_env, payload=what if kind == "function" else None)
        self.workers[rank] = handle
        return handle

    def _spawn(self, name: str, needs: dict[str, float], strategy, kind: str, args: list[str],
               job_env: dict[str, str], payload: bytes | None = None) -> _RayProc:
        needs = {k: float(v) for k, v in needs.items() if v}
        custom = {k: v for k, v in needs.items() if k not in ("CPU", "memory", "GPU")}
        actor = self._remote.options(
            name=f"paramserver-{self._tag}-{name.replace(' ', '-')}-{len(self._handles)}",
            num_cpus=needs.get("CPU", 0), num_gpus=needs.get("GPU", 0),
            memory=needs.get("memory") or None, resources=custom or None,
            scheduling_strategy=strategy, max_restarts=0,
        ).remote(name, self._grace)
        handle = _RayProc(name, actor, actor.start.remote(kind, args, job_env, self._cwd,
                                                          payload), needs)
        self._handles.append(handle)
        return handle

    def poll(self, force: bool = False) -> None:
        """Refresh every live handle (at most every 0.2 s unless ``force``): print new output,
        note exit codes, readiness and results, and mark handles whose actor died."""
        now = time.monotonic()
        if not force and now - self._last_poll < 0.2:
            return
        self._last_poll = now
        ray = self._ray
        live = [h for h in self._handles if h.code is None and not h.stopped]
        for h in live:
            if h.pending is None and h.where is not None:
                h.pending = h.actor.poll.remote()
        refs = [h.start_ref for h in live if h.where is None] + [
            h.pending for h in live if h.pending is not None]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=0.5)
        for h in live:
            try:
                if h.where is None:
                    if not _done(ray, h.start_ref):
                        if now - h.spawned_at > self._startup_timeout:
                            # A worker has no ready check of its own: never placed is a failure.
                            h.code = 1
                            self._say(f"{h.name} could not start within the startup timeout"
                                      f"{h.waiting_for}")
                        continue
                    h.where = ray.get(h.start_ref)
                    self._say(f"{h.name} runs on Ray node {h.where['node_id'][:12]} "
                              f"({h.where['hostname']}, {h.where['ip']})")
                    continue
                if h.pending is None or not _done(ray, h.pending):
                    continue
                lines, code, ready, result, exited_at = ray.get(h.pending)
                h.pending = None
            except ray.exceptions.ActorUnavailableError:
                h.pending = None  # transient: ask again next time
                continue
            except ray.exceptions.RayActorError as exc:
                h.code = LOST_CODE
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown"
                self._say(f"{h.name}: its Ray actor died ({reason[:300]}); counted as killed "
                          f"(exit code {LOST_CODE})")
                continue
            self._write(lines)
            h.ready = ready or h.ready
            h.result = result if result is not None else h.result
            h.exited_at = exited_at
            h.code = code

    def _write(self, lines: list[str]) -> None:
        if lines:
            with self._lock:
                self._out.write("".join(lines))
                self._out.flush()

    def stop(self, procs: list, grace: float) -> None:
        """Stop every process (SIGTERM, SIGKILL after ``grace``), print their last output, kill
        every actor this job made and remove the placement group."""
        ray = self._ray
        try:
            live = [h for h in self._handles if h.code is None and h.where is not None]
            for h in reversed(live):
                h.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(h.code is None for h in live):
                self.poll(force=True)
                time.sleep(0.05)
            stops = {h: h.actor.stop.remote(1.0) for h in self._handles
                     if h.code != LOST_CODE and h.where is not None}
            if stops:
                ray.wait(list(stops.values()), num_returns=len(stops), timeout=15)
            for h, ref in stops.items():
                if _done(ray, ref):
                    try:
                        self._write(ray.get(ref))
                    except ray.exceptions.RayError:
                        pass
                h.stopped = True
        finally:
            self.close()

    def close(self) -> None:
        """Kill every actor of this job and remove its placement group (idempotent)."""
        ray = self._ray
        for h in self._handles:
            h.stopped = True
            try:
                ray.kill(h.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - already removed, or the cluster is gone
                pass
            self._pg = None


def _done(ray, ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def _connect(ray, address: str) -> bool:
    """Connect this process to the Ray cluster at ``address`` unless it already is; True if
    this call connected (and the caller must disconnect)."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS", "")
    if target and target not in ("auto", "local") and "://" not in target:
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise NodeUnavailableError(
                f"cannot reach the Ray cluster at {target}: "
                f"{getattr(exc, 'strerror', None) or exc} (is `ray start --head` running there, "
                f"and is the address its GCS address, HOST:6379 by default?)") from None
    try:
        ray.init(address=address or None, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise NodeUnavailableError(f"cannot connect to the Ray cluster at "
                                   f"{target or 'a new local instance'}: {exc}") from None
    return True


def _run(config: LaunchConfig, options: RayOptions, worker: tuple[str, Any],
         out: IO[str] | None) -> tuple[int, _RaySpawner | None, list[str]]:
    ray = _require_ray()
    out = out or sys.stdout
    lock = threading.Lock()
    say_line = line_writer(out, lock)
    said: list[str] = []

    def say(message: str) -> None:
        said.append(message)
        say_line(message)

    owns = _connect(ray, options.address)
    spawner = None
    try:
        _check_capacity(ray, config, options, say)
        spawner = _RaySpawner(options, worker, config.num_servers, out, lock, say, config.grace,
                              config.startup_timeout)
        return run_job(config, spawner, say), spawner, said
    finally:
        if spawner is not None:
            spawner.close()
        if owns:
            ray.shutdown()


def run_command(config: LaunchConfig, options: RayOptions, out: IO[str] | None = None) -> int:
    """``paramserver launch --ray``: run ``config.command`` as each worker on the Ray cluster of
    ``options`` and return the launcher's exit code (as :func:`paramserver.launch.launch`:
    0, the first failing worker's code, 130/143 on Ctrl-C/SIGTERM, 1 if the job cannot start).

    The command runs in the launcher's working directory where that directory exists on the
    worker's node (shared storage, or the same checkout on every node), else in Ray's.

    Raises:
        ImportError: Ray is not installed.
        NodeUnavailableError: the Ray cluster cannot be reached (the message names its address).
    """
    code, _, _ = _run(config, options, ("command", list(config.command)), out)
    return code


def launch(train_fn: Callable[..., Any], num_servers: int = 1, num_workers: int = 1, *,
           args: tuple = (), kwargs: Mapping[str, Any] | None = None,
           options: RayOptions | None = None, out: IO[str] | None = None,
           **launch_options: Any) -> list[Any]:
    """Run ``train_fn(*args, **kwargs)`` as each of ``num_workers`` workers of a job with
    ``num_servers`` servers on a Ray cluster; return the workers' return values by rank.

    Each worker is a process of its own, started by a Ray actor, with ``PARAMSERVER_SCHEDULER``,
    ``PARAMSERVER_RANK``, ``PARAMSERVER_NUM_WORKERS`` and its role's token set, so
    ``paramserver.connect()`` in ``train_fn`` joins the job. ``train_fn``, its arguments and its
    return value travel with Ray's pickler (cloudpickle). Blocks until the job ends; output
    lines are written to ``out`` (default stdout) behind ``[worker N]``, ``[server N]``,
    ``[scheduler]`` and ``[launch]``.

    Args:
        train_fn: the training function (it may call ``sys.exit(code)``).
        num_servers / num_workers: the job's size.
        args / kwargs: passed to ``train_fn`` in every worker.
        options: where and with what resources (see :class:`RayOptions`); the Ray address is
            ``options.address``.
        out: where output lines go.
        launch_options: any other field of :class:`paramserver.launch.LaunchConfig`:
            ``checkpoint_dir`` (storage every node mounts), ``checkpoint_every``,
            ``max_restarts``, ``resume``, ``sync``, ``on_worker_failure``, ``token``,
            ``job_secret``,
            ``heartbeat_interval``, ``heartbeat_timeout``, ``startup_timeout``, ``grace``...

    Raises:
        RayJobError: the job failed; the message names the worker (or node) and its exit code,
            ``exit_code`` is what ``paramserver launch`` would exit with.
        ImportError: Ray is not installed.
        NodeUnavailableError: the Ray cluster cannot be reached.
    """
    from ray import cloudpickle

    name = getattr(train_fn, "__qualname__", repr(train_fn))
    config = LaunchConfig(command=[f"{getattr(train_fn, '__module__', '?')}.{name}()"],
                          num_servers=num_servers, num_workers=num_workers, **launch_options)
    options = options or RayOptions()
    payload = cloudpickle.dumps((train_fn, tuple(args), dict(kwargs or {})))
    code, spawner, said = _run(config, options, ("function", payload), out)
    if code != 0:
        why = next((m for m in reversed(said) if "stopping" in m or m.startswith("error")),
                   said[-1] if said else "")
        raise RayJobError(f"the job failed with exit code {code}: {why}", code)
    assert spawner is not None
    return [pickle.loads(spawner.workers[rank].result) if spawner.workers[rank].result
            else None for rank in range(num_workers)]
