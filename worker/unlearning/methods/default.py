"""``default``: SSD dampening → interference-aware LoRA updates → subset-ID pruning (UNLEARNING.md).

Stage switches under ``settings["default"]``: ``ssd``, ``ia``, ``prune`` (booleans, all on by
default) — "SSD alone" is ``{"ia": false}``; the ablations of the interference-aware stage are
switched under ``settings["ia"]``. Pruning suppresses ``ctx.prune_outputs`` (the forgotten client's
subset-ID output of a client request) and re-applies ``ctx.pruned_outputs``.

The retain check of the interference-aware stage's early stopping (``ia.retain_tolerance``) is
measured on the model *before* SSD, so that the damage SSD does counts against the tolerance.
"""

from __future__ import annotations

from typing import Any

from worker.unlearning.interference import IAConfig, check_accuracy
from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.methods.ia import run_ia
from worker.unlearning.methods.ssd import run_ssd
from worker.unlearning.pruning import prune_outputs

STAGES = ("ssd", "ia", "prune")


def stage_switches(ctx: MethodContext) -> dict[str, bool]:
    raw = ctx.method_settings("default")
    unknown = sorted(set(raw) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown default-method settings {unknown} (stages: {list(STAGES)})")
    return {stage: bool(raw.get(stage, True)) for stage in STAGES}


@register("default")
def default_method(ctx: MethodContext) -> MethodResult:
    switches = stage_switches(ctx)
    info: dict[str, Any] = {"method": "default", "stages": switches}
    baseline = None
    if switches["ia"]:
        cfg = IAConfig.from_settings(ctx.method_settings("ia"))
        baseline = check_accuracy(ctx.model, ctx.tasks, ctx.partitions, cfg, seed=ctx.seed, device=ctx.device)
    if switches["ssd"]:
        ctx.progress("default: ssd")
        info["ssd"] = run_ssd(ctx)
    if switches["ia"]:
        ctx.progress("default: interference-aware update")
        info["ia"] = run_ia(ctx, retain_baseline=baseline)
    pruned: list[int] = []
    if switches["prune"]:
        pruned = sorted({int(o) for o in ctx.prune_outputs})
        prune_outputs(ctx.model, [*ctx.pruned_outputs, *pruned])
        info["pruned_outputs"] = pruned
    return MethodResult(model=ctx.model, info=info, pruned_outputs=pruned)
