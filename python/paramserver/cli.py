"""The ``paramserver`` command: scheduler, server, launch, status, checkpoint and export.

The only place that reads flags (and, with :func:`paramserver.config.load_security`, the token's
environment variable and files); it builds the config objects every node class receives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from paramserver import __version__

__all__ = ["main"]


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A byte count from ``--max-memory``: ``1073741824``, ``512M``, ``8G``, ``1.5GiB`` (binary
    units; 0: no limit)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS and raw[-1:] else ""
    try:
        value = float(raw[:-1] if unit else raw) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 8G, "
                                         f"1073741824)") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"a size must be >= 0, got {text!r}")
    return int(value)


def _write_ready(path: str | None, **info: object) -> None:
    """Announce a node is serving: atomically write JSON to ``path`` (read by the launcher)."""
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(dict(info, pid=os.getpid())))
    tmp.replace(path)


def _serve_until_signal(node, name: str) -> int:
    """Block until SIGINT/SIGTERM, then stop ``node`` gracefully; exit code 0."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if node.wait(0):  # stopped from elsewhere
            return 0
    print(f"{name}: stopping", flush=True)
    node.stop(grace=1.0)
    return 0


def _security(args: argparse.Namespace):
    """The node's Security from ``--token-file`` / ``--tls-*`` or their environment variables."""
    from paramserver.config import load_security

    return load_security(token_file=args.token_file,
                         job_secret_file=getattr(args, "job_secret_file", None),
                         tls_cert=args.tls_cert,
                         tls_key=args.tls_key, tls_ca=args.tls_ca,
                         tls_client_auth=getattr(args, "tls_client_auth", False))


def _cmd_scheduler(args: argparse.Namespace) -> int:
    from paramserver.config import SchedulerConfig
    from paramserver.scheduler import Scheduler

    config = SchedulerConfig(host=args.host, port=args.port, num_servers=args.num_servers,
                             num_workers=args.num_workers,
                             heartbeat_interval=args.heartbeat_interval,
                             heartbeat_timeout=args.heartbeat_timeout, security=_security(args),
                             recover_grace=args.recover_grace,
                             **_cmd_scheduler_config(args))
    scheduler = Scheduler(config).start()
    print(f"scheduler listening on {scheduler.address} (expecting {config.num_servers} servers; "
          f"protection: {config.security.protection})", flush=True)
    _write_ready(args.ready_file, address=scheduler.address)
    return _serve_until_signal(scheduler, "scheduler")


def _checkpoint_config(args: argparse.Namespace) -> dict:
    return {"checkpoint_dir": args.checkpoint_dir or "", "checkpoint_every": args.checkpoint_every,
            "keep": args.keep, "resume": args.resume}


def _sync_config(args: argparse.Namespace) -> dict:
    return {"sync": args.sync, "on_worker_failure": args.on_worker_failure}


def _federated_config(args: argparse.Namespace):
    """The job's FederatedConfig (None without --federated); the round flags need --federated."""
    from paramserver.config import FederatedConfig

    given = [flag for flag, value, default in (
        ("--clients-per-round", args.clients_per_round, None),
        ("--min-updates", args.min_updates, None), ("--round-timeout", args.round_timeout, None),
        ("--rounds", args.rounds, None), ("--selection-seed", args.selection_seed, None),
        ("--min-participants", args.min_participants, None),
        ("--dp-clip", args.dp_clip, None), ("--dp-noise", args.dp_noise, None))
        if value is not default]
    if not args.federated:
        if given:
            raise ValueError(f"{', '.join(given)} require --federated")
        return None
    values = {"clients_per_round": args.clients_per_round, "min_updates": args.min_updates,
              "round_timeout": args.round_timeout, "rounds": args.rounds,
              "seed": args.selection_seed, "dp_clip": args.dp_clip, "dp_noise": args.dp_noise,
              "min_participants": args.min_participants}
    return FederatedConfig(**{k: v for k, v in values.items() if v is not None})


def _cmd_scheduler_config(args: argparse.Namespace) -> dict:
    from paramserver.scheduler import has_recoverable_state

    recover = args.recover
    if args.recover_if_present:
        if not args.checkpoint_dir:
            raise ValueError("--recover-if-present needs --checkpoint-dir")
        recover = has_recoverable_state(args.checkpoint_dir)
        if recover:
            print(f"scheduler: {args.checkpoint_dir} holds a running job's state; recovering it "
                  f"(--recover-if-present)", flush=True)
    return dict(_checkpoint_config(args), recover=recover, **_sync_config(args),
                federated=_federated_config(args))


