"""``ia``: interference-aware LoRA updates alone (settings key ``"ia"``; see
``worker.unlearning.interference``)."""

from __future__ import annotations

from typing import Any

from worker.unlearning.interference import IAConfig, interference_aware_unlearn
from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult


def run_ia(ctx: MethodContext) -> dict[str, Any]:
    """Algorithm 1 on ``ctx.model`` in place; early stopping on ``ctx.mia_target`` (else settings)."""
    cfg = IAConfig.from_settings(ctx.method_settings("ia"))
    return interference_aware_unlearn(
        ctx.model,
        tasks=ctx.tasks,
        partitions=ctx.partitions,
        heldout=ctx.heldout,
        cfg=cfg,
        seed=ctx.seed,
        mia_target=ctx.mia_target,
        device=ctx.device,
        progress=ctx.on_progress,
    )


@register("ia")
def ia_method(ctx: MethodContext) -> MethodResult:
    info = run_ia(ctx)
    return MethodResult(model=ctx.model, info={"method": "ia", "ia": info})
