"""PyTorch integration: a distributed optimizer for a model's parameters, and embedding layers
backed by the parameter servers. Needs torch (``pip install "paramserver[torch]"``); importing
``paramserver`` alone never imports torch.

Dense parameters::

    client = ps.connect()
    model = Net()
    opt = DistributedOptimizer(client, model, optimizer=ps.Adam(lr=1e-3))
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()          # one round trip: every gradient out, the new values into the model

Embeddings: an :class:`Embedding` (or :class:`EmbeddingBag`) in the model holds no weights; its
``forward`` pulls the batch's distinct rows (one call) and returns a tensor autograd tracks. The
optimizer's ``step`` pushes the rows' gradients in the same round trip as the dense ones, and
pulls the rows of the next batch if the loop announced them with :meth:`Embedding.prefetch`, so a
step costs one round trip per server.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from paramserver.client import Client
from paramserver.errors import InvalidRequestError, ParamServerError
from paramserver.optim import SGD, Optimizer

__all__ = ["DistributedOptimizer", "Embedding", "EmbeddingBag"]


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy view of a CPU tensor (a copy only if it is not contiguous float32)."""
    if tensor.device.type != "cpu":
        raise InvalidRequestError(f"paramserver.torch works on CPU tensors, got one on "
                                  f"{tensor.device}")
    t = tensor.detach()
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(torch.float32).contiguous()
    return t.numpy()


def _ids(ids: torch.Tensor | np.ndarray) -> tuple[np.ndarray, torch.Tensor, tuple[int, ...]]:
    """The distinct ids (int64 numpy), each position's index among them, and the ids' shape.
    uint64 ids (hashed features; the tables take them) are read as the int64 of the same bits,
    the row the tables give that int64."""
    if isinstance(ids, np.ndarray) and ids.dtype == np.uint64:
        ids = ids.view(np.int64)
    tensor = torch.as_tensor(ids)
    if tensor.dtype == torch.uint64:
        tensor = tensor.view(torch.int64)
    if tensor.dtype not in (torch.int64, torch.int32):
        raise InvalidRequestError(f"embedding ids must be an int64 (or int32, uint64) tensor, "
                                  f"got {tensor.dtype}")
    flat = tensor.reshape(-1).to(torch.int64)
    unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    return unique.numpy(), inverse, tuple(tensor.shape)