def _cmd_server(args: argparse.Namespace) -> int:
    from paramserver import rpc
    from paramserver.config import ServerConfig
    from paramserver.server import Server

    rpc.tune_malloc()  # megabyte messages without a page fault per 4 KiB (see tune_malloc)
    config = ServerConfig(scheduler=args.scheduler, host=args.host, port=args.port,
                          advertise=args.advertise or "", rank=args.rank, threads=args.threads,
                          apply_threads=args.apply_threads, timeout=args.timeout,
                          security=_security(args), max_memory=args.max_memory,
                          replace=args.replace,
                          fault_drop_reply_every=args.fault_drop_reply_every,
                          transport=args.transport)
    server = Server(config).start()
    print(f"server-{server.rank} serving on {server.address} (protection: "
          f"{config.security.protection})", flush=True)
    _write_ready(args.ready_file, address=server.address, rank=server.rank)
    return _serve_until_signal(server, f"server-{server.rank}")


def _cmd_token(args: argparse.Namespace) -> int:
    from paramserver.config import SECRET_ENV, load_security
    from paramserver.roles import derive_token

    path = args.job_secret_file or os.environ.get(SECRET_ENV, "")
    if not path:
        raise ValueError("no job secret: give --job-secret-file FILE (or set "
                         f"{SECRET_ENV})")
    security = load_security(job_secret_file=path, environ={})
    print(derive_token(security.job_secret, args.role))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from paramserver.config import TLS_ENV
    from paramserver.launch import LaunchConfig, launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    security = _security(args)  # read and checked here, so a bad file fails before any start

    def tls_path(name: str) -> str:
        path = getattr(args, name) or os.environ.get(TLS_ENV[name], "")
        return os.path.abspath(path) if path else ""

    if args.ray is not None and args.host is not None:
        raise ValueError("--host cannot be used with --ray: every node binds the address its "
                         "Ray node is known by")
    config = LaunchConfig(command=command, num_servers=args.num_servers,
                          num_workers=args.num_workers, host=args.host or "127.0.0.1",
                          port=args.port,
                          heartbeat_interval=args.heartbeat_interval,
                          heartbeat_timeout=args.heartbeat_timeout,
                          recover_grace=args.recover_grace,
                          startup_timeout=args.startup_timeout,
                          token="" if security.job_secret else security.token,
                          job_secret=security.job_secret,
                          tls_cert=tls_path("tls_cert"), tls_key=tls_path("tls_key"),
                          tls_ca=tls_path("tls_ca"), tls_client_auth=args.tls_client_auth,
                          max_restarts=args.max_restarts, transport=args.transport,
                          **_checkpoint_config(args), **_sync_config(args),
                          federated=_federated_config(args))
    if args.ray is None:
        return launch(config)
    try:
        from paramserver.ray import RayOptions, run_command
        options = RayOptions(address=args.ray, scheduler_cpus=args.ray_scheduler_cpus,
                             scheduler_memory=args.ray_scheduler_memory,
                             server_cpus=args.ray_server_cpus,
                             server_memory=args.ray_server_memory,
                             server_resources=_resources(args.ray_server_resources),
                             worker_cpus=args.ray_worker_cpus,
                             worker_memory=args.ray_worker_memory,
                             worker_resources=_resources(args.ray_worker_resources),
                             placement_strategy=args.ray_placement_strategy)
        return run_command(config, options)
    except ImportError as exc:
        raise ValueError(str(exc)) from None


