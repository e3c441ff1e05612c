"""Training of the original adapter (v1) and of the exact ``retrain`` reference.

v1 recipe (subset-wise paper §4.1 and §5, UNLEARNING.md): a fresh LoRA adapter (rank 16) on the frozen
base, trained with ``L = λ1·L_main + λ2·L_aux + λ_dis·(λ_pull·L_pull + λ_push·L_push)`` (Eqs. 4–7):
the first ``main_only_epochs`` epochs with the main tasks only (λ2 = λ_dis = 0), then with the
subset-ID head and the disentanglement loss on. ``L_main`` is the weighted sum of the task losses
(interference paper Eq. 2). ``retrain`` is the same recipe on the retain set only.

Deviation: L_pull / L_push act on the L2-normalised trunk embedding (so ``margin`` is a distance on
the unit sphere, ≤ 2). On the raw embedding the pull term's scale swamped the task losses and
collapsed the digits workload (Val 0.11), whatever the margin.

Option ``detach_subset_head``: L_aux trains the subset-ID head on a detached embedding (the head
still learns to name each client, for pruning; the adapter learns only from L_main and L_dis). On
the scenes workload the attached head cost 30 points of held-out accuracy (docs/workloads.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from pydantic import dataclasses as pydantic_dataclasses
from torch import Tensor

from worker.unlearning.config import (
    SETTINGS,
    AdapterAlpha,
    AdapterRank,
    BatchSize,
    Epochs,
    Fraction,
    LearningRate,
    NonNegative,
    parse_settings,
)
from worker.unlearning.model import MultiTaskModel, forward_with_embedding, unwrap, wrap_lora
from worker.unlearning.types import IGNORE, SUBSET_HEAD, Batch, TaskSpec, main_task_loss


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class TrainConfig:
    """``settings["train"]`` (and ``settings["lora"]``'s ``rank`` / ``alpha``): the recipe of v1 and of
    every retrain."""

    epochs: Epochs = 60
    main_only_epochs: Epochs = 15
    batch_size: BatchSize = 64
    lr: LearningRate = 1e-2
    weight_decay: NonNegative = 0.0
    lambda_main: NonNegative = 1.0
    lambda_aux: NonNegative = 1.0
    lambda_dis: NonNegative = 0.1
    lambda_pull: NonNegative = 1.0
    lambda_push: NonNegative = 1.0
    margin: NonNegative = 1.0
    # 0: the workload's LoraConfig (``settings["lora"]`` ``rank`` / ``alpha`` override it)
    rank: AdapterRank = 0
    lora_alpha: AdapterAlpha = 0
    # Cosine decay of the learning rate from ``lr`` to ``final_lr_fraction·lr`` over the run
    # (1.0 = constant learning rate).
    final_lr_fraction: Fraction = 1.0
    # True: the subset-ID head reads a detached embedding, so L_aux trains that head only and the
    # adapter keeps its capacity for the tasks (L_dis still shapes the embedding). For a small
    # backbone whose one pooled embedding cannot serve client ID and the tasks at once.
    detach_subset_head: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> TrainConfig:
        """From the per-model settings: keys of ``settings["train"]`` plus ``settings["lora"]``."""
        train = dict(settings.get("train", {}))
        lora = dict(settings.get("lora", {}))
        if "rank" in lora:
            train.setdefault("rank", lora["rank"])
        if "alpha" in lora:
            train.setdefault("lora_alpha", lora["alpha"])
        return parse_settings(cls, train, "training")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def disentanglement_losses(z: Tensor, subset: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """``(L_pull, L_push)`` of Eqs. 5–6 over the subsets present in the batch (vectorised).

    ``L_pull``: mean over subsets of the mean squared distance of their embeddings to the centroid.
    ``L_push``: mean over ordered pairs of distinct subsets of ``max(0, m − ||z̄_s − z̄_s'||)²``;
    0 when fewer than two subsets are present. Samples with ``subset == IGNORE`` take no part.
    """
    valid = subset != IGNORE
    zero = z.sum() * 0.0
    if not bool(valid.any()):
        return zero, zero
    z = z[valid]
    s = subset[valid]
    present, inverse = torch.unique(s, return_inverse=True)
    k = int(present.numel())
    onehot = F.one_hot(inverse, k).to(z.dtype)  # [n, k]
    counts = onehot.sum(0)  # [k]
    centroids = (onehot.T @ z) / counts[:, None]  # [k, d]
    sq = ((z - centroids[inverse]) ** 2).sum(-1)  # [n]
    pull = ((onehot * sq[:, None]).sum(0) / counts).mean()
    if k < 2:
        return pull, zero
    diff = centroids[:, None, :] - centroids[None, :, :]
    dist = torch.sqrt(torch.clamp((diff**2).sum(-1), min=1e-12))
    off_diag = ~torch.eye(k, dtype=torch.bool, device=z.device)
    push = (torch.clamp(margin - dist[off_diag], min=0.0) ** 2).mean()
    return pull, push


def subset_loss(output: Tensor, subset: Tensor) -> Tensor:
    """Cross-entropy of the subset-ID head over samples with a subset label (0 if none)."""
    valid = subset != IGNORE
    if not bool(valid.any()):
        return output.sum() * 0.0
    return F.cross_entropy(output[valid], subset[valid])


def v1_loss(
    model: torch.nn.Module, batch: Batch, tasks: Sequence[TaskSpec], cfg: TrainConfig, *, phase_two: bool
) -> Tensor:
    """The training loss of one mini-batch (Eq. 4); ``phase_two`` switches L_aux and L_dis on."""
    outputs, z = forward_with_embedding(model, batch.inputs)
    loss = cfg.lambda_main * main_task_loss(outputs, batch.labels, tasks)
    if phase_two:
        subset_out = (
            unwrap(model).heads[SUBSET_HEAD](z.detach()) if cfg.detach_subset_head else outputs[SUBSET_HEAD]
        )
        loss = loss + cfg.lambda_aux * subset_loss(subset_out, batch.subset)
        # On the unit sphere: the raw embedding's scale would let L_dis swamp the task losses.
        pull, push = disentanglement_losses(F.normalize(z, dim=-1), batch.subset, cfg.margin)
        loss = loss + cfg.lambda_dis * (cfg.lambda_pull * pull + cfg.lambda_push * push)
    return loss


class TrainingInterruptedError(Exception):
    """``train_v1``'s ``should_stop`` asked it to stop; the half-trained adapter is discarded."""


def fresh_adapter(base: MultiTaskModel, cfg: TrainConfig, *, seed: int) -> PeftModel:
    """The untrained adapter :func:`train_v1` starts from: seeded LoRA of ``cfg``'s rank on a copy of
    ``base`` (a rank from the settings without an alpha keeps the workload's alpha)."""
    alpha = cfg.lora_alpha or (base.lora_template.lora_alpha if cfg.rank else None)
    return wrap_lora(base, rank=cfg.rank or None, alpha=alpha, seed=seed)


def train_v1(
    base: MultiTaskModel,
    data: Batch,
    tasks: Sequence[TaskSpec],
    cfg: TrainConfig,
    *,
    seed: int,
    device: str = "cpu",
    should_stop: Callable[[], bool] | None = None,
) -> PeftModel:
    """The original adapter: fresh LoRA (seeded) on a copy of ``base``, trained on ``data`` with the
    v1 schedule (on ``device``). ``should_stop``: asked after every optimiser step (background
    training that yields to requests: the caller keeps it cheap); true raises
    :class:`TrainingInterruptedError`."""
    model = fresh_adapter(base, cfg, seed=seed)
    model.to(device)
    data = data.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = max(1, cfg.epochs * steps_per_epoch)
    floor = cfg.final_lr_fraction

    def factor(step: int) -> float:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * step / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    for epoch in range(cfg.epochs):
        phase_two = epoch >= cfg.main_only_epochs
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            batch = data.select(order[start : start + cfg.batch_size])
            loss = v1_loss(model, batch, tasks, cfg, phase_two=phase_two)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            if should_stop is not None and should_stop():
                raise TrainingInterruptedError(f"stopped at epoch {epoch + 1} of {cfg.epochs}")
    model.eval()
    return model


# Exact unlearning, the ``retrain`` reference: the v1 recipe (a fresh seeded adapter) on the retain set
# only — one recipe, two data sets. The retain set must already exclude forgotten instances and carry
# ``IGNORE`` for forgotten (sample, task) labels (see :mod:`worker.unlearning.partitions`).
retrain = train_v1
