"""paramserver.torch against torch itself: DistributedOptimizer against torch.optim on the same
model and data, Embedding / EmbeddingBag against nn.Embedding(sparse=True) with torch's optimizer,
prefetching, eval lookups, BatchNorm buffers, and BSP with torch models."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import paramserver as ps

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from paramserver.torch import DistributedOptimizer, Embedding, EmbeddingBag  # noqa: E402


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    model.frozen = nn.Linear(3, 3)  # not trained: stays local
    model.frozen.requires_grad_(False)
    model.unused = nn.Linear(3, 3)  # never in the graph: no gradient, no step (as torch)
    return model


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.frozen(model[2](model[1](model[0](x))))


def test_distributed_optimizer_equals_torch_adam(cluster):
    """One worker, ps.Adam through DistributedOptimizer, against torch.optim.Adam on the same
    model and data: parameters within 1e-6 over 50 steps. Frozen parameters get no table; a
    parameter without a gradient takes no step."""
    model, reference = _mlp(0), _mlp(0)
    with cluster.connect() as client:
        opt = DistributedOptimizer(client, model, ps.Adam(lr=1e-2, weight_decay=0.01))
        ref = torch.optim.Adam([p for p in reference.parameters() if p.requires_grad], lr=1e-2,
                               weight_decay=0.01)
        assert "frozen.weight" not in client.tables() and "0.weight" in client.tables()
        rng = torch.Generator().manual_seed(1)
        for _ in range(50):
            x = torch.randn(16, 12, generator=rng)
            y = torch.randint(0, 3, (16,), generator=rng)
            for m, o in ((model, opt), (reference, ref)):
                o.zero_grad()
                nn.functional.cross_entropy(_forward(m, x), y).backward()
                o.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        unused = client.table("unused.weight").pull()
        np.testing.assert_array_equal(unused, reference.unused.weight.detach().numpy())


def test_a_second_worker_starts_from_the_first_workers_values(cluster):
    """The tables take the creating worker's values; another worker's model is overwritten with
    them when its optimizer attaches."""
    with cluster.connect() as first, cluster.connect() as second:
        a, b = _mlp(0), _mlp(1)
        DistributedOptimizer(first, a, ps.SGD(lr=0.1))
        DistributedOptimizer(second, b, ps.SGD(lr=0.1))
        for p, q in zip(a.parameters(), b.parameters()):
            if p.requires_grad:
                assert torch.equal(p, q)


@pytest.mark.parametrize("bag", [False, True])
def test_embedding_equals_sparse_nn_embedding_with_torch_adagrad(cluster, bag):
    """Embedding (and EmbeddingBag, mean) with ps.Adagrad against nn.Embedding(sparse=True)
    (nn.EmbeddingBag) with torch.optim.Adagrad, ids with duplicates, 30 steps; the dense head is
    stepped by the same DistributedOptimizer. Rows within 1e-6; with prefetch every step is one
    request per server."""
    rows, dim = 50, 8
    with cluster.connect() as client:
        init = ps.init.normal(0.0, 0.1)
        layer = (EmbeddingBag(client, "emb", dim, ps.Adagrad(lr=0.1), init, seed=3, mode="mean")
                 if bag else Embedding(client, "emb", dim, ps.Adagrad(lr=0.1), init, seed=3))
        start = layer.table.pull(np.arange(rows, dtype=np.int64), create=False)
        torch.manual_seed(0)
        head, ref_head = nn.Linear(dim, 1), nn.Linear(dim, 1)
        ref_head.load_state_dict(head.state_dict())
        reference = (nn.EmbeddingBag(rows, dim, mode="mean", sparse=True) if bag
                     else nn.Embedding(rows, dim, sparse=True))
        with torch.no_grad():
            reference.weight.copy_(torch.from_numpy(start))
        model = nn.ModuleDict({"emb": layer, "head": head})
        opt = DistributedOptimizer(client, model, ps.SGD(lr=0.05))
        ref_opt = torch.optim.Adagrad(reference.parameters(), lr=0.1)
        ref_head_opt = torch.optim.SGD(ref_head.parameters(), lr=0.05)
        rng = np.random.default_rng(0)
        batches = [torch.from_numpy(rng.integers(0, rows // 2 + 10 * (s % 3), (16, 4)))
                   for s in range(31)]
        def requests() -> int:  # asked of every server now
            from paramserver.v1 import paramserver_pb2 as pb
            replies = [client._pool.call(r, "Stats", pb.StatsRequest(), "stats")
                       for r in range(client.num_servers)]
            return sum(s.push_requests + s.pull_requests for s in replies)

        for step in range(30):
            ids, target = batches[step], torch.ones(16)
            lookup = ids if bag else ids[:, 0]
            if step == 10:
                before = requests()
            out = layer(lookup)
            loss = ((head(out).squeeze(-1) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            layer.prefetch(batches[step + 1] if bag else batches[step + 1][:, 0])
            opt.step()
            ref_out = reference(lookup)
            ref_loss = ((ref_head(ref_out).squeeze(-1) - target) ** 2).mean()
            ref_opt.zero_grad()
            ref_head_opt.zero_grad()
            ref_loss.backward()
            with torch.sparse.check_sparse_tensor_invariants(enable=True):
                ref_opt.step()
            ref_head_opt.step()
        after = requests()
        got = layer.table.pull(np.arange(rows, dtype=np.int64), create=False)
        np.testing.assert_allclose(got, reference.weight.detach().numpy(), rtol=0, atol=1e-6)
        torch.testing.assert_close(head.weight, ref_head.weight, rtol=0, atol=1e-6)
        # Steps 10-29: one request per step to each server that holds a row or a head block.
        assert before + 20 <= after <= before + 20 * client.num_servers


def test_eval_mode_looks_up_without_creating_rows(cluster):
    with cluster.connect() as client:
        layer = Embedding(client, "items", 4, ps.Adagrad(lr=0.1), ps.init.normal(0.0, 1.0), seed=9)
        layer.eval()
        with torch.no_grad():
            first = layer(torch.tensor([5, 6, 5]))
        assert layer.table.num_rows() == 0
        layer.train()
        trained = layer(torch.tensor([5, 6]))
        torch.testing.assert_close(first[:2], trained.detach())  # the row it would be made with
        assert layer.table.num_rows() == 2


def test_batchnorm_buffers_follow_rank_0(cluster):
    """Float buffers (BatchNorm running statistics) are rank 0's: after rank 0's step and then
    rank 1's, rank 1's running mean and variance equal rank 0's; its batch counter stays its
    own."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))

    with cluster.connect(rank=0) as c0, cluster.connect(rank=1) as c1:
        m0, m1 = make(), make()
        o0 = DistributedOptimizer(c0, m0, ps.SGD(lr=0.1))
        o1 = DistributedOptimizer(c1, m1, ps.SGD(lr=0.1))
        for step in range(3):
            for model, opt, shift in ((m0, o0, 5.0), (m1, o1, -5.0)):
                x = torch.randn(8, 4) + shift
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
        torch.testing.assert_close(m1[1].running_mean, m0[1].running_mean)
        torch.testing.assert_close(m1[1].running_var, m0[1].running_var)
        assert int(m1[1].num_batches_tracked) == 3
        # With buffers="local" each keeps its own: a step on other data changes only its own.
        m2 = make()
        o2 = DistributedOptimizer(c1, m2, ps.SGD(lr=0.1), prefix="local/", buffers="local")
        o2.zero_grad()
        m2(torch.randn(8, 4) - 5.0).pow(2).mean().backward()
        o2.step()
        assert not torch.allclose(m2[1].running_mean, m0[1].running_mean)


