"""Transport benchmark: paramserver push / pull / push_pull beside raw TCP and a bare gRPC call.

Everything runs on this machine, in one run, so the peers share the noise of the paramserver
figures (measured during development: transport figures swing 25-40% on shared 2-core machines;
compare only within a run, and read medians).

What is measured, for tensors of 4 KB .. 64 MB:

* paramserver: ``push``, ``pull`` and ``push_pull`` of one dense float32 table (SGD, lr=1) from 1 and
  2 worker processes (each on its own table) against 1 and 2 server processes (a fresh job for each
  combination; the scheduler runs in this process, tensors never pass through it), on each
  transport: shared memory (``shm``) and gRPC (``grpc``).
* raw TCP (Python sockets, TCP_NODELAY, ``sendall``/``recv_into``): push = send N bytes, get a
  1-byte ack; pull = send a header, get N bytes; push_pull = send N, get N back.
* bare gRPC (grpcio, a generic unary handler on raw bytes, no protobuf, no tensor logic): push =
  N bytes in, empty reply; pull = 8 bytes in, N bytes out; push_pull = echo of N bytes. One unary
  message whatever N: this is the cost of a single gRPC call of that size.
* memcpy: one 16 MB (each size's) copy between two numpy arrays in the worker process, the floor
  of any transport that moves the bytes once.
* The parameter-server pattern (benchmarks/ps_pattern.py): 2 trainers, 16 MB gradient up and 16 MB
  weights down per round trip on one shared tensor, beside torch.distributed.rpc (TensorPipe), at
  steady state (a warm-up reported apart, then at least 10 s measured), on both transports.
* "10M float32 parameters": push and pull of 10M values (40 MB), 1 worker, 2 servers, next to
  dmlc/ps-lite's ``kv_app_benchmark`` figures. These are *quoted*, not run: constants measured
  on the same machine type during development (ps-lite could not be built where this benchmark
  runs), and labeled so in the output (``"ps_lite": {"quoted": true, ...}``).

Peers are measured from a worker process of the 1-worker jobs, interleaved size by size with the
paramserver ops, so each comparison is made under the same load.

GB/s is tensor bytes / wall time of one op (a push_pull moves the bytes both ways but counts them
once). With 2 workers, "aggregate" is all workers' bytes over the wall time from the first start to
the last end of the phase; "per_worker" is the median per-op rate of each worker.

Results are checked: every pull and push_pull must return exactly the values implied by the
gradients pushed so far (SGD lr=1 on small integers is exact), every peer reply must have the right
length (and the echo the right bytes). Every process started here is stopped on every path.

Usage::

    python benchmarks/bench_transport.py            # table
    python benchmarks/bench_transport.py --json     # one JSON object
    python benchmarks/bench_transport.py --quick --json   # smoke mode: small sizes, few reps
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ps_pattern  # noqa: E402
from local_cluster import LocalCluster, run_processes, stop_processes  # noqa: E402

KB, MB = 1024, 1024 * 1024
GB = 1e9  # GB = 10^9 bytes

FULL_SIZES = [4 * KB, 64 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB]
QUICK_SIZES = [4 * KB, 64 * KB, 1 * MB]
OPS = ("push", "pull", "push_pull")

#: dmlc/ps-lite kv_app_benchmark (C++, ZeroMQ; github.com/dmlc/ps-lite,
#: tests/test_kv_app_benchmark.cc), 10M keys + 10M float32 values, measured on the same machine
#: type during development, not in this run: 1 server, 1 worker: push 167-178 ms, pull 244-267
#: ms; 2 servers, 2 workers: push 167-183 ms, pull 255-267 ms.
PSLITE = {"quoted": True,
          "source": "dmlc/ps-lite tests/test_kv_app_benchmark.cc, 10M keys + 10M floats, measured "
                    "on the same machine type during development (quoted, not run here)",
          "push_ms": 170.0, "pull_ms": 255.0}
TEN_M = 10_000_000

#: The targets (checked here, never in tests).
TARGET_GBPS_16MB = 1.0          # gRPC, any 16 MB push or pull
TARGET_SHM_GBPS_16MB = 5.0      # shared memory, 16 MB push and pull
TARGET_GRPC_VS_BARE = 0.85      # gRPC: 16 MB push and pull vs one bare 16 MB gRPC message
TARGET_SMALL_RATIO = 1.2        # 4 KB push_pull vs a bare 4 KB gRPC echo
TARGET_PATTERN_SHM = 1.5        # PS pattern round trips/s vs torch.distributed.rpc
TARGET_PATTERN_GRPC = 0.4


def _reps(size: int, quick: bool) -> int:
    if quick:
        return 5 if size >= MB else 20
    if size <= 64 * KB:
        return 300
    if size <= MB:
        return 60
    if size <= 4 * MB:
        return 25
    if size <= 16 * MB:
        return 12
    return 6


def _warmup(size: int, quick: bool) -> int:
    return 2 if quick or size >= 16 * MB else 5


# --------------------------------------------------------------------------------------------
# Peers: raw TCP and bare gRPC servers (each in its own process)

_HDR = struct.Struct("<cQ")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _tcp_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 * MB + 16)
    view = memoryview(buf)
    hdr = bytearray(_HDR.size)
    out_cache: dict[int, bytes] = {}
    try:
        while True:
            try:
                _recv_exact(conn, memoryview(hdr))
            except ConnectionError:
                return
            op, n = _HDR.unpack(hdr)
            if op == b"P":  # push: N bytes in, 1 byte ack
                _recv_exact(conn, view[:n])
                conn.sendall(b"k")
            elif op == b"L":  # pull: N bytes out
                data = out_cache.get(n)
                if data is None:
                    data = out_cache[n] = bytes(n)
                conn.sendall(data)
            elif op == b"E":  # echo: N in, the same N out
                _recv_exact(conn, view[:n])
                conn.sendall(view[:n])
            else:
                return
    finally:
        conn.close()


def _tcp_server_main(port_queue: Any) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port_queue.put(("tcp", lsock.getsockname()[1]))
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_tcp_conn, args=(conn,), daemon=True).start()


def _grpc_server_main(port_queue: Any) -> None:
    from concurrent import futures

    import grpc

    from paramserver import rpc

    cache: dict[int, bytes] = {}

    def pull(request: bytes, context: Any) -> bytes:
        (n,) = struct.unpack("<Q", request)
        data = cache.get(n)
        if data is None:
            data = cache[n] = bytes(n)
        return data

    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        # No serializers: requests and replies are the raw bytes.
        "Push": grpc.unary_unary_rpc_method_handler(lambda request, context: b""),
        "Pull": grpc.unary_unary_rpc_method_handler(pull),
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    })
    # The same options (message limits) and thread pool shape as a paramserver server.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=rpc._OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_queue.put(("grpc", port))
    server.wait_for_termination()


class _TcpPeer:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(64 * MB)
        self.ack = bytearray(1)

    def op(self, op: str, payload: bytes) -> None:
        n = len(payload)
        s = self.sock
        if op == "push":
            s.sendall(_HDR.pack(b"P", n))
            s.sendall(payload)
            _recv_exact(s, memoryview(self.ack))
            if self.ack != b"k":
                raise AssertionError("raw TCP push: bad ack")
        elif op == "pull":
            s.sendall(_HDR.pack(b"L", n))
            _recv_exact(s, memoryview(self.buf)[:n])
        else:
            s.sendall(_HDR.pack(b"E", n))
            s.sendall(payload)
            _recv_exact(s, memoryview(self.buf)[:n])

    def check_echo(self, payload: bytes) -> None:
        if memoryview(self.buf)[:len(payload)] != payload:
            raise AssertionError("raw TCP echo returned other bytes")

    def close(self) -> None:
        self.sock.close()


class _GrpcPeer:
    def __init__(self, port: int) -> None:
        import grpc

        from paramserver import rpc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=rpc._OPTIONS)
        self.push = self.channel.unary_unary("/bench.Raw/Push")
        self.pull = self.channel.unary_unary("/bench.Raw/Pull")
        self.echo = self.channel.unary_unary("/bench.Raw/Echo")
        self.last = b""

    def op(self, op: str, payload: bytes) -> None:
        n = len(payload)
        if op == "push":
            self.last = self.push(payload, timeout=60)
            if self.last != b"":
                raise AssertionError("bare gRPC push: unexpected reply")
        elif op == "pull":
            self.last = self.pull(struct.pack("<Q", n), timeout=60)
            if len(self.last) != n:
                raise AssertionError(f"bare gRPC pull: {len(self.last)} bytes, expected {n}")
        else:
            self.last = self.echo(payload, timeout=60)
            if len(self.last) != n:
                raise AssertionError(f"bare gRPC echo: {len(self.last)} bytes, expected {n}")

    def check_echo(self, payload: bytes) -> None:
        if self.last != payload:
            raise AssertionError("bare gRPC echo returned other bytes")

    def close(self) -> None:
        self.channel.close()


# --------------------------------------------------------------------------------------------
# Worker process

def _gradient(n: int) -> Any:
    import numpy as np
    # Small integers: SGD(lr=1) keeps every value an exact integer, so checks can be exact.
    return ((np.arange(n, dtype=np.int64) % 5) - 2).astype(np.float32)


def _time_ops(fn: Any, reps: int, warmup: int, check: Any = None) -> list[float]:
    for _ in range(warmup):
        r = fn()
        if check is not None:
            check(r)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t0)
        if check is not None:
            check(r)
    return times


def _worker_main(args: dict[str, Any], rank: int, barrier: Any, results: Any) -> None:
    try:
        results.put(("ok", rank, _worker(args, rank, barrier)))
    except BaseException:  # report, so the orchestrator fails loudly instead of hanging
        try:
            barrier.abort()
        except Exception:
            pass
        results.put(("error", rank, traceback.format_exc()))


def _worker(args: dict[str, Any], rank: int, barrier: Any) -> dict[str, Any]:
    import numpy as np

    import paramserver as ps
    from paramserver import rpc

    rpc.tune_malloc()  # as `paramserver launch` does for its workers (the library does not)
    quick = args["quick"]
    extra = {"message_bytes": args["message_bytes"]} if args["message_bytes"] else {}
    out: dict[str, Any] = {"ps": {}, "raw_tcp": {}, "bare_grpc": {}, "memcpy": {},
                           "ten_m": None}
    peers = {}
    if args.get("peers"):
        peers = {"raw_tcp": _TcpPeer(args["peers"]["tcp"]),
                 "bare_grpc": _GrpcPeer(args["peers"]["grpc"])}
    with ps.connect(args["scheduler"], rank=rank, num_workers=args["workers"],
                    timeout=120.0, transport=args["transport"], **extra) as client:
        if client.transport() != args["transport"]:
            raise AssertionError(f"asked for {args['transport']}, the worker uses "
                                 f"{client.transport()}")
        for size in args["sizes"]:
            n = size // 4
            reps, warm = _reps(size, quick), _warmup(size, quick)
            grad = _gradient(n)
            table = client.dense(f"bench_{size}_w{rank}", (n,), ps.SGD(lr=1.0))
            pushes = [0]  # gradients applied so far: values == -pushes * grad

            def push() -> None:
                table.push(grad)
                pushes[0] += 1

            def push_pull() -> Any:
                out_values = table.push_pull(grad)
                pushes[0] += 1
                return out_values

            def check(values: Any) -> None:
                expected = -float(pushes[0]) * grad
                if values.dtype != np.float32 or not np.array_equal(values, expected):
                    bad = int(np.flatnonzero(values != expected)[0])
                    raise AssertionError(
                        f"{table.name}: pulled values differ from what was pushed (index {bad}: "
                        f"{values[bad]} != {expected[bad]} after {pushes[0]} pushes)")

            per_op = {}
            for op in OPS:
                fn, chk = {"push": (push, None), "pull": (table.pull, check),
                           "push_pull": (push_pull, check)}[op]
                barrier.wait()
                start = time.time()
                times = _time_ops(fn, reps, warm, chk)
                end = time.time()
                per_op[op] = {"times": times, "start": start, "end": end, "bytes": size}
            check(table.pull())  # pushes are applied: the final state is exact
            out["ps"][size] = per_op
            # Peers, interleaved with the paramserver ops of the same size.
            payload = grad.tobytes()
            for name, peer in peers.items():
                out[name][size] = {}
                for op in OPS:
                    chk = (lambda _r, p=peer: p.check_echo(payload)) if op == "push_pull" else None
                    times = _time_ops(lambda p=peer, o=op: p.op(o, payload), reps, warm, chk)
                    out[name][size][op] = {"times": times, "bytes": size}
            if peers:
                target = np.empty_like(grad)
                out["memcpy"][size] = _time_ops(lambda: np.copyto(target, grad), reps, warm)
                del target
            del grad
        if args.get("ten_m") and rank == 0:
            grad = _gradient(TEN_M)
            table = client.dense("bench_10M", (TEN_M,), ps.SGD(lr=1.0))
            reps = 3 if quick else 9
            push_t = _time_ops(lambda: table.push(grad), reps, 2)
            pull_t = _time_ops(table.pull, reps, 2)
            values = table.pull()
            if not np.array_equal(values, -float(reps + 2) * grad):
                raise AssertionError("bench_10M: pulled values differ from what was pushed")
            out["ten_m"] = {"push": push_t, "pull": pull_t}
    for peer in peers.values():
        peer.close()
    return out


# --------------------------------------------------------------------------------------------
# Orchestration

def _run_workers(ctx: Any, job: LocalCluster, num_workers: int, base: dict[str, Any],
                 timeout: float) -> list[dict[str, Any]]:
    barrier = ctx.Barrier(num_workers)

    def args_for(rank: int, results: Any) -> tuple[Any, ...]:
        args = dict(base, scheduler=job.address, workers=num_workers)
        if rank != 0:
            args.pop("peers", None)
        return args, rank, barrier, results

    return run_processes(ctx, _worker_main, args_for, num_workers, timeout)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _summary(times: list[float], size: int) -> dict[str, float]:
    med = _median(times)
    return {"ms": round(med * 1e3, 4), "gbps": round(size / med / GB, 4),
            "ms_p10": round(sorted(times)[len(times) // 10] * 1e3, 4), "reps": len(times)}


def _aggregate(per_worker: list[dict[str, Any]], size: int) -> dict[str, Any]:
    start = min(w["start"] for w in per_worker)
    end = max(w["end"] for w in per_worker)
    ops = sum(len(w["times"]) for w in per_worker)
    # The wall time of a phase includes the warm-up ops too; count them so GB/s is honest.
    total_ops = ops + sum(w["warmup"] for w in per_worker)
    return {"gbps": round(size * total_ops / (end - start) / GB, 4),
            "per_worker": [_summary(w["times"], size) for w in per_worker]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    sizes = args.sizes or (QUICK_SIZES if quick else FULL_SIZES)
    ctx = mp.get_context("spawn")
    peer_queue = ctx.Queue()
    peer_procs = [ctx.Process(target=_tcp_server_main, args=(peer_queue,), daemon=True),
                  ctx.Process(target=_grpc_server_main, args=(peer_queue,), daemon=True)]
    server_args = []
    if args.server_threads:
        server_args += ["--threads", str(args.server_threads)]
    if args.apply_threads:
        server_args += ["--apply-threads", str(args.apply_threads)]
    report: dict[str, Any] = {
        "units": {"gbps": "10^9 tensor bytes per second (a push_pull counts its bytes once)",
                  "ms": "median milliseconds per op"},
        "config": {"sizes": sizes, "quick": quick, "message_bytes": args.message_bytes or "default",
                   "servers": args.servers, "workers": args.workers, "cpus": os.cpu_count(),
                   "server_args": server_args},
        "paramserver": {t: {} for t in args.transports}, "raw_tcp": {}, "bare_grpc": {},
        "memcpy": {}, "ten_m_float32": None, "ps_pattern": None, "targets": {},
    }
    try:
        for p in peer_procs:
            p.start()
        peers = dict(peer_queue.get(timeout=60) for _ in peer_procs)
        for transport, num_servers, num_workers in [
                (t, s, w) for t in args.transports for s in args.servers for w in args.workers]:
            key = f"{num_servers}s{num_workers}w"
            # Peers once per job shape, in the first transport's jobs.
            first = transport == args.transports[0]
            base = {"sizes": sizes, "quick": quick, "message_bytes": args.message_bytes,
                    "transport": transport,
                    "peers": peers if num_workers == 1 and first else None,
                    "ten_m": num_servers == 2 and num_workers == 1 and not args.no_ten_m}
            job = LocalCluster(num_servers, num_workers, tuple(server_args))
            try:
                outs = _run_workers(ctx, job, num_workers, base, timeout=900)
            finally:
                job.stop()
            entry: dict[str, Any] = {}
            for size in sizes:
                entry[str(size)] = {}
                for op in OPS:
                    ws = [dict(o["ps"][size][op], warmup=_warmup(size, quick)) for o in outs]
                    if num_workers == 1:
                        entry[str(size)][op] = _summary(ws[0]["times"], size)
                    else:
                        entry[str(size)][op] = _aggregate(ws, size)
            report["paramserver"][transport][key] = entry
            if num_workers == 1 and first:
                for peer in ("raw_tcp", "bare_grpc"):
                    report[peer][key] = {
                        str(size): {op: _summary(outs[0][peer][size][op]["times"], size)
                                    for op in OPS} for size in sizes}
                report["memcpy"][key] = {str(size): _summary(outs[0]["memcpy"][size], size)
                                         for size in sizes}
            if outs[0]["ten_m"]:
                t = outs[0]["ten_m"]
                ten = report["ten_m_float32"] = report["ten_m_float32"] or {
                    "setup": "10M float32 (40 MB), 1 worker, 2 servers, SGD", "ps_lite": PSLITE}
                ten[transport] = {"push": _summary(t["push"], 4 * TEN_M),
                                  "pull": _summary(t["pull"], 4 * TEN_M)}
    finally:
        stop_processes(peer_procs)
    if args.pattern_seconds > 0:
        report["ps_pattern"] = ps_pattern.run(args.transports, args.pattern_warmup,
                                              args.pattern_seconds)
    report["targets"] = _targets(report)
    return report


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    big, small = str(16 * MB), str(4 * KB)
    for transport, jobs in report["paramserver"].items():
        for key in ("1s1w", "2s1w"):
            if key not in jobs or key not in report["bare_grpc"]:
                continue
            servers = key[0]
            if big in jobs[key]:
                for op in ("push", "pull"):
                    measured = jobs[key][big][op]["gbps"]
                    bare = report["bare_grpc"][key][big][op]["gbps"]
                    entry = {"measured_gbps": measured,
                             "peer_raw_tcp_gbps": report["raw_tcp"][key][big][op]["gbps"],
                             "peer_bare_grpc_gbps": bare,
                             "peer_memcpy_gbps": report["memcpy"][key][big]["gbps"]}
                    if transport == "shm":
                        targets[f"{op}_16MB_shm_{servers}server"] = dict(
                            what=f"16 MB {op} through shared memory, 1 worker, {servers} "
                                 f"server(s), GB/s >= {TARGET_SHM_GBPS_16MB}",
                            threshold_gbps=TARGET_SHM_GBPS_16MB, **entry,
                            met=measured >= TARGET_SHM_GBPS_16MB)
                    else:
                        targets[f"{op}_16MB_grpc_{servers}server"] = dict(
                            what=f"16 MB {op} on gRPC, 1 worker, {servers} server(s), GB/s >= "
                                 f"{TARGET_GBPS_16MB}", threshold_gbps=TARGET_GBPS_16MB, **entry,
                            met=measured >= TARGET_GBPS_16MB)
                        targets[f"{op}_16MB_grpc_vs_bare_grpc_{servers}server"] = dict(
                            what=f"16 MB {op} on gRPC >= {TARGET_GRPC_VS_BARE}x one bare 16 MB "
                                 f"gRPC message, {servers} server(s)",
                            ratio=round(measured / bare, 3), limit_ratio=TARGET_GRPC_VS_BARE,
                            **entry, met=measured >= TARGET_GRPC_VS_BARE * bare)
            if small in jobs[key]:
                measured = jobs[key][small]["push_pull"]["ms"]
                peer = report["bare_grpc"][key][small]["push_pull"]["ms"]
                targets[f"push_pull_4KB_{transport}_vs_bare_grpc_{servers}server"] = {
                    "what": f"4 KB push_pull ({transport}) <= {TARGET_SMALL_RATIO}x a bare gRPC "
                            f"echo of 4 KB, {servers} server(s)",
                    "measured_ms": measured, "peer": "bare gRPC unary echo, same run",
                    "peer_ms": peer, "ratio": round(measured / peer, 3),
                    "limit_ratio": TARGET_SMALL_RATIO,
                    "met": measured <= TARGET_SMALL_RATIO * peer}
    ten = report.get("ten_m_float32")
    if ten:
        for transport in report["paramserver"]:
            for op in ("push", "pull"):
                if transport not in ten:
                    continue
                measured = ten[transport][op]["ms"]
                targets[f"{op}_10M_float32_{transport}_vs_ps_lite"] = {
                    "what": f"{op} of 10M float32 (1 worker, 2 servers, {transport}) faster than "
                            f"ps-lite", "measured_ms": measured,
                    "peer": "dmlc/ps-lite kv_app_benchmark: QUOTED constant, not run here",
                    "peer_ms": PSLITE[f"{op}_ms"], "met": measured < PSLITE[f"{op}_ms"]}
    pattern = report.get("ps_pattern")
    if pattern and "round_trips_per_s" in pattern.get("torch_rpc", {}):
        peer = pattern["torch_rpc"]["round_trips_per_s"]
        for transport, goal in (("shm", TARGET_PATTERN_SHM), ("grpc", TARGET_PATTERN_GRPC)):
            if transport not in pattern["paramserver"]:
                continue
            measured = pattern["paramserver"][transport]["round_trips_per_s"]
            targets[f"ps_pattern_{transport}_vs_torch_rpc"] = {
                "what": f"2 trainers x 16 MB push_pull round trips/s ({transport}) >= {goal}x "
                        f"torch.distributed.rpc, steady state",
                "measured_round_trips_per_s": measured, "peer": "torch.distributed.rpc, same run",
                "peer_round_trips_per_s": peer, "ratio": round(measured / peer, 3),
                "goal_ratio": goal, "met": measured >= goal * peer}
    return targets


def _print_table(report: dict[str, Any]) -> None:
    for transport, key, entry in [(t, k, e) for t, jobs in report["paramserver"].items()
                                  for k, e in jobs.items()]:
        print(f"\n== paramserver {key} (servers s, workers w), {transport} ==")
        print(f"{'size':>8} {'op':>10} {'ms':>10} {'GB/s':>8}   "
              f"{'tcp ms':>9} {'tcp GB/s':>8}   {'grpc ms':>9} {'grpc GB/s':>9}")
        for size, ops in entry.items():
            for op, r in ops.items():
                gbps = r["gbps"]
                ms = r["ms"] if "ms" in r else _median([w["ms"] for w in r["per_worker"]])
                tcp = report["raw_tcp"].get(key, {}).get(size, {}).get(op)
                grpc_ = report["bare_grpc"].get(key, {}).get(size, {}).get(op)
                line = f"{_fmt_size(int(size)):>8} {op:>10} {ms:>10.3f} {gbps:>8.3f}"
                if tcp:
                    line += f"   {tcp['ms']:>9.3f} {tcp['gbps']:>8.3f}   {grpc_['ms']:>9.3f} " \
                            f"{grpc_['gbps']:>9.3f}"
                print(line + ("   (aggregate GB/s, per-worker median ms)" if "ms" not in r
                              else ""))
    for transport, t in (report["ten_m_float32"] or {}).items():
        if transport in report["paramserver"]:
            print(f"\n10M float32 ({transport}): push {t['push']['ms']:.1f} ms, pull "
                  f"{t['pull']['ms']:.1f} ms (ps-lite, quoted: push {PSLITE['push_ms']:.0f} ms, "
                  f"pull {PSLITE['pull_ms']:.0f} ms)")
    if report["ps_pattern"]:
        print(f"\nPS pattern: {json.dumps(report['ps_pattern'])}")
    print("\ntargets:")
    for name, t in report["targets"].items():
        shown = {k: v for k, v in t.items() if k not in ("what",)}
        print(f"  {'MET ' if t['met'] else 'MISS'} {name}: {shown}")


def _fmt_size(n: int) -> str:
    return f"{n // MB}M" if n >= MB else f"{n // KB}K"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smoke mode: small sizes, few reps")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="comma-separated tensor sizes in bytes (multiples of 4)")
    parser.add_argument("--servers", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2], help="server counts (default 1,2)")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2], help="worker counts (default 1,2)")
    parser.add_argument("--message-bytes", type=int, default=0,
                        help="client message_bytes (default: paramserver's default)")
    parser.add_argument("--server-threads", type=int, default=0)
    parser.add_argument("--apply-threads", type=int, default=0)
    parser.add_argument("--no-ten-m", action="store_true", help="skip the 10M float32 scenario")
    parser.add_argument("--transports", type=lambda s: s.split(","), default=["shm", "grpc"],
                        help="transports to measure (default shm,grpc)")
    parser.add_argument("--pattern-seconds", type=float, default=None,
                        help="measured seconds of the PS pattern vs torch.distributed.rpc "
                             "(default 10; 0 skips it; --quick: 0)")
    parser.add_argument("--pattern-warmup", type=float, default=6.0,
                        help="warm-up seconds of the PS pattern, reported apart (default 6)")
    args = parser.parse_args(argv)
    if args.sizes and any(s <= 0 or s % 4 for s in args.sizes):
        parser.error("sizes must be positive multiples of 4")
    if any(t not in ("shm", "grpc") for t in args.transports):
        parser.error("transports are shm and grpc")
    if args.pattern_seconds is None:
        args.pattern_seconds = 0.0 if args.quick else 10.0

    # SIGTERM / SIGHUP: unwind through the finally blocks so every child is stopped.
    def _raise(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    report = run(args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
