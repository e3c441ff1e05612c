"""The update loop (Algorithm 1): per iteration, the Eq. 11 direction through AdamW.

On mini-batches of D_f, D_r^clean, D_r^inst and D_r^task: every (partition, task) gradient in one
call (:func:`worker.unlearning.grads.partition_task_grads`), the task projections (``subspaces``,
``layout``), the forget gradient orthogonalised against the retain ones (``orthogonalisation``),
``η1·∇_r − η2·∇_f^⊥`` handed to AdamW, a subspace step; after every epoch a checkpoint
(``checkpoints``), and the kept one restored at the end.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from worker.unlearning.grads import Cycler, eval_mode, partition_task_grads
from worker.unlearning.interference.checkpoints import (
    Checkpoints,
    Monitor,
    at_unseen_level,
    checkpoint_heldout,
    select_checkpoint,
    within_tolerance,
)
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.distillation import distilled_retain_targets
from worker.unlearning.interference.forget_loss import ASCENDED, forget_loss_tasks
from worker.unlearning.interference.layout import FlatLayout
from worker.unlearning.interference.orthogonalisation import orthogonalize
from worker.unlearning.interference.retain import RetainLevel, anchor_ids_of, retain_check
from worker.unlearning.interference.subspaces import (
    gradient_subspaces,
    init_subspaces,
    projectors,
    subspace_penalty,
    subspace_step,
)
from worker.unlearning.interference.targets import ReferenceTarget, is_per_task
from worker.unlearning.interference.unseen_guard import GuardSchedule, guard_rows
from worker.unlearning.lora import fast_forward, param_groups
from worker.unlearning.partitions import mask_tasks
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
    retain_baseline: RetainLevel | None = None,
    retain: Batch | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    reference: ReferenceTarget | None = None,
    retain_targets: Partitions | None = None,
    forget_targets: Batch | None = None,
) -> dict[str, Any]:
    """Algorithm 1 on ``model`` in place (LoRA factors + forgotten-task heads). Returns JSON info.

    ``retain_baseline``: the pre-request model's accuracy on the :func:`retain_check` rows (the
    ``default`` method measures it before SSD); ``None``: the model as given is the baseline.
    ``on_epoch(k, n)``: called after epoch k of at most n (progress).
    ``reference``: the per-client target from the OUT reference adapters (``interference.targets``);
    with it early stopping keeps the checkpoint closest to it (MIA AUC and forget-set accuracy),
    the closest rather than the earliest of those at the unseen-data level.
    ``retain_targets``: ``partitions`` with the retain partitions' targets the retain term descends
    (``ia.retain_distillation``, :func:`~worker.unlearning.interference.distillation.distilled_retain_targets`
    of the pre-request model); ``None``: computed from ``model`` as given when β > 0, else the labels.
    ``forget_targets``: D_f with the targets the forget term descends towards (``ia.forget_targets:
    "references"``, :func:`~worker.unlearning.interference.forget_targets.reference_forget_targets`;
    the same rows in the same order as ``partitions.forget``); ``None``: the forget term ascends
    the loss on D_f's labels (paper). Early stopping's checks always read the labels.
    """
    cfg = cfg or IAConfig()
    info: dict[str, Any] = {"config": cfg.to_json()}
    forget = partitions.forget.to(device)
    if len(forget) == 0 or cfg.epochs == 0:
        info.update(
            epochs_run=0, best_epoch=0, steps=0, reason="empty forget set" if len(forget) == 0 else None
        )
        return info
    # from the whole split; only the forgotten tasks' labels: a kept task's guard gradient would
    # meet a zero forget row, so differentiating it is wasted (scenes PU: 3 backwards -> 1)
    guard = mask_tasks(guard_rows(heldout), partitions.forget_tasks).to(device) if cfg.unseen_guard else None
    rows = checkpoint_heldout(heldout, cfg.checkpoint_heldout_rows, seed)
    info["heldout_rows"] = {"measured": len(rows), "of": len(heldout)}
    if guard is not None:  # ia.unseen_guard: the rows whose gradients it differentiates
        info["heldout_rows"]["guard"] = len(guard)
    heldout = rows
    if retain_targets is None:
        retain_targets = distilled_retain_targets(model, partitions, tasks, cfg, device)
    with eval_mode(model):  # no dropout or batch statistics anywhere in the loop (as the gradients)
        size = cfg.check_size if cfg.checks_retain else 0
        check = retain_check(partitions, size=size, seed=seed, retain=retain, rows=cfg.check_rows)
        info.update(_run(model, tasks, partitions, forget, heldout.to(device), cfg, seed, mia_target,
                         device, progress, retain_baseline, check.to(device), on_epoch,
                         reference, retain_targets, forget_targets, guard))  # fmt: skip
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
    retain_baseline: RetainLevel | None,
    check: Batch,
    on_epoch: Callable[[int, int], None] | None,
    reference: ReferenceTarget | None,
    retain_targets: Partitions,
    forget_targets: Batch | None,
    guard: Batch | None = None,
) -> dict[str, Any]:
    inv = involved_tasks(partitions, tasks)
    inv_names = [t.name for t in inv]
    forget_names = [t for t in partitions.forget_tasks if t in inv_names]
    forget_specs = [t for t in inv if t.name in forget_names]
    every = checkpoint_every(cfg, tasks, partitions.forget_tasks)

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
    forward = fast_forward(model)
    U: Tensor | None = None
    if use_projection and cfg.subspace_init == "gradient":
        grads = partition_task_grads(
            model, names, _subspace_batches(partitions, device, seed), inv,
            backend=cfg.grad_backend, forward=forward, named=all_params,
        )  # fmt: skip
        U = gradient_subspaces(layout.rank_space(layout.pack(grads, lead=2).detach().sum(0)), min(dim, rank))
    elif use_projection:
        U = init_subspaces(T, rank, min(dim, rank), seed=seed, mode=cfg.subspace_init)
    info: dict[str, Any] = {
        "tasks": inv_names,
        "forget_tasks": forget_names,
        "checkpoint_every": every,
        "rank": rank,
        "subspace_dim": dim if use_projection else None,
        "updated_parameters": names,
    }

    gen = torch.Generator().manual_seed(seed)
    # the retain term descends retain_targets (the partitions' rows; distilled targets when β > 0)
    cyclers = {
        "clean": Cycler(retain_targets.retain_clean.to(device), cfg.batch_size, gen),
        "inst": Cycler(retain_targets.retain_inst.to(device), cfg.batch_size, gen),
        "task": Cycler(retain_targets.retain_task.to(device), cfg.batch_size, gen),
    }
    switches = cfg.retain_switches
    # ia.unseen_guard: held-out mini-batches whose per-task gradients the forget term is kept off
    guard_schedule = (
        None
        if guard is None
        else GuardSchedule(guard, cfg.unseen_guard_batch or cfg.batch_size, cfg.unseen_guard_every, gen)
    )
    # the forget term's rows: D_f's labels (ascended) or the references' predictions (descended)
    towards = forget_targets is not None
    forget_rows = forget_targets.to(device) if forget_targets is not None else forget
    forget_losses = forget_loss_tasks(inv, cfg.forget_loss)  # None: the tasks' own losses (paper)

    def adamw(lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, foreach=True)

    lr = cfg.lr
    opt = adamw(lr)
    target: float | Mapping[str, float] = cfg.mia_target if mia_target is None else mia_target
    checkpoints = Checkpoints(
        Monitor(forget, heldout, check, forget_specs, inv, device, forward, anchor_ids_of(partitions, cfg)),
        {n: all_params[n] for n in names},
        target=target,
        default_target=cfg.mia_target,
        retain_baseline=retain_baseline,
        task_distance=cfg.task_distance,
        forget_accuracy_z=cfg.forget_accuracy_z,
        kept_two_sided=cfg.kept_two_sided,
        reference=reference,
        kept_level=cfg.kept_level,
        relative_drop=cfg.retain_tolerance_scale == "relative",
        retain_noise_z=cfg.retain_noise_z,
        stop_spread=(cfg.stop_within_spread, cfg.stop_within),
    )
    # "earliest" keeps the least update at the unseen-data level: with a per-client target the
    # point is to go on towards it, so the closest of those is kept (unless the run stops there)
    if cfg.stop_at_unseen_level:
        pick = "earliest"
    else:
        pick = "closest" if reference is not None else cfg.forget_accuracy_pick
    history = checkpoints.history
    checkpoints.record(model, 0)
    steps, since_change, best = 0, 0, 0  # since_change: steps since the kept checkpoint changed
    patience, grid_from = cfg.patience, 0  # after a return: ia.refine_patience, a grid from its step
    epochs_run = 0
    stopped = "budget"
    norms: list[tuple[float, float, float]] = []
    held_steps = dict.fromkeys(forget_names, 0)  # ia.hold_past_target: steps without a task's forget term
    refinements: list[dict[str, Any]] = []  # ia.refine_rounds: each return to the kept checkpoint

    def go_back() -> None:
        """ia.refine_rounds: on from the kept checkpoint with a smaller step and a fresh AdamW (the
        moments belong to the abandoned path). The task subspaces U are the direction's basis,
        not the model, and go on from where they are."""
        nonlocal lr, opt, since_change, patience, every, grid_from
        lr *= cfg.refine_lr_factor
        checkpoints.restore(model, best)
        opt = adamw(lr)
        since_change = 0
        # ia.refine_checkpoint_every / refine_patience: a finer search near the kept checkpoint
        patience = cfg.refine_patience or patience
        every, grid_from = cfg.refine_checkpoint_every or every, steps
        refinements.append({"steps": steps, "from_steps": history[best]["steps"], "lr": lr})

    def decide() -> str | None:
        """After a checkpoint: the kept one updated; why the run stops now (None: it goes on)."""
        nonlocal best, since_change
        # the continuation (stop_at_unseen_level) never keeps the model as given: it failed its check
        chosen = select_checkpoint(history, cfg.retain_tolerance, pick, start=int(cfg.stop_at_unseen_level))
        if chosen != best:
            since_change = 0
        best = chosen
        if cfg.max_steps and steps >= cfg.max_steps:
            return "budget"
        if cfg.early_stopping and steps >= cfg.min_steps:
            if within_target(history[best], cfg.stop_within, cfg.retain_tolerance):
                return "within_target"
            if within_spread(history[best], cfg.retain_tolerance):
                return "within_spread"
            if cfg.stop_at_unseen_level and at_unseen_level(history[best], cfg.retain_tolerance):
                return "at_unseen_level"
            if 0 < patience <= since_change:
                if len(refinements) < cfg.refine_rounds:
                    go_back()
                    return None
                return "patience"
        return None

    reason: str | None = None
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(forget), generator=gen)
        for start in range(0, len(forget), cfg.batch_size):
            if cfg.max_steps and steps >= cfg.max_steps:
                break
            f_batch = forget_rows.select(order[start : start + cfg.batch_size])
            retain_batches = [cyclers[k].next() for k in ("clean", "inst", "task")]
            guard_batches = [] if guard_schedule is None else guard_schedule.batches(steps)
            G = partition_task_grads(
                model,
                names,
                [f_batch, *retain_batches, *guard_batches],
                inv,
                backend=cfg.grad_backend,
                forward=forward,
                named=all_params,
                first_tasks=forget_losses,
            )
            flat = layout.pack(G, lead=2).detach()  # [4, T, D]; [5, T, D] with the guard's rows
            if guard_schedule is not None:
                flat = guard_schedule.with_guard(flat)
            held = checkpoints.past_target() if cfg.hold_past_target else frozenset()
            for name in held:
                held_steps[name] += 1
            direction, step_norms = _direction(
                flat, layout, U, cfg, switches, towards=towards, held=[t.name in held for t in inv]
            )
            norms.append(step_norms)
            for p, g in zip(params, layout.unpack(direction).values(), strict=True):
                p.grad = g.to(p.dtype).clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if U is not None:
                U = subspace_step(U, cfg.subspace_lr)
            steps += 1
            since_change += 1
            # a checkpoint within the pass (ia.checkpoint_every); the pass's last step has its own
            last_of_pass = start + cfg.batch_size >= len(forget)
            if every and (steps - grid_from) % every == 0 and not last_of_pass:
                checkpoints.record(model, epoch, steps)
                reason = decide()
                if reason is not None:
                    break
        epochs_run = epoch
        if reason is None:  # not stopped within the pass: the pass's own checkpoint
            checkpoints.record(model, epoch, steps)
            if progress is not None:
                progress(f"ia: epoch {epoch}/{cfg.epochs} mia={history[-1]['mia_auc']}")
            if on_epoch is not None:
                on_epoch(epoch, cfg.epochs)
            reason = decide()
        if reason is not None:
            stopped = reason
            break
    if not cfg.early_stopping:  # the last epoch is kept
        best = epochs_run
    checkpoints.restore(model, best)
    info.update(
        epochs_run=epochs_run,
        steps=steps,
        stopped=stopped,
        best_epoch=history[best]["epoch"],
        best_steps=history[best]["steps"],
        best_distance=history[best]["distance"],
        retain_baseline=checkpoints.baseline,
        mia_target=dict(target) if isinstance(target, Mapping) else float(target),
        pick=pick,
        history=history,
        subspace_penalty=None if U is None else float(subspace_penalty(U)),
        term_norms=term_norms(norms),
        forget_term=forget_term_name(towards, cfg.forget_loss),
        held_steps=held_steps if cfg.hold_past_target else None,
        refinements=refinements,
    )
    return info


def forget_term_name(towards: bool, forget_loss: str) -> str:
    """The evidence's name of what the forget term did on D_f."""
    if towards:
        return "descend towards the references' predictions"
    ascended = ASCENDED.get(forget_loss)  # None: the paper's cross-entropy
    return f"ascend {ascended} on the labels" if ascended else "ascend on the labels"


