"""``retrain``: exact unlearning — a fresh adapter trained on the retain set with the v1 recipe.

The gold reference of audits and benchmarks (it never saw the forgotten data). Needs ``ctx.retain``
(the full retain set) and ``ctx.base`` (the frozen base network); the training recipe is
``settings["train"]`` / ``settings["lora"]`` (:class:`worker.unlearning.training.TrainConfig`).
"""

from __future__ import annotations

from worker.unlearning import progress
from worker.unlearning.methods import Needs, register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.model import MultiTaskModel
from worker.unlearning.pruning import prune_outputs
from worker.unlearning.training import TrainConfig, retrain


@register("retrain", needs=Needs(retain=True, base=True))
def retrain_method(ctx: MethodContext) -> MethodResult:
    if ctx.retain is None or not isinstance(ctx.base, MultiTaskModel):
        raise ValueError("retrain needs the retain set and the frozen base network in its context")
    cfg = TrainConfig.from_settings(ctx.settings)
    ctx.stage(progress.UPDATE)  # one training run: no steps reported
    model = retrain(ctx.base, ctx.retain, ctx.tasks, cfg, seed=ctx.seed, device=ctx.device)
    prune_outputs(model, [*ctx.pruned_outputs, *ctx.prune_outputs])
    return MethodResult(
        model=model,
        info={"method": "retrain", "retain_samples": len(ctx.retain), "train_config": cfg.to_json()},
        pruned_outputs=sorted({int(o) for o in ctx.prune_outputs}),
    )
