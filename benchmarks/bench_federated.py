"""Federated learning: paramserver's federated mode beside Flower (``flwr``), in the same run.

Both run the task of ``examples/federated.py``: Fashion-MNIST split non-IID over 10 participants
(2 classes each), the same MLP, initial model, local training (E epochs of SGD, the same seeds
per participant and round), 5 participants per round and the same number of rounds, with FedAvg
and FedAdam as the server optimizer. On both sides the participants are hosted by 2 processes
(5 each; Flower: 5 ``start_client`` threads per process, paramserver: 5 participants per worker,
trained one after the other), and the global model is evaluated on the test set after every round.

- paramserver: ``paramserver launch --federated`` (scheduler, 2 servers, 3 workers) running
  ``examples/federated.py --eval-every-round``: 2 workers host the participants, the third
  evaluates every model version as it appears (as Flower's server does); a round's time is
  between the appearances of successive model versions.
- Flower: ``flwr.server.start_server`` with ``FedAvg`` / ``FedAdam`` (``fraction_fit`` 0.5 of 10
  clients, central evaluation through ``evaluate_fn``) in this process, and the client processes
  with ``flwr.client.start_client``; a round's time is between successive ``evaluate_fn`` calls.
  By default Flower selects with paramserver's rule (a ClientManager written here), so both train
  the same participants every round and the accuracy curves compare the systems, not two
  selection policies (``--flower-selection random``: Flower's uniform sampling).

Rounds per second are taken over rounds 2..R (round 1 includes connecting). A second comparison
runs both with no local training (0 epochs) and no evaluation, to show what each system itself
costs per round. Note the two FedAdam
variants differ: paramserver's is the paper's (no bias correction), Flower's scales eta by Adam's
bias correction.

Prints a table on stderr and, with ``--json``, one JSON object on stdout ending in ``"targets"``:
the last round's accuracy within 1 point of Flower's, and >= 1.5x Flower's rounds per second,
for each server optimizer. ``--png`` draws accuracy against round for all four runs.

Needs ``pip install flwr matplotlib`` in paramserver's environment (not in the package's extras;
pip resolves Flower's protobuf and gRPC pins and paramserver's together: see "Dependency window"
in the README; ``.ci/compat flower`` runs this benchmark that way with ``--rounds 2``) and
Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``).

    python benchmarks/bench_federated.py --json --png docs/federated_accuracy.png
    python benchmarks/bench_federated.py --rounds 20 --json     # shorter
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per process on both sides

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import federated as task  # noqa: E402

HOSTS = 2
PER_ROUND = 5
ACCURACY_POINTS = 0.01
SPEEDUP = 1.5


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rate(per_round: list[dict]) -> dict[str, Any]:
    """Rounds per second from the first round seen to the last, and the median round time, from
    the times the rounds' models appeared."""
    seen = sorted(per_round, key=lambda r: r["round"])
    times = [r["at"] for r in seen]
    gaps = np.diff(times) / np.diff([r["round"] for r in seen])
    return {"rounds_per_s": round((seen[-1]["round"] - seen[0]["round"]) /
                                  (times[-1] - times[0]), 3),
            "round_s_median": round(float(np.median(gaps)), 4),
            "round_s": [round(float(g), 4) for g in gaps]}


# -- paramserver ----------------------------------------------------------------------------------

