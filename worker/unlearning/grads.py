"""Gradients of the main-task loss with ``torch.func`` (``functional_call`` + ``grad`` / ``vmap`` /
``jacrev``): per sample, per mini-batch, and per (partition, task) in one vectorised call.

All functions take the parameters by name (names of ``model.named_parameters()``); parameters not
named are read from the module as constants. The model is put in eval mode for the call (no
dropout; the SSD reference computes importances in eval mode) and its mode is restored after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from worker.unlearning.lora import joint_grads
from worker.unlearning.types import Batch, TaskSpec, concat_batches, main_task_loss, main_task_losses


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its mode restored after. A model whose root module is
    already in eval mode (``model.eval()`` sets every submodule) is left alone: switching a peft
    model's mode walks every submodule (≈ 0.7 ms here), which the unlearning loops would otherwise
    pay several times per step."""
    if not model.training:
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _params(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    all_params = dict(model.named_parameters())
    return {n: all_params[n].detach() for n in names}


def _forward(
    model: nn.Module, params: Mapping[str, Tensor], inputs: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    out = functional_call(model, dict(params), (dict(inputs),))
    return cast(dict[str, Tensor], out)


def batch_grad(
    model: nn.Module, names: Sequence[str], batch: Batch, tasks: Sequence[TaskSpec]
) -> dict[str, Tensor]:
    """Gradient of the batch's mean main-task loss (:func:`types.main_task_loss`)."""

    def loss(params: dict[str, Tensor]) -> Tensor:
        return main_task_loss(_forward(model, params, batch.inputs), batch.labels, tasks)

    with eval_mode(model):
        out = grad(loss)(_params(model, names))
    return cast(dict[str, Tensor], out)


def per_sample_grads(
    model: nn.Module,
    names: Sequence[str],
    batch: Batch,
    tasks: Sequence[TaskSpec],
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """``{name: [N, *shape]}``: the gradient of each sample's weighted main-task loss
    (:func:`types.main_task_losses`; 0 for a sample without supervision), via ``vmap(grad)``."""

    def one(params: dict[str, Tensor], inputs: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        outputs = _forward(model, params, {k: v.unsqueeze(0) for k, v in inputs.items()})
        return main_task_losses(outputs, {k: v.unsqueeze(0) for k, v in labels.items()}, tasks).sum()

    labels = {t.name: batch.labels[t.name] for t in tasks}
    with eval_mode(model):
        fn = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)
        out = fn(_params(model, names), batch.inputs, labels)
    return cast(dict[str, Tensor], out)


def task_loss_matrix(
    outputs: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    tasks: Sequence[TaskSpec],
    part: Tensor,
    num_parts: int,
    first_tasks: Sequence[TaskSpec] | None = None,
) -> Tensor:
    """``L[p, t] = Σ_{i∈p} w_t·ℓ_{i,t} / N_p`` with ``N_p`` the supervised (sample, task) pairs of
    partition ``p`` (rows ``part == p``), so that ``L[p].sum()`` is partition ``p``'s
    :func:`types.main_task_loss` (0 for an empty partition). ``first_tasks`` (the same tasks in
    the same order, other losses): partition 0's rows take their losses instead."""
    per_task = _weighted_losses(outputs, labels, tasks)  # [N, T]
    if first_tasks is not None:
        first = (part == 0)[:, None]
        per_task = torch.where(first, _weighted_losses(outputs, labels, first_tasks), per_task)
    supervised = torch.stack([t.supervised(labels[t.name]) for t in tasks], dim=-1).to(per_task.dtype)
    onehot = torch.nn.functional.one_hot(part, num_parts).to(per_task.dtype)  # [N, P]
    sums = onehot.T @ per_task  # [P, T]
    counts = (onehot.T @ supervised).sum(-1, keepdim=True)  # [P, 1]
    return sums / torch.clamp(counts, min=1.0)


def _weighted_losses(
    outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor], tasks: Sequence[TaskSpec]
) -> Tensor:
    return torch.stack([t.weight * t.per_sample_loss(outputs[t.name], labels[t.name]) for t in tasks], dim=-1)


def partition_task_grads(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Batch],
    tasks: Sequence[TaskSpec],
    *,
    backend: str = "autograd",
    forward: Callable[[dict[str, Tensor]], Mapping[str, Tensor]] | None = None,
    named: Mapping[str, Tensor] | None = None,
    first_tasks: Sequence[TaskSpec] | None = None,
) -> dict[str, Tensor]:
    """``{name: [P, T, *shape]}``: the gradient of each partition's loss restricted to each task
    (:func:`task_loss_matrix`), vectorised over the tasks. ``first_tasks``: the losses of the
    first partition (the forget set, ``ia.forget_loss``), the same tasks in the same order.

    Summing over ``T`` gives the gradient of the partition's mean main-task loss. Only the
    (partition, task) pairs with supervision are differentiated (the others are 0). ``backend``:
    ``"autograd"`` (default) = per partition, one forward on its rows and one backward per task
    through the kept graph (:func:`_partitionwise_vjp`); with an MLP view as ``forward`` one joint
    forward and one backward vmapped over the task one-hot cotangents (``is_grads_batched``; its
    per-call overhead dominates, not the backward work); ``"func"`` =
    ``torch.func.jacrev`` over ``functional_call``. Both compute the same vector–Jacobian
    products; the first avoids ``functional_call``'s per-call re-parametrisation (≈ 4× faster on
    the small models here).
    ``forward`` (autograd backend): a function computing ``model(x)`` from the same parameter
    tensors (``lora.fast_forward(model)``); ``named``: ``dict(model.named_parameters())`` if the
    caller has it (walking a peft model's modules costs ≈ 1 ms a call).
    """
    P, T = len(batches), len(tasks)
    present = [(p, b) for p, b in enumerate(batches) if len(b)]
    live_params = dict(named) if named is not None else dict(model.named_parameters())
    params = {n: live_params[n].detach() for n in names}
    out: dict[str, Tensor] = {
        n: torch.zeros((P * T, *v.shape), dtype=v.dtype, device=v.device) for n, v in params.items()
    }
    if not present:
        return {n: v.reshape(P, T, *v.shape[1:]) for n, v in out.items()}
    joined = concat_batches([b for _, b in present])
    part = torch.cat([torch.full((len(b),), p, dtype=torch.long, device=joined.device) for p, b in present])
    labels = {t.name: joined.labels[t.name] for t in tasks}
    supervised = torch.stack([t.supervised(labels[t.name]) for t in tasks], dim=-1).to(torch.float32)
    onehot = torch.nn.functional.one_hot(part, P).to(torch.float32)
    live = ((onehot.T @ supervised) > 0).reshape(-1)  # [P*T]
    index = live.nonzero(as_tuple=True)[0]
    k = int(index.numel())
    if k == 0:
        return {n: v.reshape(P, T, *v.shape[1:]) for n, v in out.items()}

    if backend == "func":

        def losses(prm: dict[str, Tensor]) -> Tensor:
            outputs = _forward(model, prm, joined.inputs)
            matrix = task_loss_matrix(outputs, labels, tasks, part, P, first_tasks)
            return matrix.reshape(-1)[index]

        with eval_mode(model):
            jac = cast(dict[str, Tensor], jacrev(losses)(params))
    elif backend == "autograd" and forward is not None and joint_grads(forward, model):
        # the MLP view (``lora.fast_forward``): so cheap per row that the per-partition calls'
        # overhead outweighs the backward work they save (digits: 0.40 → 0.54 s CPU a request)
        tensors = [live_params[n] for n in names]
        with eval_mode(model), torch.enable_grad():
            outputs = forward(joined.inputs)
            matrix = task_loss_matrix(outputs, labels, tasks, part, P, first_tasks)
            selected = matrix.reshape(-1)[index]
            cotangents = torch.eye(k, dtype=selected.dtype, device=selected.device)
            grads = torch.autograd.grad(
                selected, tensors, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True
            )
        jac = {
            n: torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) if g is None else g.detach()
            for n, t, g in zip(names, tensors, grads, strict=True)
        }
    elif backend == "autograd":
        fn = model if forward is None else forward  # the model or a ViT view (lora.fast_forward)
        jac = _partitionwise_vjp(fn, model, names, live_params, joined, part, P, tasks, index, first_tasks)
    else:
        raise ValueError(f"unknown gradient backend {backend!r}")
    for n, g in jac.items():
        out[n][index] = g
    return {n: v.reshape(P, T, *v.shape[1:]) for n, v in out.items()}


