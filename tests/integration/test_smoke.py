"""A fast smoke run of every kind of traffic, for installs at the edges of the dependency window.

``.ci/compat`` runs this module in a virtualenv whose protobuf, grpcio and grpcio-health-checking
are exactly the minimums ``pyproject.toml`` declares (and the main suite runs it on the newest):
connect, push and pull of dense blocks on both servers and of embedding rows, a checkpoint and
its manifest read back, an export of the running job and of the checkpoint, and one federated
round. Integer values and SGD with lr=1, so every value is asserted exactly.
"""

from __future__ import annotations

import numpy as np

import paramserver as ps
from paramserver import checkpoint as ckpt
from paramserver.export import export_checkpoint, export_from_job
from paramserver.federated import Participant, selected
from tests.conftest import wait_for


def test_connect_push_pull_checkpoint_export(cluster_factory, tmp_path) -> None:
    """Dense blocks spread over both servers and embedding rows follow SGD(lr=1) exactly; a
    checkpoint holds those values and its metadata; both exports equal what workers pull."""
    cluster = cluster_factory(2, scheduler_args=("--checkpoint-dir", str(tmp_path / "ckpt")))
    with cluster.connect() as client:
        assert client.num_servers == 2
        w = client.dense("w", (6, 4), ps.SGD(lr=1.0), init=np.arange(24.0).reshape(6, 4),
                         block_size=4)  # 6 blocks, spread over both servers
        user = client.embedding("user", 3, ps.SGD(lr=1.0), init=ps.init.zeros())
        ids = np.array([7, 2**40, 3])
        grad = np.full((6, 4), 2.0, np.float32)
        w.push(grad)
        got = client.push_pull({"w": grad, "user": (ids, np.ones((3, 3), np.float32))})
        expected_w = np.arange(24.0).reshape(6, 4) - 4.0
        np.testing.assert_array_equal(got["w"], expected_w)
        np.testing.assert_array_equal(user.pull(ids), -np.ones((3, 3)))
        table = next(t for t in client.status()["tables"] if t["name"] == "w")
        assert table["blocks_per_server"] == [3, 3]

        info = client.checkpoint({"epoch": 3})
        assert info["version"] == 1
        manifest = ckpt.read_manifest(info["path"])
        assert manifest.version == 1 and manifest.metadata == {"epoch": 3}
        assert sorted(manifest.tables) == ["user", "w"]

        live = export_from_job(client, tmp_path / "live.safetensors")
        assert live["version"] == 2
    saved = export_checkpoint(manifest, tmp_path / "saved.safetensors")
    assert saved["version"] == 1
    for path in (tmp_path / "live.safetensors", tmp_path / "saved.safetensors"):
        model = ps.load_model(path)
        np.testing.assert_array_equal(model["w"], expected_w)
        order = np.argsort(model["user.ids"])
        np.testing.assert_array_equal(model["user.ids"][order], np.sort(ids).astype(np.uint64))
        np.testing.assert_array_equal(model["user.rows"][order], -np.ones((3, 3)))


def test_one_federated_round(cluster_factory) -> None:
    """Two participants submit; the round applies the example-weighted mean of their models
    (FedAvg: server SGD with lr=1), exactly."""
    cluster = cluster_factory(2, scheduler_args=(
        "--federated", "--clients-per-round", "2", "--min-updates", "2", "--rounds", "1",
        "--round-timeout", "60"))
    with cluster.connect() as client:
        init = np.arange(12.0, dtype=np.float32).reshape(3, 4)
        client.dense("w", (3, 4), ps.SGD(lr=1.0), init=init, block_size=4)
        parts = [Participant(client, ["w"], name=f"site-{i}") for i in range(2)]
        chosen = selected(parts, timeout=20)
        assert sorted(p.name for p in chosen) == ["site-0", "site-1"]
        for p in chosen:
            model = p.fetch(timeout=20)
            assert (model.round, model.version) == (1, 0)
            np.testing.assert_array_equal(model.values["w"], init)
            step, examples = (1.0, 1) if p.name == "site-0" else (4.0, 2)
            p.submit({"w": model.values["w"] + step}, num_examples=examples)
        wait_for(lambda: ps.federated.status(client)["version"] >= 1, 20, "round 1 to be applied")
        np.testing.assert_array_equal(client.pull(["w"])["w"], init + 3.0)  # (1*1 + 4*2) / 3
        assert ps.federated.status(client)["rounds_applied"] == 1