def test_bsp_with_torch_models_equals_the_concatenated_batch(cluster_factory):
    """Two workers with DistributedOptimizer in a BSP job: each step equals one torch process on
    both batches with a mean loss (SGD with momentum), 20 steps."""
    cluster = cluster_factory(2, 2, scheduler_args=("--sync", "bsp"))
    torch.manual_seed(0)
    reference = nn.Linear(6, 2)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    data = [[(torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * s + k)),
              torch.randn(8, 2, generator=torch.Generator().manual_seed(100 * s + k + 50)))
             for k in range(2)] for s in range(20)]
    models: dict[int, nn.Module] = {}
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            with cluster.connect(rank=rank, num_workers=2) as client:
                model = nn.Linear(6, 2)
                model.load_state_dict(state)
                opt = DistributedOptimizer(client, model, ps.SGD(lr=0.1, momentum=0.9))
                client.barrier()
                for s in range(20):
                    x, y = data[s][rank]
                    opt.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
                models[rank] = model
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for s in range(20):
        x = torch.cat([data[s][0][0], data[s][1][0]])
        y = torch.cat([data[s][0][1], data[s][1][1]])
        ref_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
    for rank in (0, 1):
        torch.testing.assert_close(models[rank].weight, reference.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(models[rank].bias, reference.bias, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused(cluster):
    with cluster.connect() as client:
        with pytest.raises(ps.InvalidRequestError, match="float32"):
            DistributedOptimizer(client, nn.Linear(2, 2).double(), ps.SGD(lr=0.1))
        with pytest.raises(ps.InvalidRequestError, match="no trainable"):
            DistributedOptimizer(client, nn.Linear(2, 2).requires_grad_(False), ps.SGD(lr=0.1))
        layer = Embedding(client, "e", 4, ps.SGD(lr=0.1))
        with pytest.raises(ps.InvalidRequestError, match="int64"):
            layer(torch.tensor([1.0, 2.0]))
        bag = EmbeddingBag(client, "b", 4, ps.SGD(lr=0.1))
        with pytest.raises(ps.InvalidRequestError, match="bags"):
            bag(torch.tensor([1, 2, 3]))


def test_zero_grad_discards_row_gradients_as_torch_does(cluster):
    """forward/backward on batch A, zero_grad, forward/backward on batch B, step: as with
    nn.Embedding(sparse=True) and torch.optim, only B's rows are updated."""
    with cluster.connect() as client:
        layer = Embedding(client, "zg", 2, ps.SGD(lr=1.0))
        torch.manual_seed(0)
        head = nn.Linear(2, 1)
        opt = DistributedOptimizer(client, nn.ModuleDict({"e": layer, "h": head}),
                                   ps.SGD(lr=0.0))
        reference = nn.Embedding(4, 2, sparse=True)
        nn.init.zeros_(reference.weight)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=1.0)
        for emb, o in ((layer, opt), (reference, ref_opt)):
            o.zero_grad()
            head(emb(torch.tensor([1]))).sum().backward()  # batch A, discarded
            o.zero_grad()
            head(emb(torch.tensor([2, 2]))).sum().backward()
            o.step()
        got = layer.table.pull(np.arange(4, dtype=np.int64), create=False)
        np.testing.assert_allclose(got, reference.weight.detach().numpy(), rtol=0, atol=1e-6)
        assert got[1].tolist() == [0.0, 0.0]


def test_uint64_ids_name_the_tables_rows(cluster):
    """Hashed uint64 ids (numpy or torch) look up the rows the table gives those ids."""
    with cluster.connect() as client:
        layer = Embedding(client, "hashed", 3, ps.SGD(lr=0.1), ps.init.normal(0.0, 1.0), seed=2)
        ids = np.array([2**64 - 1, 2**63 + 5, 7, 2**63 + 5], dtype=np.uint64)
        expected = layer.table.pull(ids, create=False)
        for given in (ids, torch.from_numpy(ids)):
            with torch.no_grad():
                np.testing.assert_array_equal(layer(given).numpy(), expected)
