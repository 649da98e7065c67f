"""The parameter-server pattern, paramserver beside torch.distributed.rpc (used by
bench_transport.py).

Two trainer processes each send a 16 MB float32 gradient to one parameter server, which applies
it to one shared tensor (SGD, lr=1) and returns the 16 MB weights; round trips per second, summed
over the trainers. torch.distributed.rpc (TensorPipe) is what a PyTorch user would write for this:
``rpc_sync(ps, apply_and_get, (grad,))`` into a process that holds the tensor. paramserver does
``push_pull`` on a dense table of one server, over each transport.

Both run the same way: a warm-up phase (torch.rpc's first seconds run at a fraction of its steady
rate, so a short measurement misleads), reported on its own, then a measured phase of at least 10
s. Results are checked: the shared tensor must end at exactly minus the number of round trips
made (integer gradients, SGD lr=1: exact in float32).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any

from local_cluster import LocalCluster, run_processes

N = 4 * 1024 * 1024  # 16 MB of float32
TRAINERS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phases(step: Any, start_at: float, warmup: float, measure: float) -> dict[str, Any]:
    """Run ``step`` from ``start_at`` through the warm-up and the measured phase; the round
    trips and seconds of each."""
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    warm = 0
    while time.perf_counter() - t0 < warmup:
        step()
        warm += 1
    t1 = time.perf_counter()
    done = 0
    while time.perf_counter() - t1 < measure:
        step()
        done += 1
    t2 = time.perf_counter()
    return {"warmup_trips": warm, "warmup_s": t1 - t0, "trips": done, "seconds": t2 - t1}


# -- torch.distributed.rpc ------------------------------------------------------------------------

_PS_STATE: dict[str, Any] = {}


def _apply_and_get(grad: Any) -> Any:
    """On the parameter server: apply ``grad`` (SGD, lr=1) and return the weights."""
    with _PS_STATE["lock"]:
        _PS_STATE["weights"].sub_(grad)
        return _PS_STATE["weights"].clone()


def _torch_main(rank: int, port: int, start_at: float, warmup: float, measure: float,
                results: Any) -> None:
    try:
        import threading

        import torch
        import torch.distributed.rpc as rpc

        torch.set_num_threads(1)
        options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                                  num_worker_threads=8, rpc_timeout=120)
        name = "ps" if rank == 0 else f"trainer{rank}"
        if rank == 0:
            _PS_STATE["lock"] = threading.Lock()
            _PS_STATE["weights"] = torch.zeros(N)
        rpc.init_rpc(name, rank=rank, world_size=TRAINERS + 1, rpc_backend_options=options)
        out: dict[str, Any] = {}
        if rank != 0:
            grad = torch.ones(N)

            def step() -> None:
                weights = rpc.rpc_sync("ps", _apply_and_get, args=(grad,))
                if weights.numel() != N:
                    raise AssertionError("torch.rpc returned weights of the wrong size")

            out = _phases(step, start_at, warmup, measure)
        rpc.shutdown(graceful=True)
        if rank == 0:
            out = {"final": float(_PS_STATE["weights"][0])}
        results.put(("ok", rank, out))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


def run_torch_rpc(warmup: float, measure: float) -> dict[str, Any]:
    """The pattern through torch.distributed.rpc: rates, warm-up apart, checked."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    start_at = time.time() + 8.0  # time for the processes to import torch and meet

    def args_for(rank: int, results: Any) -> tuple[Any, ...]:
        return rank, port, start_at, warmup, measure, results

    outs = run_processes(ctx, _torch_main, args_for, TRAINERS + 1, timeout=warmup + measure + 120)
    trainers = outs[1:]
    total = sum(o["trips"] + o["warmup_trips"] for o in trainers)
    if outs[0]["final"] != -float(total):
        raise AssertionError(f"torch.rpc: the shared tensor is {outs[0]['final']}, expected "
                             f"{-float(total)} after {total} round trips")
    return _rates(trainers)


# -- paramserver ----------------------------------------------------------------------------------

def _ps_main(args: dict[str, Any], rank: int, results: Any) -> None:
    try:
        import numpy as np

        import paramserver as ps
        from paramserver import rpc

        rpc.tune_malloc()  # as `paramserver launch` does for its workers
        with ps.connect(args["scheduler"], rank=rank, num_workers=TRAINERS, timeout=120.0,
                        transport=args["transport"]) as client:
            table = client.dense("weights", (N,), ps.SGD(lr=1.0), init=np.zeros(N, np.float32))
            transport = client.transport()
            grad = np.ones(N, np.float32)
            out = np.empty(N, np.float32)

            def step() -> None:
                client.push_pull({"weights": grad}, out={"weights": out})

            result = _phases(step, args["start_at"], args["warmup"], args["measure"])
            result["transport"] = transport
            client.barrier("done", timeout=120)
            result["final"] = float(table.pull()[0])
        results.put(("ok", rank, result))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


def run_paramserver(transport: str, warmup: float, measure: float) -> dict[str, Any]:
    """The pattern through paramserver (1 server, 2 worker processes) on ``transport``."""
    ctx = mp.get_context("spawn")
    job = LocalCluster(1, TRAINERS)
    try:
        start_at = time.time() + 6.0

        def args_for(rank: int, results: Any) -> tuple[Any, ...]:
            return ({"scheduler": job.address, "transport": transport, "start_at": start_at,
                     "warmup": warmup, "measure": measure}, rank, results)

        outs = run_processes(ctx, _ps_main, args_for, TRAINERS, timeout=warmup + measure + 120)
    finally:
        job.stop()
    total = sum(o["trips"] + o["warmup_trips"] for o in outs)
    if any(o["final"] != -float(total) for o in outs):
        raise AssertionError(f"paramserver ({transport}): the table is {outs[0]['final']}, "
                             f"expected {-float(total)} after {total} round trips")
    if any(o["transport"] != transport for o in outs):
        raise AssertionError(f"asked for {transport}, the workers used "
                             f"{[o['transport'] for o in outs]}")
    return _rates(outs)


def _rates(trainers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "round_trips_per_s": round(sum(o["trips"] / o["seconds"] for o in trainers), 2),
        "per_trainer": [round(o["trips"] / o["seconds"], 2) for o in trainers],
        "measured_s": round(min(o["seconds"] for o in trainers), 2),
        "warmup_round_trips_per_s": round(sum(o["warmup_trips"] / o["warmup_s"]
                                              for o in trainers), 2),
        "warmup_s": round(min(o["warmup_s"] for o in trainers), 2),
    }


def run(transports: list[str], warmup: float, measure: float,
        torch_rpc: bool = True) -> dict[str, Any]:
    """Every side of the pattern, one after the other in this run."""
    report: dict[str, Any] = {
        "setup": f"{TRAINERS} trainer processes, 1 parameter server, 16 MB float32 gradient up "
                 f"and 16 MB weights down per round trip, one shared tensor (SGD lr=1)",
        "paramserver": {}}
    if torch_rpc:
        try:
            report["torch_rpc"] = run_torch_rpc(warmup, measure)
        except ImportError as exc:
            report["torch_rpc"] = {"error": f"torch not installed: {exc}"}
    for transport in transports:
        report["paramserver"][transport] = run_paramserver(transport, warmup, measure)
    return report


__all__ = ["run", "run_torch_rpc", "run_paramserver"]

if __name__ == "__main__":  # pragma: no cover - manual use
    import json
    import sys

    print(json.dumps(run(sys.argv[1:] or ["shm", "grpc"], 6.0, 10.0), indent=1))
    os._exit(0)