class Embedding(nn.Module):
    """An embedding table on the parameter servers, as a layer: ``forward(ids)`` returns the rows
    of ``ids`` (any shape) as a ``(*ids.shape, dim)`` float32 tensor that autograd tracks.

    The rows are pulled once per distinct id in the batch (created on first touch with the
    table's initializer; in ``eval()`` mode with read-only lookups that never create rows). Their
    gradients (duplicates summed) are pushed by :meth:`DistributedOptimizer.step`, or by
    :meth:`step` when no DistributedOptimizer drives this layer.

    Args:
        client: the worker's :class:`paramserver.Client`.
        name: the table's name in the job.
        dim: floats per row.
        optimizer: the update the servers apply to each pushed row (e.g. ``ps.Adagrad()``).
        init: a ``paramserver.init`` initializer for new rows (default zeros).
        seed: initializer seed.
    """

    def __init__(self, client: Client, name: str, dim: int, optimizer: Optimizer,
                 init: Any = None, seed: int = 0) -> None:
        super().__init__()
        self.client = client
        self.table = client.embedding(name, dim, optimizer, init, seed=seed)
        self.name, self.dim = name, dim
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []
        self._next: np.ndarray | None = None       # ids announced for the next forward
        self._prefetched: tuple[np.ndarray, np.ndarray] | None = None

    def prefetch(self, ids: torch.Tensor | np.ndarray) -> None:
        """Announce the ids of the next ``forward``: the next optimizer step pulls their rows in
        its round trip (after its update), so that forward needs no call of its own."""
        self._next = _ids(ids)[0]

    def _rows(self, unique: np.ndarray) -> np.ndarray:
        if not self.training:
            return self.table.pull(unique, create=False)
        ready = self._prefetched
        self._prefetched = None
        if ready is not None and np.array_equal(ready[0], unique):
            return ready[1]
        return self.table.pull(unique)

    def _lookup(self, ids: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor,
                                                                 tuple[int, ...]]:
        unique, inverse, shape = _ids(ids)
        weight = torch.from_numpy(self._rows(unique))
        if self.training and torch.is_grad_enabled():
            weight.requires_grad_(True)
            self._pending.append((unique, weight))
        return weight, inverse, shape

    def forward(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The rows of ``ids`` (any shape): a ``(*ids.shape, dim)`` float32 tensor."""
        weight, inverse, shape = self._lookup(ids)
        return weight[inverse].reshape(*shape, self.dim)

    def gradients(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The ``(ids, row gradients)`` of every forward since the last step (duplicates are
        summed on the servers), and forget them; None when there are none."""
        ids, rows = [], []
        for unique, weight in self._pending:
            if weight.grad is not None:
                ids.append(unique)
                rows.append(_as_numpy(weight.grad))
        self._pending = []
        if not ids:
            return None
        if len(ids) == 1:
            return ids[0], rows[0]
        return np.concatenate(ids), np.concatenate(rows)

    def take_prefetch(self) -> np.ndarray | None:
        """The ids announced with :meth:`prefetch` (for the optimizer's step), and forget them."""
        ids, self._next = self._next, None
        return ids

    def store_prefetch(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows the optimizer's step pulled for the next forward."""
        self._prefetched = (ids, rows)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard the row gradients of the forwards since the last step, as ``zero_grad``
        discards a sparse ``nn.Embedding``'s: those rows are not pushed (a forward whose backward
        comes later still counts). :meth:`DistributedOptimizer.zero_grad` calls this; a parent
        module's ``zero_grad`` does not reach it."""
        for _, weight in self._pending:
            weight.grad = None
        super().zero_grad(set_to_none)

    def step(self) -> None:
        """Push this layer's row gradients (and pull announced rows) on its own: for a model
        whose dense parameters are not on the servers. Inside a :class:`DistributedOptimizer`,
        its ``step`` does this in the same round trip as the dense gradients."""
        grads = self.gradients()
        nxt = self.take_prefetch()
        pulled = self.client.push({self.name: grads} if grads else {},
                                  pull={self.name: nxt} if nxt is not None else None)
        if pulled and nxt is not None:
            self.store_prefetch(nxt, pulled[self.name])

    def extra_repr(self) -> str:
        """The table's name, width and optimizer, for ``repr(model)``."""
        return f"{self.name!r}, dim={self.dim}, optimizer={self.table.optimizer!r}"


class EmbeddingBag(Embedding):
    """A pooled :class:`Embedding` for multi-valued features, like ``nn.EmbeddingBag``:
    ``forward(ids)`` with ``ids`` of shape ``(bags, ids_per_bag)`` returns ``(bags, dim)``, the
    sum or mean (``mode``) of each bag's rows; or ``forward(ids, offsets)`` with 1-D ``ids`` and
    each bag's start in ``offsets`` (empty bags give zeros)."""

    def __init__(self, client: Client, name: str, dim: int, optimizer: Optimizer,
                 init: Any = None, seed: int = 0, mode: str = "mean") -> None:
        if mode not in ("sum", "mean"):
            raise InvalidRequestError(f"EmbeddingBag {name!r}: mode must be 'sum' or 'mean', "
                                      f"got {mode!r}")
        super().__init__(client, name, dim, optimizer, init, seed)
        self.mode = mode

    def forward(self, ids: torch.Tensor | np.ndarray,  # type: ignore[override]
                offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Each bag's pooled rows, ``(bags, dim)``: ids ``(bags, ids_per_bag)``, or 1-D ids
        with each bag's start in ``offsets``."""
        ids = torch.as_tensor(ids)
        if offsets is None and ids.dim() != 2:
            raise InvalidRequestError(f"EmbeddingBag {self.name!r}: ids of shape "
                                      f"{tuple(ids.shape)}: give (bags, ids_per_bag), or 1-D ids "
                                      f"with offsets")
        if offsets is not None and ids.dim() != 1:
            raise InvalidRequestError(f"EmbeddingBag {self.name!r}: with offsets, ids must be "
                                      f"1-D, got shape {tuple(ids.shape)}")
        weight, inverse, shape = self._lookup(ids)
        if offsets is None:
            offsets = torch.arange(0, inverse.numel(), max(1, shape[1]), dtype=torch.int64)
            if shape[1] == 0:
                offsets = torch.zeros(shape[0], dtype=torch.int64)
        return nn.functional.embedding_bag(inverse, weight, torch.as_tensor(offsets),
                                           mode=self.mode)

    def extra_repr(self) -> str:
        """As :meth:`Embedding.extra_repr`, with the pooling mode."""
        return super().extra_repr() + f", mode={self.mode!r}"


class DistributedOptimizer:
    """A model's parameters on the parameter servers, stepped by them.

    Declares one dense table per trainable parameter (named ``prefix + parameter name``; frozen
    parameters, ``requires_grad=False``, are skipped and stay local), with the model's current
    values as the initial ones (when several workers declare at once, one worker's values win),
    and copies the tables' values into the parameters, so every worker starts from the same
    model. One table per parameter keeps torch's per-parameter optimizer state and lets the
    servers split large tensors into blocks; a step still sends all tables in one message per
    server, so small parameters cost no extra round trips.

    ``step()`` pushes every gradient and the rows of the model's :class:`Embedding` layers in
    one ``push`` and writes the new values into the parameters in place (the reply is decoded
    straight into the parameters' memory). In a ``bsp`` or ``ssp:S`` job that push is one step.

    Buffers (BatchNorm's running statistics): with ``buffers="rank0"`` (default) rank 0's float
    buffers are the model's. Rank 0 writes them to the servers after each step, and the other
    workers copy them in after theirs (so their running statistics trail rank 0's by at most a
    step or two in an asynchronous job). Integer buffers (``num_batches_tracked``) stay local.
    ``buffers="local"``: every worker keeps its own.

    Args:
        client: the worker's :class:`paramserver.Client`.
        model: an ``nn.Module`` (its parameters, buffers and Embedding layers), or an iterable
            of ``(name, parameter)`` such as ``model.named_parameters()``.
        optimizer: the update the servers apply to every parameter (e.g. ``ps.Adam(lr=1e-3)``).
        prefix: prepended to every table name (several models in one job).
        buffers: ``"rank0"`` or ``"local"`` (see above; only with a module).
    """

    def __init__(self, client: Client, model: nn.Module | Iterable[tuple[str, nn.Parameter]],
                 optimizer: Optimizer, *, prefix: str = "", buffers: str = "rank0") -> None:
        if buffers not in ("rank0", "local"):
            raise InvalidRequestError(f"buffers must be 'rank0' or 'local', got {buffers!r}")
        self.client = client
        module = model if isinstance(model, nn.Module) else None
        named: Iterable[tuple[str, Any]] = (module.named_parameters() if module is not None
                                             else model)  # type: ignore[assignment]
        self.params: dict[str, torch.Tensor] = {}
        for name, param in named:
            if not isinstance(param, torch.Tensor):
                raise InvalidRequestError(f"parameter {name!r} is {type(param).__name__}, not a "
                                          f"tensor")
            if param.requires_grad:
                self.params[prefix + name] = param
        self.embeddings: list[Embedding] = (
            [m for m in module.modules() if isinstance(m, Embedding)] if module else [])
        if not self.params and not self.embeddings:
            raise InvalidRequestError("no trainable parameters and no Embedding layers")
        for name, param in self.params.items():
            if param.dtype != torch.float32 or param.device.type != "cpu":
                raise InvalidRequestError(f"parameter {name!r}: paramserver.torch needs float32 "
                                          f"CPU parameters, got {param.dtype} on {param.device}")
            if not param.is_contiguous():
                param.data = param.data.contiguous()
            client.dense(name, tuple(param.shape) or (1,), optimizer, _as_numpy(param).reshape(
                tuple(param.shape) or (1,)))
        self._views = {name: p.data.numpy().reshape(-1) for name, p in self.params.items()}
        if self.params:
            client.pull(list(self.params), out=self._views)
        # Float buffers published by rank 0 (BatchNorm statistics, ...).
        self._buffers: dict[str, torch.Tensor] = {}
        self._buffer_views: dict[str, np.ndarray] = {}
        if module is not None and buffers == "rank0":
            for name, buf in module.named_buffers():
                if buf.dtype == torch.float32 and buf.numel() and buf.is_contiguous():
                    self._buffers[f"{prefix}buffer:{name}"] = buf
            for name, buf in self._buffers.items():
                client.dense(name, (buf.numel(),), SGD(lr=0.0), _as_numpy(buf).reshape(-1))
            self._buffer_views = {name: buf.data.numpy().reshape(-1)
                                  for name, buf in self._buffers.items()}
            if self._buffers:
                if client.rank == 0:
                    self._publish_buffers()
                else:
                    self.refresh()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients, as ``torch.optim.Optimizer.zero_grad``, and the
        embedding layers' row gradients (see :meth:`Embedding.zero_grad`)."""
        for layer in self.embeddings:
            layer.zero_grad(set_to_none)
        for param in self.params.values():
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_()
                param.grad.zero_()

    def step(self) -> None:
        """Push every gradient (parameters without one are left out, as torch skips them) and
        the embedding layers' row gradients in one round trip; write the new values into the
        parameters in place and keep the prefetched rows of the next batch."""
        grads: dict[str, Any] = {}
        for name, param in self.params.items():
            if param.grad is not None:
                grads[name] = _as_numpy(param.grad).reshape(param.shape or (1,))
        pull: dict[str, Any] = dict.fromkeys(self.params)  # every value: others push too
        if self.client.rank != 0:
            pull.update(dict.fromkeys(self._buffers))  # rank 0's statistics, same round trip
        prefetch: dict[str, tuple[Embedding, np.ndarray]] = {}
        for layer in self.embeddings:
            rows = layer.gradients()
            if rows is not None:
                if layer.name in grads:
                    raise ParamServerError(f"table {layer.name!r} is both a parameter and an "
                                           f"embedding layer")
                grads[layer.name] = rows
            nxt = layer.take_prefetch()
            if nxt is not None:
                pull[layer.name] = nxt
                prefetch[layer.name] = (layer, nxt)
        if not grads and not pull:
            return
        if not prefetch and not any(layer.name in grads for layer in self.embeddings) \
                and set(grads) == set(self.params) and set(pull) == set(self.params):
            # Every parameter has a gradient and no rows travel: each message returns the
            # values of the blocks it updates (a push_pull), whatever the model's size.
            self.client.push_pull(grads, out=self._views)
            pulled: dict[str, np.ndarray] = {}
        else:
            pulled = self.client.push(grads, pull=pull, out={
                n: v for n, v in {**self._views, **self._buffer_views}.items()
                if n in pull}) or {}
        for name, (layer, ids) in prefetch.items():
            layer.store_prefetch(ids, pulled[name])
        if self._buffers and self.client.rank == 0:
            self._publish_buffers()

    def refresh(self) -> None:
        """Copy the servers' current values into the parameters (and, on workers other than
        rank 0, rank 0's buffers): e.g. before evaluating a model that other workers train."""
        names = list(self.params) + (list(self._buffers) if self.client.rank != 0 else [])
        if names:
            self.client.pull(names, out={n: v for n, v in {**self._views,
                                                           **self._buffer_views}.items()
                                         if n in names})

    def _publish_buffers(self) -> None:
        """Rank 0 writes its float buffers, all in one call."""
        self.client.assign({name: _as_numpy(buf).reshape(-1)
                            for name, buf in self._buffers.items()})

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The trainable parameters this optimizer steps: (table name, parameter)."""
        return iter(self.params.items())

    def __repr__(self) -> str:
        return (f"DistributedOptimizer({len(self.params)} parameters, "
                f"{len(self.embeddings)} embedding layers, {len(self._buffers)} buffers)")