def run_paramserver(opt: str, rounds: int, epochs: int, accuracy: bool = True) -> dict[str, Any]:
    """The example under ``paramserver launch --federated``; accuracy and time of every round
    (``accuracy=False``: times only)."""
    cmd = [sys.executable, "-m", "paramserver", "launch", "--num-servers", "2",
           "--num-workers", str(HOSTS + 1), "--federated", "--clients-per-round", str(PER_ROUND),
           "--min-updates", str(PER_ROUND), "--min-participants", str(task.PARTICIPANTS),
           "--rounds", str(rounds), "--round-timeout", "300",
           "--", sys.executable, str(EXAMPLES / "federated.py"), "--eval-every-round",
           "--server-opt", opt, "--local-epochs", str(epochs), "--target-accuracy", "0"] \
        + ([] if accuracy else ["--times-only"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + 30 * rounds * epochs,
                          stdin=subprocess.DEVNULL)
    lines = [line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines() if "RESULT {" in line]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"paramserver run failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    result = json.loads(lines[0])
    per_round = [{"round": r["round"], "accuracy": r.get("accuracy"), "at": r["applied_at"]}
                 for r in result["per_round"]]
    if accuracy and [r["round"] for r in per_round] != list(range(1, rounds + 1)):
        # the evaluator reads the newest version: rounds faster than an evaluation are skipped
        raise RuntimeError(f"paramserver: rounds evaluated {[r['round'] for r in per_round]}")
    return {"accuracy": [r["accuracy"] for r in per_round], **_rate(per_round)}


# -- Flower ---------------------------------------------------------------------------------------

def _flower_host(address: str, ids: list[int], epochs: int) -> None:
    """One client process: a Flower client per participant, each on its own thread."""
    import flwr as fl

    data = task.load("fashion-mnist")
    shards = task.split_non_iid(data.y_train)
    names = sorted(task.initial_model())

    class Participant(fl.client.NumPyClient):
        def __init__(self, i: int) -> None:
            self.i = i

        def get_properties(self, config):  # noqa: ANN001 (Flower's signature)
            return {"participant": self.i}

        def fit(self, parameters, config):  # noqa: ANN001 (Flower's signature)
            params = {n: np.asarray(p, dtype=np.float32) for n, p in zip(names, parameters)}
            idx = shards[self.i]
            new = task.local_train(params, data.x_train[idx], data.y_train[idx], epochs,
                                   500, 0.1, seed=1000 * int(config["round"]) + self.i)
            return [new[n] for n in names], len(idx), {}

    threads = [threading.Thread(target=fl.client.start_client, kwargs={
        "server_address": address, "client": Participant(i).to_client(), "insecure": True,
        "transport": "grpc-bidi"}) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _fair_client_manager(seed: int):
    """A Flower ClientManager that selects as paramserver's scheduler does (paramserver.rounds):
    the least often selected first, spread over the host processes, ties broken by
    ``random.Random(seed)`` over the participants in name order. With every participant
    connected before round 1 (Flower's min_available_clients, paramserver's
    --min-participants), both select the same participants every round."""
    import random

    from flwr.common import GetPropertiesIns
    from flwr.server.client_manager import SimpleClientManager

    class FairClientManager(SimpleClientManager):
        def __init__(self) -> None:
            super().__init__()
            self.rng = random.Random(seed)
            self.index: dict[str, int] = {}
            self.selections: dict[int, int] = {}

        def sample(self, num_clients, min_num_clients=None, criterion=None):  # noqa: ANN001
            self.wait_for(min_num_clients or num_clients)
            clients = self.all()
            for cid, proxy in clients.items():
                if cid not in self.index:
                    reply = proxy.get_properties(GetPropertiesIns(config={}), timeout=60,
                                                 group_id=None)
                    self.index[cid] = int(reply.properties["participant"])
            by_name = sorted(clients, key=lambda cid: f"participant-{self.index[cid]}")
            order = list(by_name)
            self.rng.shuffle(order)
            order.sort(key=lambda cid: self.selections.get(self.index[cid], 0))
            chosen: list[str] = []
            per_host: dict[int, int] = {}
            while order and len(chosen) < num_clients:
                level = self.selections.get(self.index[order[0]], 0)
                tier = [c for c in order if self.selections.get(self.index[c], 0) == level]
                pick = min(tier, key=lambda c: per_host.get(self.index[c] % HOSTS, 0))
                chosen.append(pick)
                per_host[self.index[pick] % HOSTS] = per_host.get(self.index[pick] % HOSTS, 0) + 1
                order.remove(pick)
            for cid in chosen:
                self.selections[self.index[cid]] = self.selections.get(self.index[cid], 0) + 1
            return [clients[cid] for cid in chosen]

    return FairClientManager()


def run_flower(opt: str, rounds: int, epochs: int, selection: str = "fair",
               accuracy: bool = True) -> dict[str, Any]:
    """Flower's server here and 2 client processes; accuracy and time of every round."""
    import flwr as fl
    from flwr.server.strategy import FedAdam, FedAvg

    data = task.load("fashion-mnist")
    names = sorted(task.initial_model())
    init = task.initial_model(0)
    per_round: list[dict] = []

    def evaluate(server_round: int, parameters, config):  # noqa: ANN001
        at = time.time()
        if server_round == 0:
            return None
        if not accuracy:  # times only
            per_round.append({"round": server_round, "accuracy": None, "at": at})
            return None
        params = {n: np.asarray(p, dtype=np.float32) for n, p in zip(names, parameters)}
        acc, loss = task.evaluate(params, data.x_test, data.y_test)
        per_round.append({"round": server_round, "accuracy": round(acc, 4), "at": at})
        return loss, {"accuracy": acc}

    common = {"fraction_fit": PER_ROUND / task.PARTICIPANTS, "min_fit_clients": PER_ROUND,
              "min_available_clients": task.PARTICIPANTS, "fraction_evaluate": 0.0,
              "min_evaluate_clients": 0, "evaluate_fn": evaluate,
              "on_fit_config_fn": lambda rnd: {"round": rnd},
              "initial_parameters": fl.common.ndarrays_to_parameters([init[n] for n in names])}
    if opt == "fedavg":
        strategy = FedAvg(**common)
    else:
        strategy = FedAdam(eta=0.01, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, **common)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    hosts = [ctx.Process(target=_flower_host, args=(address, list(range(h, task.PARTICIPANTS,
                                                                         HOSTS)), epochs))
             for h in range(HOSTS)]
    for p in hosts:
        p.start()
    try:
        fl.server.start_server(server_address=address,
                               config=fl.server.ServerConfig(num_rounds=rounds),
                               strategy=strategy,
                               client_manager=_fair_client_manager(0) if selection == "fair"
                               else None)
    finally:
        for p in hosts:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(10)
    if [r["round"] for r in per_round] != list(range(1, rounds + 1)):
        raise RuntimeError(f"flower: rounds seen {[r['round'] for r in per_round]}")
    return {"accuracy": [r["accuracy"] for r in per_round], **_rate(per_round)}


# -- report ---------------------------------------------------------------------------------------

def _targets(report: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for opt in report["runs"]:
        ours, peer = report["runs"][opt]["paramserver"], report["runs"][opt]["flower"]
        diff = round(ours["accuracy"][-1] - peer["accuracy"][-1], 4)
        targets[f"{opt}_accuracy_last_round"] = {
            "what": f"{opt}: test accuracy at round {report['rounds']} within "
                    f"{ACCURACY_POINTS * 100:g} point of Flower's",
            "paramserver": ours["accuracy"][-1], "flower": peer["accuracy"][-1],
            "difference": diff, "goal": f"|difference| <= {ACCURACY_POINTS}",
            "met": abs(diff) <= ACCURACY_POINTS}
        ratio = round(ours["rounds_per_s"] / peer["rounds_per_s"], 3)
        targets[f"{opt}_rounds_per_s"] = {
            "what": f"{opt}: rounds per second >= {SPEEDUP}x Flower's",
            "paramserver": ours["rounds_per_s"], "flower": peer["rounds_per_s"],
            "ratio": ratio, "goal": f">= {SPEEDUP}", "met": ratio >= SPEEDUP}
    proto = report.get("protocol_only")
    if proto:
        ratio = round(proto["paramserver"]["rounds_per_s"] / proto["flower"]["rounds_per_s"], 3)
        targets["protocol_only_rounds_per_s"] = {
            "what": f"same as above without local training (what each system costs a round), "
                    f">= {SPEEDUP}x Flower's (not the issue's target: informative)",
            "paramserver": proto["paramserver"]["rounds_per_s"],
            "flower": proto["flower"]["rounds_per_s"], "ratio": ratio, "goal": f">= {SPEEDUP}",
            "met": ratio >= SPEEDUP}
    reached = [opt for opt in report["runs"]
               if report["runs"][opt]["paramserver"]["accuracy"][-1] >= 0.80]
    targets["example_reaches_80"] = {
        "what": "paramserver's final test accuracy >= 0.80 (the example's target)",
        "reached_by": reached, "goal": ">= 0.80 with at least one server optimizer",
        "met": bool(reached)}
    return targets


def _plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    styles = {"paramserver": "-", "flower": "--"}
    for opt, runs in report["runs"].items():
        for system, run in runs.items():
            ax.plot(range(1, len(run["accuracy"]) + 1), run["accuracy"], styles[system],
                    label=f"{system} {opt} ({run['rounds_per_s']:.2f} rounds/s)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Fashion-MNIST, non-IID (2 classes/participant), {PER_ROUND} of "
                 f"{task.PARTICIPANTS} per round, E={report['local_epochs']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--optimizers", default="fedavg,fedadam")
    p.add_argument("--protocol-rounds", type=int, default=30,
                   help="rounds of the protocol-only comparison (no local training; 0: skip)")
    p.add_argument("--flower-selection", choices=("fair", "random"), default="fair",
                   help="Flower's participant selection: paramserver's rule (default, so both "
                        "train the same participants every round) or Flower's own uniform "
                        "sampling")
    p.add_argument("--png", help="write the accuracy-per-round plot here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        task.load("fashion-mnist")
    except task.DatasetUnavailable as exc:
        _log(str(exc))
        return task.EXIT_NO_DATA
    report: dict[str, Any] = {"rounds": args.rounds, "local_epochs": args.local_epochs,
                              "flower_selection": args.flower_selection,
                              "participants": task.PARTICIPANTS, "per_round": PER_ROUND,
                              "hosts": HOSTS, "runs": {}}
    for opt in args.optimizers.split(","):
        ours = run_paramserver(opt, args.rounds, args.local_epochs)
        _log(f"paramserver {opt}: last accuracy {ours['accuracy'][-1]:.4f}, "
             f"{ours['rounds_per_s']:.2f} rounds/s")
        peer = run_flower(opt, args.rounds, args.local_epochs, args.flower_selection)
        _log(f"flower      {opt}: last accuracy {peer['accuracy'][-1]:.4f}, "
             f"{peer['rounds_per_s']:.2f} rounds/s")
        report["runs"][opt] = {"paramserver": ours, "flower": peer}
    if args.protocol_rounds:
        # The same jobs with no local training (0 epochs): what each system itself costs a round.
        ours = run_paramserver("fedavg", args.protocol_rounds, 0, accuracy=False)
        peer = run_flower("fedavg", args.protocol_rounds, 0, args.flower_selection,
                          accuracy=False)
        report["protocol_only"] = {
            "what": "fedavg, 0 local epochs and no evaluation (the round protocol: "
                    "selection, transfer, aggregation)",
            "rounds": args.protocol_rounds,
            "paramserver": {k: ours[k] for k in ("rounds_per_s", "round_s_median")},
            "flower": {k: peer[k] for k in ("rounds_per_s", "round_s_median")}}
        _log(f"protocol only: paramserver {ours['rounds_per_s']:.2f} rounds/s, flower "
             f"{peer['rounds_per_s']:.2f} rounds/s")
    if args.png:
        _plot(report, args.png)
        report["png"] = args.png
    report["targets"] = _targets(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
