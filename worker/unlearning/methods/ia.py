"""``ia``: interference-aware LoRA updates alone (settings key ``"ia"``; see
``worker.unlearning.interference``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.unlearning import progress
from worker.unlearning.interference import IAConfig, interference_aware_unlearn
from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult


def run_ia(ctx: MethodContext, retain_baseline: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Algorithm 1 on ``ctx.model`` in place; early stopping on ``ctx.mia_target`` (else settings).

    ``retain_baseline``: the pre-request accuracy on the retain check rows (``None``: the model as
    given), see :func:`worker.unlearning.interference.check_accuracy`."""
    return interference_aware_unlearn(
        ctx.model,
        partitions=ctx.partitions,
        heldout=ctx.heldout,
        cfg=IAConfig.from_settings(ctx.method_settings("ia")),
        mia_target=ctx.mia_target,
        retain_baseline=retain_baseline,
        retain=ctx.retain,
        device=ctx.device,
        on_epoch=lambda epoch, epochs: ctx.stage(progress.UPDATE, epoch, epochs),
        **ctx.common_kwargs(),
    )


@register("ia", config=IAConfig)
def ia_method(ctx: MethodContext) -> MethodResult:
    info = run_ia(ctx)
    return MethodResult(model=ctx.model, info={"method": "ia", "ia": info})