def _resources(text: str | None) -> dict:
    """A JSON object of Ray custom resources (``--ray-worker-resources '{"GPU": 1}'``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise ValueError(f"Ray resources must be a JSON object such as '{{\"GPU\": 1}}', got "
                         f"{text!r}: {exc}") from None
    return value


def _cmd_status(args: argparse.Namespace) -> int:
    from paramserver.status import fetch_status, format_status

    status = fetch_status(args.scheduler, timeout=args.timeout, security=_security(args))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from paramserver.coordinator import checkpoint_reply_to_dict
    from paramserver.status import call_scheduler
    from paramserver.v1 import paramserver_pb2 as pb

    metadata = args.metadata or "{}"
    try:
        if not isinstance(json.loads(metadata), dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise ValueError(f"--metadata must be a JSON object: {exc}") from None
    reply = call_scheduler(args.scheduler, "Checkpoint",
                           pb.CheckpointRequest(metadata_json=metadata, timeout=args.timeout),
                           timeout=args.timeout + 5.0, what="checkpoint",
                           security=_security(args))
    info = checkpoint_reply_to_dict(reply)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"checkpoint {info['version']} written to {info['path']}: {info['bytes']} bytes, "
              f"writes held {info['hold_s'] * 1e3:.1f} ms, {info['total_s']:.2f} s in all")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from paramserver import checkpoint as ckpt
    from paramserver.export import export_checkpoint, export_from_job

    if bool(args.scheduler) == bool(args.checkpoint):
        raise ValueError("give exactly one of --scheduler HOST:PORT (a running job) and "
                         "--checkpoint PATH")
    if args.version is not None and not args.checkpoint:
        raise ValueError("--version needs --checkpoint")
    if args.scheduler:
        info = export_from_job(args.scheduler, args.out, args.with_optimizer_state, args.timeout,
                               security=_security(args))
    else:
        manifest = ckpt.open_checkpoint(args.checkpoint, args.version)
        info = export_checkpoint(manifest, args.out, args.with_optimizer_state)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"exported version {info['version']} ({len(info['tables'])} tables) to "
              f"{info['path']}: {info['bytes']} bytes")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paramserver",
                                     description="A parameter server for distributed training.")
    parser.add_argument("--version", action="version", version=f"paramserver {__version__}")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="least severe log messages shown, on stderr (default %(default)s)")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def security_flags(p: argparse.ArgumentParser, serving: bool) -> None:
        p.add_argument("--token-file", metavar="FILE",
                       help="file holding this caller's token: one token for every node, or the "
                            "token of a role (paramserver token) (default: $PARAMSERVER_TOKEN; "
                            "none: no authentication)")
        p.add_argument("--job-secret-file", metavar="FILE",
                       help="file holding the job secret: control-plane nodes (scheduler, "
                            "servers, the operator's commands) check callers' role tokens "
                            "derived from it and call as the control role (default: the file "
                            "named by $PARAMSERVER_JOB_SECRET_FILE; docs/operations.md)")
        p.add_argument("--tls-cert", metavar="PEM",
                       help=("this node's TLS certificate chain: serve TLS with it" if serving
                             else "client certificate, for mutual TLS") +
                       " (default: $PARAMSERVER_TLS_CERT)")
        p.add_argument("--tls-key", metavar="PEM",
                       help="private key of --tls-cert (default: $PARAMSERVER_TLS_KEY)")
        p.add_argument("--tls-ca", metavar="PEM",
                       help="CA certificates that sign the peers' certificates; calls to the "
                            "scheduler and servers use TLS and verify them (default: "
                            "$PARAMSERVER_TLS_CA)")
        if serving:
            p.add_argument("--tls-client-auth", action="store_true",
                           help="mutual TLS: refuse callers without a certificate signed by "
                                "--tls-ca")

    def heartbeat_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S",
                       help="seconds between node heartbeats (default 1)")
        p.add_argument("--heartbeat-timeout", type=float, default=10.0, metavar="S",
                       help="seconds of silence before a node is marked dead (default 10)")
        p.add_argument("--recover-grace", type=float, default=0.0, metavar="S",
                       help="after a scheduler restart (--recover), seconds the job's nodes "
                            "get to report back before they are called dead (default: 3 x "
                            "--heartbeat-timeout)")

    def sync_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sync", default="async", metavar="MODEL",
                       help="consistency model: async (default: every push applied as it "
                            "arrives), bsp (each step combines one push of every worker) or "
                            "ssp:S (reads wait until every worker is at most S steps behind)")
        p.add_argument("--on-worker-failure", choices=("fail", "shrink"), default="fail",
                       help="bsp/ssp: when a worker dies, fail the job's steps with an error "
                            "naming it (default), or shrink: go on without it")

    def federated_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("federated jobs (docs/federated.md)")
        g.add_argument("--federated", action="store_true",
                       help="run federated rounds: participants submit model updates, the "
                            "servers apply each table's optimizer once per round to minus their "
                            "example-weighted mean")
        g.add_argument("--clients-per-round", type=int, metavar="K",
                       help="participants selected per round; a round closes when their K "
                            "updates arrived (default 10)")
        g.add_argument("--min-updates", type=int, metavar="M",
                       help="updates a round needs at its timeout to be applied; with fewer it "
                            "is abandoned (default 1)")
        g.add_argument("--round-timeout", type=float, metavar="SECONDS",
                       help="seconds a round stays open (default 300)")
        g.add_argument("--rounds", type=int, metavar="N",
                       help="rounds to run, then the job is finished (default 0: no limit)")
        g.add_argument("--min-participants", type=int, metavar="N",
                       help="live participants needed before a round opens (default: K)")
        g.add_argument("--selection-seed", type=int, metavar="SEED",
                       help="seed of the fair participant selection (default 0)")
        g.add_argument("--dp-clip", type=float, metavar="C",
                       help="DP-FedAvg: clip each update's L2 norm (all tables) to C "
                            "(default: no clipping)")
        g.add_argument("--dp-noise", type=float, metavar="SIGMA",
                       help="DP-FedAvg: add Gaussian noise of std SIGMA*C/n to the mean of the "
                            "n counted updates (needs --dp-clip; default: no noise)")

    def checkpoint_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint-dir", metavar="DIR",
                       help="directory of the job's checkpoints (created if missing; default: "
                            "none, no checkpoints)")
        p.add_argument("--checkpoint-every", type=float, default=0.0, metavar="SECONDS",
                       help="take a checkpoint every SECONDS (default: only on request)")
        p.add_argument("--keep", type=int, default=3, metavar="K",
                       help="complete checkpoints to keep (default 3; 0 keeps all)")
        p.add_argument("--resume", action="store_true",
                       help="start from the newest complete checkpoint in --checkpoint-dir")

    p = sub.add_parser("scheduler", help="run the scheduler of a job")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=9090,
                   help="port to serve on; 0 picks a free port (default %(default)s)")
    p.add_argument("--num-servers", type=int, required=True,
                   help="servers the job has; it starts once all registered")
    p.add_argument("--num-workers", type=int, default=0,
                   help="workers the job expects (default: as the workers say)")
    heartbeat_flags(p)
    checkpoint_flags(p)
    sync_flags(p)
    federated_flags(p)
    p.add_argument("--recover", action="store_true",
                   help="continue a running job whose scheduler died, from the state kept in "
                        "--checkpoint-dir (servers and workers register again)")
    p.add_argument("--recover-if-present", action="store_true",
                   help="--recover when --checkpoint-dir holds a scheduler's state, else start "
                        "the job: for a supervisor that restarts the scheduler with the same "
                        "command (a Kubernetes Deployment)")
    p.add_argument("--ready-file",
                   help="write {address, pid} as JSON here once serving (default: none)")
    security_flags(p, serving=True)
    p.set_defaults(fn=_cmd_scheduler)

    p = sub.add_parser("server", help="run a parameter server")
    p.add_argument("--scheduler", required=True, metavar="HOST:PORT",
                   help="address of the job's scheduler")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="0 (default) picks a free port")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="address workers should use, if not host:port (default: host:port)")
    p.add_argument("--rank", type=int, default=-1,
                   help="rank to ask for (default -1: any free rank)")
    p.add_argument("--threads", type=int, default=16,
                   help="concurrent request handlers (default %(default)s)")
    p.add_argument("--apply-threads", type=int, default=2,
                   help="core threads used within one large request (default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the scheduler at start and on each control call "
                        "(default %(default)g)")
    p.add_argument("--replace", action="store_true",
                   help="take --rank over even if its holder still looks alive (a restart)")
    p.add_argument("--fault-drop-reply-every", type=int, default=0, metavar="N",
                   help="TESTING ONLY: drop the reply of every N-th applied write (default 0: "
                        "never)")
    p.add_argument("--max-memory", type=_size, default=0, metavar="SIZE",
                   help="memory budget for table values and optimizer state, e.g. 8G; requests "
                        "that would pass it are refused with RESOURCE_EXHAUSTED (default: none)")
    p.add_argument("--transport", choices=("auto", "grpc"), default="auto",
                   help="auto (default): accept shared memory from workers on this host; "
                        "grpc: gRPC only")
    p.add_argument("--ready-file",
                   help="write {address, rank, pid} as JSON here once serving (default: none)")
    security_flags(p, serving=True)
    p.set_defaults(fn=_cmd_server)

    p = sub.add_parser("launch", help="run a whole job on this machine or a Ray cluster",
                       usage="paramserver launch [options] [--ray [ADDRESS]] -- CMD [ARGS...]")
    p.add_argument("--num-servers", type=int, default=1,
                   help="parameter servers to start (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="copies of the worker command to start, ranks 0..N-1 (default "
                        "%(default)s)")
    p.add_argument("--host", default=None,
                   help="interface every node binds (default 127.0.0.1; not with --ray)")
    p.add_argument("--port", type=int, default=0, help="scheduler port (default: any free)")
    heartbeat_flags(p)
    p.add_argument("--startup-timeout", type=float, default=60.0,
                   help="seconds allowed for the scheduler and servers to start (default "
                        "%(default)g)")
    checkpoint_flags(p)
    sync_flags(p)
    federated_flags(p)
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="restart a scheduler, server or worker that dies, up to N times each "
                        "(servers restore from the newest checkpoint; default 0)")
    p.add_argument("--transport", choices=("auto", "grpc"), default="auto",
                   help="auto (default): workers send through shared memory to the servers on "
                        "this machine; grpc: gRPC only")
    security_flags(p, serving=True)
    ray = p.add_argument_group("Ray", "run the job on a Ray cluster (pip install "
                                      "\"paramserver[ray]\"); see docs/operations.md")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run the scheduler, servers and workers as actors on the Ray cluster "
                          "at ADDRESS (HOST:PORT of its head, or auto; none: "
                          "$RAY_ADDRESS or a new local Ray; default: not on Ray)")
    ray.add_argument("--ray-scheduler-cpus", type=float, default=0.0, metavar="N",
                     help="CPUs the scheduler asks for (default 0; it runs on this node)")
    ray.add_argument("--ray-scheduler-memory", type=_size, default=0, metavar="SIZE",
                     help="memory the scheduler asks for (default: none)")
    ray.add_argument("--ray-server-cpus", type=float, default=1.0, metavar="N",
                     help="CPUs of each server's placement-group bundle (default 1)")
    ray.add_argument("--ray-server-memory", type=_size, default=0, metavar="SIZE",
                     help="memory of each server's bundle, e.g. 8G (default: none)")
    ray.add_argument("--ray-server-resources", metavar="JSON",
                     help="custom resources of each server's bundle, e.g. '{\"ps\": 1}' "
                          "(default: none)")
    ray.add_argument("--ray-worker-cpus", type=float, default=1.0, metavar="N",
                     help="CPUs each worker asks for (default 1)")
    ray.add_argument("--ray-worker-memory", type=_size, default=0, metavar="SIZE",
                     help="memory each worker asks for (default: none)")
    ray.add_argument("--ray-worker-resources", metavar="JSON",
                     help="custom resources each worker asks for, e.g. '{\"GPU\": 1}' "
                          "(default: none)")
    ray.add_argument("--ray-placement-strategy", default="SPREAD",
                     choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                     help="how the servers' bundles are spread over nodes (default SPREAD)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the worker command, after --")
    p.set_defaults(fn=_cmd_launch)

    p = sub.add_parser("token", help="print the token of a role, derived from the job secret",
                       description="Print the token of ROLE in the job whose secret is in "
                                   "--job-secret-file: give it to that role's processes as "
                                   "PARAMSERVER_TOKEN or --token-file (docs/operations.md).")
    p.add_argument("--role", required=True, choices=("control", "worker", "participant",
                                                     "reader"),
                   help="the role whose token to print")
    p.add_argument("--job-secret-file", metavar="FILE",
                   help="file holding the job secret (default: the file named by "
                        "$PARAMSERVER_JOB_SECRET_FILE)")
    p.set_defaults(fn=_cmd_token)

    p = sub.add_parser("status", help="show the nodes, tables and traffic of a job")
    p.add_argument("--scheduler", required=True, metavar="HOST:PORT",
                   help="address of the job's scheduler")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the answer (default %(default)g)")
    security_flags(p, serving=False)
    p.set_defaults(fn=_cmd_status)

    p = sub.add_parser("checkpoint", help="take a checkpoint of a running job now")
    p.add_argument("--scheduler", required=True, metavar="HOST:PORT",
                   help="address of the job's scheduler")
    p.add_argument("--metadata", metavar="JSON",
                   help="a JSON object saved with the checkpoint (default: {})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the checkpoint may take (default %(default)g)")
    security_flags(p, serving=False)
    p.set_defaults(fn=_cmd_checkpoint)

    p = sub.add_parser("export", help="write a model file (safetensors) for serving")
    p.add_argument("--scheduler", metavar="HOST:PORT",
                   help="export a running job (default: none; give this or --checkpoint)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="export a checkpoint: its directory, or a checkpoint directory (newest)"
                        " (default: none; give this or --scheduler)")
    p.add_argument("--version", type=int,
                   help="with --checkpoint DIR: this version (default: the newest complete)")
    p.add_argument("--out", required=True, metavar="FILE", help="the safetensors file to write")
    p.add_argument("--with-optimizer-state", action="store_true",
                   help="include optimizer state (moments, step counts)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the export may take (default %(default)g)")
    security_flags(p, serving=False)
    p.set_defaults(fn=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``paramserver`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from paramserver.errors import ParamServerError

    try:
        return args.fn(args)
    except (ParamServerError, ValueError) as exc:
        print(f"paramserver {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
