"""The loop the gradient baselines share (``neggrad_plus``, ``orthograd``, ``gdr_gma``, ``uno``).

What every baseline does the same way, so that they differ only in their update direction:

- data: the forget set is D_f; the retain set is the union D_r^task ∪ D_r^inst ∪ D_r^clean of the
  request's partitions (each keeps its ``IGNORE`` mask, so one masked main-task loss serves full-task
  requests — where D_r^task and D_r^clean are empty — and partial-task ones, where D_r^task keeps the
  forgotten clients' samples on the retained tasks);
- parameters: the LoRA A/B factors and the main-task heads (``update_heads``); the base and the
  subset-ID head (no main-task gradient reaches it) never move;
- per-sample gradients by ``torch.func`` (``vmap(grad)`` over ``functional_call``,
  :func:`worker.unlearning.grads.per_sample_grads`), mini-batch gradients by one plain backward;
  both packed into one flat vector per sample / batch (:class:`FlatSpace`) so that projections
  are single tensor ops;
- an epoch is one pass over D_f in mini-batches of ``batch_size``; retain mini-batches of
  ``retain_batch_size`` are cycled alongside (seeded);
- the method's step returns a *descent* direction; AdamW applies it (the papers write plain
  ``θ ← θ − η·g``; OrthoGrad's ASR runs and GDR-GMA's code use Adam/AdamW — one optimiser for all);
- model selection (deviation, shared with ``ia``): after every epoch the forget-vs-held-out loss-MIA
  AUC is measured and the epoch closest to the target (the retrain reference's AUC when the caller
  knows it, else ``mia_target``) is kept — epoch 0 included. The papers stop on their own criteria
  (accuracy thresholds, fixed step counts); one rule for every method keeps the benchmark fair.
  ``patience`` (default 5) ends the run after that many epochs without a closer AUC — the analogue
  of OrthoGrad's and NegGrad+'s stopping criteria; ``gdr_gma`` and ``uno`` default to 0 (their
  papers run a fixed budget). ``early_stopping: false`` keeps the last epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from pydantic import dataclasses as pydantic_dataclasses
from torch import Tensor, nn

from worker.unlearning import progress
from worker.unlearning.audit import forget_mia
from worker.unlearning.config import (
    SETTINGS,
    BatchSize,
    Count,
    Epochs,
    Fraction,
    LearningRate,
    NonNegative,
    parse_settings,
)
from worker.unlearning.grads import Cycler, eval_mode, per_sample_grads
from worker.unlearning.lora import param_groups, restore
from worker.unlearning.methods.base import MethodContext
from worker.unlearning.types import Batch, Partitions, TaskSpec, concat_batches, main_task_loss


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class LoopConfig:
    """Keys every baseline accepts (each method's config adds its own and may change defaults)."""

    lr: LearningRate = 1e-3
    epochs: Epochs = 10
    batch_size: BatchSize = 128
    retain_batch_size: BatchSize = 128
    weight_decay: NonNegative = 0.0
    update_heads: bool = True
    early_stopping: bool = True
    mia_target: Fraction = 0.5
    patience: Count = 5  # stop after this many epochs without a better MIA distance (0: run all epochs)
    chunk_size: BatchSize = 256  # vmap chunk of per-sample gradients

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


C = TypeVar("C", bound=LoopConfig)


def parse_config(cls: type[C], settings: Mapping[str, Any] | None, method: str) -> C:
    """``cls`` from ``settings`` (:func:`worker.unlearning.config.parse_settings`: unknown keys and
    values of the wrong type are errors), with the loop's ranges checked."""
    cfg = parse_settings(cls, settings, method)
    if cfg.epochs < 0 or cfg.batch_size < 1 or cfg.retain_batch_size < 1 or cfg.lr < 0 or cfg.patience < 0:
        raise ValueError(f"{method} needs epochs >= 0, batch sizes >= 1, lr >= 0 and patience >= 0")
    return cfg


# ----------------------------------------------------------------------------------------------
# parameters and flat gradients
# ----------------------------------------------------------------------------------------------


def updated_names(model: nn.Module, tasks: Sequence[TaskSpec], *, update_heads: bool) -> list[str]:
    """The LoRA factors (all A, then all B) and, with ``update_heads``, the main-task heads."""
    groups = param_groups(model)
    heads = groups.head_params([t.name for t in tasks]) if update_heads else []
    return [*groups.lora_a, *groups.lora_b, *heads]


class FlatSpace:
    """Packs ``{name: [*lead, *shape]}`` into ``[*lead, D]`` (names in a fixed order) and back."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        params = dict(model.named_parameters())
        self.names = list(names)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)

    def pack(self, tensors: Mapping[str, Tensor], lead: int = 0) -> Tensor:
        parts = [tensors[n].reshape(*tensors[n].shape[:lead], -1) for n in self.names]
        return torch.cat(parts, dim=-1)

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(flat, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, pieces, self.shapes, strict=True)}


def supervised_pairs(batch: Batch, tasks: Sequence[TaskSpec]) -> int:
    """Number of supervised (sample, task) pairs: the denominator of ``types.main_task_loss``."""
    return int(sum(int(t.supervised(batch.labels[t.name]).sum()) for t in tasks if t.name in batch.labels))


def loss_and_grad(
    model: nn.Module, space: FlatSpace, batch: Batch, tasks: Sequence[TaskSpec]
) -> tuple[float, Tensor]:
    """The batch's main-task loss and its flat gradient ``[D]`` (0 and zeros for an empty batch).

    One plain backward on the live parameters: a batch gradient needs no ``torch.func`` transform,
    and ``functional_call``'s re-parametrisation makes it ≈ 3× slower on these small models."""
    live = dict(model.named_parameters())
    tensors = [live[n] for n in space.names]
    if len(batch) == 0:
        return 0.0, torch.zeros(space.size, dtype=tensors[0].dtype, device=tensors[0].device)
    with eval_mode(model), torch.enable_grad():
        loss = main_task_loss(model(batch.inputs), batch.labels, tasks)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    flat = [
        torch.zeros_like(t).reshape(-1) if g is None else g.reshape(-1)
        for t, g in zip(tensors, grads, strict=True)
    ]
    return float(loss.detach()), torch.cat(flat).detach()


def per_sample_flat(
    model: nn.Module, space: FlatSpace, batch: Batch, tasks: Sequence[TaskSpec], *, chunk_size: int = 256
) -> Tensor:
    """``[N, D]``: each row's gradient of its summed weighted task losses (``vmap(grad)``).

    ``rows.sum(0) / supervised_pairs(batch)`` is the gradient of the batch's main-task loss."""
    if len(batch) == 0:
        return torch.zeros((0, space.size), device=batch.device)
    g = per_sample_grads(model, space.names, batch, tasks, chunk_size=chunk_size)
    return space.pack(g, lead=1).detach()


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def retain_union(partitions: Partitions) -> Batch:
    """D_r^task ∪ D_r^inst ∪ D_r^clean (non-empty ones, in that order; labels keep their masks)."""
    parts = [p for p in (partitions.retain_task, partitions.retain_inst, partitions.retain_clean) if len(p)]
    return concat_batches(parts) if parts else partitions.retain_inst


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


@dataclass
class StepInput:
    """One iteration's data: a forget mini-batch (with its row indices in D_f) and a retain one."""

    forget: Batch
    forget_index: Tensor
    retain: Batch
    epoch: int  # 1-based
    step: int  # 0-based, over the whole run


StepFn = Callable[[StepInput], Tensor]
"""Returns the flat *descent* direction ``[D]`` the optimiser applies (gradient of what is minimised)."""


@dataclass
class LoopState:
    """What a method's step may need beyond its batches (built once per request)."""

    model: nn.Module
    tasks: list[TaskSpec]
    space: FlatSpace
    forget: Batch  # D_f, on the device
    retain: Batch  # the retain union, on the device
    cfg: LoopConfig


def _distance(aucs: Mapping[str, float], target: float | Mapping[str, float], default: float) -> float | None:
    if not aucs:
        return None
    gaps = [
        abs(auc - (target.get(t, default) if isinstance(target, Mapping) else target))
        for t, auc in aucs.items()
    ]
    return float(sum(gaps) / len(gaps))


def run_updates(
    ctx: MethodContext,
    method: str,
    cfg: LoopConfig,
    make_step: Callable[[LoopState], StepFn],
    stats: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``make_step(state)``'s direction for ``cfg.epochs`` passes over D_f on ``ctx.model`` in
    place; keep the epoch whose forget MIA is closest to the target. Returns JSON info."""
    model, device = ctx.model, ctx.device
    info: dict[str, Any] = {"method": method, "config": cfg.to_json()}
    forget = ctx.partitions.forget.to(device)
    if len(forget) == 0 or cfg.epochs == 0:
        info.update(
            epochs_run=0, steps=0, best_epoch=0, reason="empty forget set" if len(forget) == 0 else None
        )
        return info
    tasks = list(ctx.tasks)
    names = updated_names(model, tasks, update_heads=cfg.update_heads)
    space = FlatSpace(model, names)
    state = LoopState(
        model=model,
        tasks=tasks,
        space=space,
        forget=forget,
        retain=retain_union(ctx.partitions).to(device),
        cfg=cfg,
    )
    step_fn = make_step(state)
    live = dict(model.named_parameters())
    params = [live[n] for n in names]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(ctx.seed)
    retain_batches = Cycler(state.retain, cfg.retain_batch_size, gen)
    heldout = ctx.heldout.to(device)
    forget_specs = [t for t in tasks if t.name in ctx.partitions.forget_tasks]
    target: float | Mapping[str, float] = cfg.mia_target if ctx.mia_target is None else ctx.mia_target

    def measure() -> tuple[dict[str, float], float | None]:
        aucs = forget_mia(model, forget_specs, forget, heldout, device=device)
        return aucs, _distance(aucs, target, cfg.mia_target)

    aucs, dist = measure()
    history: list[dict[str, Any]] = [{"epoch": 0, "mia_auc": aucs, "distance": dist}]
    best_epoch, best_dist = 0, dist
    best_state = {n: live[n].detach().clone() for n in names}
    steps, epochs_run, stopped = 0, 0, None
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(forget), generator=gen)
        for start in range(0, len(forget), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            step_in = StepInput(forget.select(index), index, retain_batches.next(), epoch, steps)
            direction = step_fn(step_in)
            if not bool(torch.isfinite(direction).all()):
                stopped = f"non-finite direction at step {steps}"
                break
            for p, g in zip(params, space.unpack(direction).values(), strict=True):
                p.grad = g.to(dtype=p.dtype, device=p.device).clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        if stopped is not None:
            break  # a non-finite direction: this epoch is not finished
        epochs_run = epoch
        aucs, dist = measure()
        history.append({"epoch": epoch, "mia_auc": aucs, "distance": dist})
        ctx.progress(f"{method}: epoch {epoch}/{cfg.epochs} mia={aucs}")
        ctx.stage(progress.UPDATE, epoch, cfg.epochs)
        if dist is not None and (best_dist is None or dist < best_dist):
            best_epoch, best_dist = epoch, dist
            best_state = {n: live[n].detach().clone() for n in names}
        elif cfg.early_stopping and cfg.patience > 0 and epoch - best_epoch >= cfg.patience:
            stopped = f"no better MIA distance for {cfg.patience} epochs"
            break
    if cfg.early_stopping or stopped is not None:
        # (a non-finite direction never reaches the model; the best finished epoch is restored)
        restore(model, best_state)
    else:
        best_epoch, best_dist = epochs_run, dist
    info.update(
        epochs_run=epochs_run,
        steps=steps,
        best_epoch=best_epoch,
        best_distance=best_dist,
        mia_target=dict(target) if isinstance(target, Mapping) else float(target),
        history=history,
        updated_parameters=len(names),
        stopped=stopped,
    )
    if stats is not None:
        info["stats"] = stats()
    return info