def checkpoint_every(cfg: IAConfig, tasks: Sequence[TaskSpec], forget_tasks: Sequence[str]) -> int:
    """Steps between checkpoints within a pass: ``ia.per_task_checkpoint_every`` for a per-task
    request where it is set, else ``ia.checkpoint_every`` (0: one checkpoint a pass)."""
    if cfg.per_task_checkpoint_every and is_per_task(tasks, forget_tasks):
        return cfg.per_task_checkpoint_every
    return cfg.checkpoint_every


def within_target(checkpoint: Mapping[str, Any], stop_within: float, retain_tolerance: float) -> bool:
    """Whether ``checkpoint`` (a history entry) is within ``stop_within`` of the target (0: never)
    and within the retain tolerance (a kept checkpoint outside it is the least bad, not a goal)."""
    distance = checkpoint.get("distance")
    return (
        stop_within > 0
        and distance is not None
        and float(distance) <= stop_within
        and within_tolerance(checkpoint, retain_tolerance)
    )


def within_spread(checkpoint: Mapping[str, Any], retain_tolerance: float) -> bool:
    """Whether ``checkpoint`` is inside the references' spread of the target (its ``inside_spread``,
    ``ia.stop_within_spread``) and within the retain tolerance."""
    return bool(checkpoint.get("inside_spread")) and within_tolerance(checkpoint, retain_tolerance)


