"""The update loop (Algorithm 1): per iteration, the Eq. 11 direction through AdamW.

On mini-batches of D_f, D_r^clean, D_r^inst and D_r^task: every (partition, task) gradient in one
call (:func:`worker.unlearning.grads.partition_task_grads`), the task projections (``subspaces``,
``layout``), the forget gradient orthogonalised against the retain ones (``orthogonalisation``),
``η1·∇_r − η2·∇_f^⊥`` handed to AdamW, a subspace step; after every epoch a checkpoint
(``checkpoints``), and the kept one restored at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from worker.unlearning.grads import Cycler, eval_mode, partition_task_grads
from worker.unlearning.interference.checkpoints import Checkpoints, Monitor, select_checkpoint
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.layout import FlatLayout
from worker.unlearning.interference.orthogonalisation import orthogonalize
from worker.unlearning.interference.retain import anchor_ids_of, retain_check
from worker.unlearning.interference.subspaces import (
    init_subspaces,
    projectors,
    subspace_penalty,
    subspace_step,
)
from worker.unlearning.lora import fast_forward, param_groups, restore
from worker.unlearning.types import Batch, Partitions, TaskSpec

RETAIN_ORDER = ("clean", "inst", "task")


def involved_tasks(partitions: Partitions, tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    """The tasks supervised in at least one of the four partitions (in ``tasks`` order)."""
    parts = (partitions.forget, partitions.retain_clean, partitions.retain_inst, partitions.retain_task)
    out: list[TaskSpec] = []
    for t in tasks:
        if any(len(p) and t.name in p.labels and bool(t.supervised(p.labels[t.name]).any()) for p in parts):
            out.append(t)
    return out


def interference_aware_unlearn(
    model: nn.Module,
    *,
    tasks: Sequence[TaskSpec],
    partitions: Partitions,
    heldout: Batch,
    cfg: IAConfig | None = None,
    seed: int = 0,
    mia_target: float | Mapping[str, float] | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    retain_baseline: Mapping[str, float] | None = None,
    retain: Batch | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Algorithm 1 on ``model`` in place (LoRA factors + forgotten-task heads). Returns JSON info.

    ``retain_baseline``: the pre-request model's accuracy on the :func:`retain_check` rows (the
    ``default`` method measures it before SSD); ``None``: the model as given is the baseline.
    ``on_epoch(k, n)``: called after epoch k of at most n (progress).
    """
    cfg = cfg or IAConfig()
    info: dict[str, Any] = {"config": cfg.to_json()}
    forget = partitions.forget.to(device)
    if len(forget) == 0 or cfg.epochs == 0:
        info.update(
            epochs_run=0, best_epoch=0, steps=0, reason="empty forget set" if len(forget) == 0 else None
        )
        return info
    with eval_mode(model):  # no dropout or batch statistics anywhere in the loop (as the gradients)
        size = cfg.check_size if cfg.checks_retain else 0
        check = retain_check(partitions, size=size, seed=seed, retain=retain, rows=cfg.check_rows)
        info.update(_run(model, tasks, partitions, forget, heldout.to(device), cfg, seed, mia_target,
                         device, progress, retain_baseline, check.to(device), on_epoch))  # fmt: skip
    return info