def _partitionwise_vjp(
    fn: Callable[[dict[str, Tensor]], Mapping[str, Tensor]],
    model: nn.Module,
    names: Sequence[str],
    live_params: Mapping[str, Tensor],
    joined: Batch,
    part: Tensor,
    P: int,
    tasks: Sequence[TaskSpec],
    index: Tensor,
    first_tasks: Sequence[TaskSpec] | None = None,
) -> dict[str, Tensor]:
    """The rows of :func:`partition_task_grads` selected by ``index`` (flat ``p * T + t``), one
    forward per partition and one backward per (partition, task).

    A (partition, task) loss depends only on its partition's rows, and the models here couple no
    rows (eval mode: no batch statistics), so differentiating each partition's forward on its own
    rows gives the same vector–Jacobian products as one joint forward whose backward, vmapped over
    all ``k`` cotangents, would run every partition's cotangent through every row: with four
    partitions that is 4× the backward work (the dominant cost of a default round on ``scenes``,
    docs/benchmarks.md "Default's wall on scenes")."""
    T = len(tasks)
    tensors = [live_params[n] for n in names]
    rows = {int(i): g for i, g in zip(index.tolist(), range(int(index.numel())), strict=True)}
    jac = {
        n: torch.zeros((len(rows), *t.shape), dtype=t.dtype, device=t.device)
        for n, t in zip(names, tensors, strict=True)
    }
    for p in range(P):
        wanted = [(t, rows[p * T + t]) for t in range(T) if p * T + t in rows]
        if not wanted:
            continue
        mine = joined.select((part == p).nonzero(as_tuple=True)[0])
        with eval_mode(model), torch.enable_grad():
            outputs = fn(mine.inputs)
            zeros = torch.zeros(len(mine), dtype=torch.long, device=mine.device)
            own = first_tasks if p == 0 and first_tasks is not None else tasks
            matrix = task_loss_matrix(outputs, mine.labels, own, zeros, 1).reshape(-1)  # [T]
            # one backward per task through the kept graph: on the scenes ViT ≈ 8 % cheaper than
            # one backward vmapped over the task cotangents (is_grads_batched), whose batching
            # rules copy every transposed activation
            for j, (t, row) in enumerate(wanted):
                grads = torch.autograd.grad(
                    matrix[t], tensors, retain_graph=j < len(wanted) - 1, allow_unused=True
                )
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        jac[n][row] = g.detach()
    return jac


def minibatches(batch: Batch, size: int, *, shuffle: bool, seed: int) -> list[Batch]:
    """Mini-batches of ``batch`` (a seeded permutation when ``shuffle``)."""
    n = len(batch)
    if n == 0:
        return []
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        batch = batch.select(order)
    return batch.split(max(1, int(size)))


class Cycler:
    """Endless seeded mini-batches of ``batch`` (a fresh permutation per pass)."""

    def __init__(self, batch: Batch, size: int, gen: torch.Generator) -> None:
        self.batch, self.size, self.gen = batch, size, gen
        self.order = torch.zeros(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> Batch:
        n = len(self.batch)
        if n == 0:
            return self.batch
        take: list[Tensor] = []
        need = min(self.size, n)
        while need > 0:
            if self.pos >= int(self.order.numel()):
                self.order = torch.randperm(n, generator=self.gen)
                self.pos = 0
            chunk = self.order[self.pos : self.pos + need]
            self.pos += int(chunk.numel())
            need -= int(chunk.numel())
            take.append(chunk)
        return self.batch.select(torch.cat(take))
