"""``ia``: interference-aware LoRA updates alone (settings key ``"ia"``; see
``worker.unlearning.interference``)."""

from __future__ import annotations

from typing import Any

from worker.unlearning import progress
from worker.unlearning.interference import IAConfig, interference_aware_unlearn
from worker.unlearning.interference.checkpoints import checkpoint_heldout
from worker.unlearning.interference.forget_targets import reference_forget_targets
from worker.unlearning.interference.retain import RetainLevel
from worker.unlearning.interference.targets import offset_target, request_target
from worker.unlearning.interference.unseen_offset import unseen_client_offset
from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.types import Partitions

TargetOffset = tuple[dict[str, dict[str, float]], dict[str, Any]]


def measure_target_offset(ctx: MethodContext, cfg: IAConfig) -> TargetOffset | None:
    """The reference target's offset measured on the held-out split's unseen clients with
    ``ctx.model`` as it is (``ia.target_offset``; :mod:`worker.unlearning.interference.unseen_offset`):
    per task the offset and the evidence; ``None`` when the option is off or the target constant."""
    if cfg.target != "references" or cfg.target_offset == "none":
        return None
    if ctx.references is None or not ctx.references.models:
        return {}, {"reason": "no reference adapters for this model"}
    return unseen_client_offset(
        ctx.model, ctx.references, ctx.tasks, heldout=ctx.heldout, heldout_clients=ctx.heldout_clients,
        forget_tasks=ctx.partitions.forget_tasks, device=ctx.device,
    )  # fmt: skip


def run_ia(
    ctx: MethodContext,
    retain_baseline: RetainLevel | None = None,
    retain_targets: Partitions | None = None,
    target_offset: TargetOffset | None = None,
) -> dict[str, Any]:
    """Algorithm 1 on ``ctx.model`` in place; early stopping on ``ctx.mia_target`` (else settings),
    or with ``ia.target: "references"`` on the per-client target of the OUT reference adapters
    (``info["target"]``: its values per reference, median, spread and seconds, or the fallback).
    With ``ia.forget_targets: "references"`` the forget term descends towards those references'
    predictions on D_f (``info["forget_targets"]``: how many, or why the labels were used).

    ``retain_baseline``: the pre-request accuracy on the retain check rows (``None``: the model as
    given), see :func:`worker.unlearning.interference.check_accuracy`. ``retain_targets``: the
    retain term's distilled targets (``ia.retain_distillation``) of the pre-request model; ``None``:
    of the model as given. ``target_offset``: the reference target's offset measured on the
    pre-request model (``ia.target_offset``; ``None``: measured on the model as given)."""
    cfg = IAConfig.from_settings(ctx.method_settings("ia"))
    offset = target_offset if target_offset is not None else measure_target_offset(ctx, cfg)
    # the per-client target and the checkpoints measure the same held-out rows (paired AUCs)
    heldout = checkpoint_heldout(ctx.heldout, cfg.checkpoint_heldout_rows, ctx.seed)
    reference, target_info = request_target(
        cfg, ctx.references, ctx.tasks, forget=ctx.partitions.forget, heldout=heldout,
        forget_tasks=ctx.partitions.forget_tasks, client_index=ctx.client_index, device=ctx.device,
    )  # fmt: skip
    if reference is not None and offset is not None:
        offsets, offset_info = offset
        reference = offset_target(reference, offsets)
        # ``tasks`` keeps the references' own values; ``target`` is what early stopping aims at
        target_info["offset"] = {
            "source": "unseen_clients",
            "applied": sorted(offsets),
            **offset_info,
            "target": {"mia_auc": reference.mia_auc, "accuracy": reference.accuracy,
                       "accuracy_gap": reference.accuracy_gap},
        }  # fmt: skip
    forget_targets, forget_info = None, {"source": "labels"}
    if cfg.forget_targets == "references":
        forget_targets, forget_info = reference_forget_targets(
            ctx.references, ctx.tasks, forget=ctx.partitions.forget,
            forget_tasks=ctx.partitions.forget_tasks, client_index=ctx.client_index, device=ctx.device,
        )  # fmt: skip
    # the whole held-out split: the update draws the same checkpoint rows from it (the same seed),
    # and ia.unseen_guard draws its rows from the split, never from the checkpoint subset
    info = interference_aware_unlearn(
        ctx.model,
        partitions=ctx.partitions,
        heldout=ctx.heldout,
        cfg=cfg,
        mia_target=ctx.mia_target,
        reference=reference,
        retain_baseline=retain_baseline,
        retain=ctx.retain,
        retain_targets=retain_targets,
        forget_targets=forget_targets,
        device=ctx.device,
        on_epoch=lambda epoch, epochs: ctx.stage(progress.UPDATE, epoch, epochs),
        **ctx.common_kwargs(),
    )
    info["target"] = target_info
    info["forget_targets"] = forget_info
    return info


@register("ia", config=IAConfig)
def ia_method(ctx: MethodContext) -> MethodResult:
    info = run_ia(ctx)
    return MethodResult(model=ctx.model, info={"method": "ia", "ia": info})