def _run(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    partitions: Partitions,
    forget: Batch,
    heldout: Batch,
    cfg: IAConfig,
    seed: int,
    mia_target: float | Mapping[str, float] | None,
    device: str,
    progress: Callable[[str], None] | None,
    retain_baseline: Mapping[str, float] | None,
    check: Batch,
    on_epoch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    inv = involved_tasks(partitions, tasks)
    inv_names = [t.name for t in inv]
    forget_names = [t for t in partitions.forget_tasks if t in inv_names]
    forget_specs = [t for t in inv if t.name in forget_names]

    groups = param_groups(model)
    head_names = groups.head_params(forget_names) if cfg.update_heads else []
    all_params = dict(model.named_parameters())
    layout = FlatLayout({n: p.shape for n, p in all_params.items()}, groups.lora, head_names)
    names = layout.names
    params = [all_params[n] for n in names]
    rank = layout.rank
    T = len(inv)
    dim = cfg.subspace_dim or max(1, rank // max(T, 1))
    use_projection = cfg.projection and rank > 0
    U = init_subspaces(T, rank, min(dim, rank), seed=seed, mode=cfg.subspace_init) if use_projection else None
    info: dict[str, Any] = {
        "tasks": inv_names,
        "forget_tasks": forget_names,
        "rank": rank,
        "subspace_dim": dim if use_projection else None,
        "updated_parameters": names,
    }

    gen = torch.Generator().manual_seed(seed)
    cyclers = {
        "clean": Cycler(partitions.retain_clean.to(device), cfg.batch_size, gen),
        "inst": Cycler(partitions.retain_inst.to(device), cfg.batch_size, gen),
        "task": Cycler(partitions.retain_task.to(device), cfg.batch_size, gen),
    }
    switches = cfg.retain_switches
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    target: float | Mapping[str, float] = cfg.mia_target if mia_target is None else mia_target
    forward = fast_forward(model)
    checkpoints = Checkpoints(
        Monitor(forget, heldout, check, forget_specs, inv, device, forward, anchor_ids_of(partitions, cfg)),
        {n: all_params[n] for n in names},
        target=target,
        default_target=cfg.mia_target,
        retain_baseline=retain_baseline,
    )
    history = checkpoints.history
    checkpoints.record(model, 0)
    steps, since_best, best = 0, 0, 0
    epochs_run = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(forget), generator=gen)
        for start in range(0, len(forget), cfg.batch_size):
            f_batch = forget.select(order[start : start + cfg.batch_size])
            retain_batches = [cyclers[k].next() for k in ("clean", "inst", "task")]
            G = partition_task_grads(
                model,
                names,
                [f_batch, *retain_batches],
                inv,
                backend=cfg.grad_backend,
                forward=forward,
                named=all_params,
            )
            flat = layout.pack(G, lead=2).detach()  # [4, T, D]
            direction = _direction(flat, layout, U, cfg, switches)
            for p, g in zip(params, layout.unpack(direction).values(), strict=True):
                p.grad = g.to(p.dtype).clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if U is not None:
                U = subspace_step(U, cfg.subspace_lr)
            steps += 1
        epochs_run = epoch
        checkpoints.record(model, epoch)
        if progress is not None:
            progress(f"ia: epoch {epoch}/{cfg.epochs} mia={history[-1]['mia_auc']}")
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs)
        chosen = select_checkpoint(history, cfg.retain_tolerance)
        since_best = 0 if chosen != best else since_best + 1
        best = chosen
        if cfg.early_stopping and cfg.patience > 0 and since_best >= cfg.patience:
            break
    if not cfg.early_stopping:  # the last epoch is kept
        best = epochs_run
    restore(model, checkpoints.states[best])
    info.update(
        epochs_run=epochs_run,
        steps=steps,
        best_epoch=history[best]["epoch"],
        best_distance=history[best]["distance"],
        retain_baseline=checkpoints.baseline,
        mia_target=dict(target) if isinstance(target, Mapping) else float(target),
        history=history,
        subspace_penalty=None if U is None else float(subspace_penalty(U)),
    )
    return info


def _direction(
    flat: Tensor, layout: FlatLayout, U: Tensor | None, cfg: IAConfig, switches: Mapping[str, bool]
) -> Tensor:
    """The Eq. 11 gradient ``Σ_t η1·∇_r^{(t)} − η2·∇_f^{⊥(t)}`` from ``[4, T, D]`` partition-task grads
    (partitions in the order forget, clean, inst, task)."""
    T = int(flat.shape[1])
    forget_t = flat[0]  # [T, D]: D_f's loss on task t
    retain_t = flat[1:]  # [3, T, D]
    retain_full = retain_t.sum(1, keepdim=True).expand(-1, T, -1)  # [3, T, D]: whole partition loss
    descent = retain_t.sum(0)  # [T, D]: retain loss on task t
    if U is not None:  # one projection of all five [T, D] blocks
        stacked = layout.project(torch.cat([forget_t[None], retain_full, descent[None]]), projectors(U))
        forget_t, retain_full, descent = stacked[0], stacked[1:4], stacked[4]
    # an all-zero retain gradient (an empty partition, e.g. clean and task in full-task requests)
    # removes nothing: skip it rather than pay for its segment sums
    chosen = [
        retain_full[i] for i, k in enumerate(RETAIN_ORDER) if switches[k] and bool(retain_full[i].any())
    ]
    orth = orthogonalize(
        forget_t,
        chosen,
        segments=layout.segments,
        n_segments=layout.n_segments,
        eps=cfg.epsilon,
        gram_schmidt=cfg.gram_schmidt,
        rank_tol=cfg.rank_tol,
        segment_matrix=layout.segment_matrix(forget_t),
    )
    return (cfg.eta1 * descent - cfg.eta2 * orth).sum(0)
