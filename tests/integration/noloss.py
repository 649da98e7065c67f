"""The no-loss check shared by the multi-host tests (network namespaces, Ray): every worker pushes
integer gradients with SGD lr=1, so the final values are exact sums that can be recomputed here,
element for element, and any lost, doubled or misrouted update shows.

It is the check of ``test_concurrency.py`` (loopback), run wherever the nodes are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np

#: Table "a": 700 x 300 in blocks of 20,000 (11 blocks, spread over the servers); "b": 33.
SHAPE_A = (700, 300)
SHAPE_B = (33,)
STEPS = 25
INIT_A = 1000.0


def train(client, steps: int = STEPS, pause_at: int = -1,
          pause: Callable[[Any], None] | None = None) -> dict | None:
    """Run the pushes of ``client``'s rank (integer gradients in [-8, 8], seeded by the rank);
    after every worker's last push, rank 0 pulls both tables and returns :func:`digest` of
    them; other ranks return None. ``pause(client)`` is called before step ``pause_at``, once
    every worker has made the steps before it (after a barrier)."""
    import paramserver as ps

    opt = ps.SGD(lr=1.0)
    client.dense("a", shape=SHAPE_A, optimizer=opt,
                 init=np.full(SHAPE_A, INIT_A, np.float32), block_size=20000)
    client.dense("b", shape=SHAPE_B, optimizer=opt)
    client.barrier("noloss-start")
    rng = np.random.default_rng(client.rank)
    for step in range(steps):
        if step == pause_at and pause is not None:
            client.barrier("noloss-pause")
            pause(client)
        ga = rng.integers(-8, 9, size=SHAPE_A).astype(np.float32)
        gb = rng.integers(-8, 9, size=SHAPE_B).astype(np.float32)
        if step % 2:
            client.push({"a": ga, "b": gb})
        else:
            client.push_pull({"a": ga, "b": gb})
    client.barrier("noloss-end")
    if client.rank != 0:
        return None
    got = client.pull(["a", "b"])
    return digest(got["a"], got["b"], client.num_workers, steps)


#: Worker code for a process of its own (``python -c``): connects from the environment, runs
#: :func:`train` and prints rank 0's digest as one ``NOLOSS {json}`` line.
WORKER = r"""
import json, paramserver as ps
from tests.integration import noloss
with ps.connect(timeout=60) as client:
    result = noloss.train(client)
    if result is not None:
        servers = sorted(n["address"] for n in client.status()["nodes"] if n["role"] == "server")
        print("NOLOSS " + json.dumps(dict(result, servers=servers)), flush=True)
"""


def expected(num_workers: int, steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """The exact values of "a" and "b" after every worker's pushes (float64, then float32)."""
    a = np.full(SHAPE_A, INIT_A)
    b = np.zeros(SHAPE_B)
    for rank in range(num_workers):
        rng = np.random.default_rng(rank)
        for _ in range(steps):
            a -= rng.integers(-8, 9, size=SHAPE_A)
            b -= rng.integers(-8, 9, size=SHAPE_B)
    return a.astype(np.float32), b.astype(np.float32)


def digest(a: np.ndarray, b: np.ndarray, num_workers: int, steps: int = STEPS) -> dict:
    """What a test compares: sums and a SHA-256 of the float32 bytes of both tables, and how many
    updates and elements they hold."""
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    return {"workers": num_workers, "pushes": num_workers * steps,
            "elements": int(a.size + b.size),
            "sum_a": float(a.astype(np.float64).sum()), "sum_b": float(b.astype(np.float64).sum()),
            "sha256": hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest()}


def check(result: dict, num_workers: int, label: str) -> dict:
    """Assert that ``result`` (rank 0's digest) equals the exact expected values; print the
    figure line ``NO-LOSS label: ...`` and return the expected digest."""
    want = digest(*expected(num_workers), num_workers)
    got = {k: result[k] for k in want}
    assert got == want, f"{label}: values differ from the exact sums:\n got {got}\nwant {want}"
    print(f"NO-LOSS {label}: " + json.dumps(dict(want, exact=True)))
    return want
