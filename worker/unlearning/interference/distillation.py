"""The retain term's targets, distilled from the pre-request model (``ia.retain_distillation``).

Deviation from the interference paper (docs/methods.md, "The retain term's targets"): Eq. 11's
retain gradient is the task loss on the retain partitions' labels. Across sequential rounds that
re-learns what an earlier round's approximate update suppressed — the earlier forgotten client's
data is gone, but its memorisation is still in the weights, only pushed aside, and descending the
labelled retain loss pulls the weights back towards the original fit. With ``β =
retain_distillation`` the retain targets become ``(1 − β)·label + β·pre-request prediction``
(class probabilities; a regression's value): at β = 1 the retain term only keeps the pre-request
model's function on the anchor (its gradient is zero there), so it repairs what the forget term
breaks without undoing earlier requests. β = 0 is the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from worker.unlearning.audit import model_outputs
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.lora import Forward, fast_forward
from worker.unlearning.types import (
    Batch,
    ClassificationTask,
    Partitions,
    TaskSpec,
    is_supervised,
    soft_targets,
)


def distilled_targets(task: TaskSpec, labels: Tensor, output: Tensor, beta: float) -> Tensor:
    """``(1 − β)·labels + β·prediction`` on the supervised rows of ``labels`` (the others stay
    unlabelled): class probabilities ``[N, C]`` for a classification task, values otherwise."""
    supervised = is_supervised(labels)
    if isinstance(task, ClassificationTask):
        hard = soft_targets(labels, task.num_outputs).to(output.dtype)
        mixed = (1.0 - beta) * torch.nan_to_num(hard) + beta * torch.softmax(output, dim=-1)
        return torch.where(supervised[:, None], mixed, torch.full_like(mixed, float("nan")))
    pred = output.reshape(labels.shape).to(labels.dtype)
    mixed = (1.0 - beta) * torch.nan_to_num(labels) + beta * pred
    mask = supervised.reshape(-1, *([1] * (labels.dim() - 1)))
    return torch.where(mask, mixed, torch.full_like(mixed, float("nan")))


def distilled_batch(
    model: nn.Module, batch: Batch, tasks: Sequence[TaskSpec], beta: float, device: str, forward: Forward
) -> Batch:
    """``batch`` with each task's labels mixed with ``model``'s predictions (:func:`distilled_targets`)."""
    if len(batch) == 0:
        return batch
    outputs = model_outputs(model, batch.to(device).inputs, forward=forward)
    labels = dict(batch.labels)
    for task in tasks:
        if task.name in labels:
            labels[task.name] = distilled_targets(task, labels[task.name], outputs[task.name].cpu(), beta)
    return replace(batch, labels=labels)


def distilled_partitions(
    model: nn.Module,
    partitions: Partitions,
    tasks: Sequence[TaskSpec],
    beta: float,
    device: str = "cpu",
    *,
    inst_beta: float | None = None,
) -> Partitions:
    """``partitions`` with the three retain partitions' targets distilled from ``model`` (the
    pre-request model: call before SSD or any update); the forget partition keeps its labels.
    ``inst_beta``: β of ``retain_inst`` (the anchor under the forgotten tasks; None: ``beta``)."""
    inst_beta = beta if inst_beta is None else inst_beta
    if beta <= 0.0 and inst_beta <= 0.0:
        return partitions
    forward = fast_forward(model)

    def distil(batch: Batch, b: float) -> Batch:
        return distilled_batch(model, batch, tasks, b, device, forward) if b > 0.0 else batch

    return replace(
        partitions,
        retain_clean=distil(partitions.retain_clean, beta),
        retain_inst=distil(partitions.retain_inst, inst_beta),
        retain_task=distil(partitions.retain_task, beta),
    )


def distilled_retain_targets(
    model: nn.Module, partitions: Partitions, tasks: Sequence[TaskSpec], cfg: IAConfig, device: str = "cpu"
) -> Partitions:
    """:func:`distilled_partitions` with ``cfg``'s shares (``retain_distillation``, and
    ``forgotten_task_distillation`` for D_r^inst): the one reading of the config for every caller."""
    return distilled_partitions(model, partitions, tasks, cfg.retain_distillation, device,
                                inst_beta=cfg.inst_distillation)  # fmt: skip