def _subspace_batches(partitions: Partitions, device: str, seed: int, size: int = 256) -> list[Batch]:
    """The four partitions (at most ``size`` seeded rows each) whose per-task gradients place the
    ``"gradient"`` task subspaces."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in (partitions.forget, partitions.retain_clean, partitions.retain_inst, partitions.retain_task):
        if len(b) > size:
            b = b.select(torch.randperm(len(b), generator=gen)[:size].sort().values)
        out.append(b.to(device))
    return out


def term_norms(norms: Sequence[tuple[float, float, float]]) -> dict[str, float | None]:
    """The evidence of Eq. 11's balance: medians over the steps of ‖retain term‖ (``η1·∇_r``),
    ‖forget term‖ as applied, the forget term before any ``forget_balance`` rescaling
    (``η2·∇_f^⊥``), and the applied forget / retain ratio."""
    if not norms:
        return {"steps": 0, "retain": None, "forget": None, "forget_unbalanced": None, "ratio": None}
    ratios = [f / r for r, f, _ in norms if r > 0]
    return {
        "steps": len(norms),
        "retain": statistics.median(n[0] for n in norms),
        "forget": statistics.median(n[1] for n in norms),
        "forget_unbalanced": statistics.median(n[2] for n in norms),
        "ratio": statistics.median(ratios) if ratios else None,
    }


def _direction(
    flat: Tensor,
    layout: FlatLayout,
    U: Tensor | None,
    cfg: IAConfig,
    switches: Mapping[str, bool],
    *,
    towards: bool = False,
    held: Sequence[bool] | None = None,
) -> tuple[Tensor, tuple[float, float, float]]:
    """The Eq. 11 gradient ``Σ_t η1·∇_r^{(t)} − η2·∇_f^{⊥(t)}`` from ``[4, T, D]`` partition-task grads
    (partitions in the order forget, clean, inst, task), with the forget term rescaled by
    ``cfg.forget_balance``; and (‖retain term‖, ‖forget term‖, ‖unbalanced forget term‖).
    ``towards``: D_f's loss is towards the references' predictions and is descended, so its
    gradient enters with the opposite sign (``∇_f = −∇ loss``; projection and orthogonalisation
    are linear in it, so they are unchanged). ``held``: per task, whether its forget gradient is
    left out this step (``ia.hold_past_target``; a held task's row is zero, as a retained task's).
    A fifth partition (``ia.unseen_guard``): held-out rows, whose gradient *per task* the forget
    gradient of that task is also made orthogonal to (after the retain partitions')."""
    T = int(flat.shape[1])
    forget_t = -flat[0] if towards else flat[0]  # [T, D]: D_f's loss on task t
    if held is not None and any(held):
        keep = torch.tensor([not h for h in held], dtype=forget_t.dtype, device=forget_t.device)
        forget_t = forget_t * keep[:, None]
    retain_t = flat[1:4]  # [3, T, D]
    guard_t = flat[4:5]  # [1, T, D] with the guard (its task rows), else [0, T, D]
    retain_full = retain_t.sum(1, keepdim=True).expand(-1, T, -1)  # [3, T, D]: whole partition loss
    descent = retain_t.sum(0)  # [T, D]: retain loss on task t
    if U is not None:  # one projection of all five (six) [T, D] blocks
        stacked = layout.project(
            torch.cat([forget_t[None], retain_full, descent[None], guard_t]), projectors(U)
        )
        forget_t, retain_full, descent, guard_t = stacked[0], stacked[1:4], stacked[4], stacked[5:]
    # an all-zero retain gradient (an empty partition, e.g. clean and task in full-task requests)
    # removes nothing: skip it rather than pay for its segment sums
    chosen = [
        retain_full[i] for i, k in enumerate(RETAIN_ORDER) if switches[k] and bool(retain_full[i].any())
    ]
    chosen += [g for g in guard_t if bool(g.any())]
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
    retain_term = cfg.eta1 * descent.sum(0)
    plain = cfg.eta2 * orth.sum(0)
    forget_term = balance_forget(orth, float(retain_term.norm()), cfg.eta2, cfg.forget_balance)
    return retain_term - forget_term, (
        float(retain_term.norm()),
        float(forget_term.norm()),
        float(plain.norm()),
    )


def balance_forget(orth: Tensor, retain_norm: float, eta2: float, mode: str) -> Tensor:
    """Eq. 11's forget term from the per-task orthogonalised forget gradients ``orth`` ([T, D];
    zero rows for retained tasks): ``"none"`` = ``η2·Σ_t f_t`` (paper); ``"total"`` = the same
    direction with norm ``η2·retain_norm``; ``"per_task"`` = ``η2·retain_norm/n · Σ_t f_t/‖f_t‖``
    over the n non-zero rows. A zero forget gradient stays zero."""
    if mode == "none":
        return eta2 * orth.sum(0)
    if mode == "total":
        total = orth.sum(0)
        norm = float(total.norm())
        return total * (eta2 * retain_norm / norm) if norm > 0 else total
    row_norms = orth.norm(dim=-1, keepdim=True)
    live = row_norms > 0
    n = int(live.sum())
    if n == 0:
        return orth.sum(0)
    unit = torch.where(live, orth / row_norms.clamp_min(torch.finfo(orth.dtype).tiny), torch.zeros_like(orth))
    return unit.sum(0) * (eta2 * retain_norm / n)
