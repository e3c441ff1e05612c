"""``default``: SSD dampening → interference-aware LoRA updates → subset-ID pruning (UNLEARNING.md).

Stage switches under ``settings["default"]``: ``ssd``, ``ia``, ``prune`` (all on by default) —
"SSD alone" is ``{"ia": false}``; the ablations of the interference-aware stage are switched under
``settings["ia"]``. ``ssd`` and ``ia`` may also be a mapping: the stage is on, with these settings
merged over ``settings["ssd"]`` / ``settings["ia"]`` (e.g. a milder dampening when the
interference-aware stage follows: ``{"ssd": {"lambda": 5}}``, while the ``ssd`` method alone keeps
its own). Pruning suppresses ``ctx.prune_outputs`` (the forgotten client's subset-ID output of a
client request) and re-applies ``ctx.pruned_outputs``.

The retain check of the interference-aware stage's early stopping (``ia.retain_tolerance``) is
measured on the model *before* SSD, so that the damage SSD does counts against the tolerance; the
retain term's distilled targets (``ia.retain_distillation``) are that model's predictions too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import dataclasses as pydantic_dataclasses

from worker.unlearning.config import SETTINGS, parse_settings
from worker.unlearning.interference import IAConfig, check_accuracy
from worker.unlearning.interference.distillation import distilled_retain_targets
from worker.unlearning.methods import Needs, register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.methods.ia import measure_target_offset, run_ia
from worker.unlearning.methods.ssd import run_ssd
from worker.unlearning.pruning import prune_outputs
from worker.unlearning.ssd import SSDConfig

STAGES = ("ssd", "ia", "prune")
#: the stages whose value may be a block of settings merged over the stage's own
BLOCKS = {"ssd": (SSDConfig, "SSD"), "ia": (IAConfig, "interference-aware")}


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class DefaultConfig:
    """``settings["default"]``: the stages SSD → interference-aware update → pruning (each on by
    default). ``ssd`` and ``ia`` are a switch or a block of settings merged over ``settings["ssd"]``
    / ``settings["ia"]`` (the stage on); ``prune`` is a switch."""

    ssd: bool | SSDConfig = True
    ia: bool | IAConfig = True
    prune: bool = True


def stage_settings(settings: Mapping[str, Any]) -> tuple[dict[str, bool], dict[str, dict[str, Any]]]:
    """``settings["default"]`` as (stage switches, per-stage setting overrides)."""
    raw = settings.get("default") or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"settings['default'] must be a mapping, not {type(raw).__name__}")
    overrides: dict[str, dict[str, Any]] = {}
    switches: dict[str, Any] = {}
    for stage, value in raw.items():
        if stage in BLOCKS and isinstance(value, Mapping):  # checked on its own: a message naming its key
            cls, what = BLOCKS[stage]
            parse_settings(cls, value, what)
            overrides[stage] = dict(value)
        else:
            switches[stage] = value
    cfg = parse_settings(DefaultConfig, switches, "default-method")
    return {stage: stage in overrides or bool(getattr(cfg, stage)) for stage in STAGES}, overrides


def stage_context(ctx: MethodContext, overrides: Mapping[str, Mapping[str, Any]]) -> MethodContext:
    """``ctx`` with each stage's overrides merged over its settings block."""
    if not overrides:
        return ctx
    settings = dict(ctx.settings)
    for stage, extra in overrides.items():
        settings[stage] = {**ctx.method_settings(stage), **extra}
    return dataclasses.replace(ctx, settings=settings)


def ssd_stage_settings(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The SSD settings ``default``'s SSD stage runs with (``None``: the stage is off)."""
    switches, overrides = stage_settings(settings)
    if not switches["ssd"]:
        return None
    return {**dict(settings.get("ssd") or {}), **overrides.get("ssd", {})}


@register("default", config=DefaultConfig, needs=Needs(full_importance=ssd_stage_settings))
def default_method(ctx: MethodContext) -> MethodResult:
    switches, overrides = stage_settings(ctx.settings)
    ctx = stage_context(ctx, overrides)
    info: dict[str, Any] = {"method": "default", "stages": switches, "stage_overrides": overrides}
    baseline = None
    cfg = IAConfig.from_settings(ctx.method_settings("ia"))
    if switches["ia"] and cfg.checks_retain:
        baseline = check_accuracy(
            ctx.model, ctx.tasks, ctx.partitions, cfg, seed=ctx.seed, device=ctx.device, retain=ctx.retain
        )
    # the retain term's targets are the pre-request model's, before SSD changes it (β = 0: the labels)
    retain_targets = (
        distilled_retain_targets(ctx.model, ctx.partitions, ctx.tasks, cfg, ctx.device)
        if switches["ia"]
        else None
    )
    # the target's offset is measured on the version's model before SSD changes it: on an unseen
    # client that model is what a retrain without the client is
    offset = measure_target_offset(ctx, cfg) if switches["ia"] else None
    if switches["ssd"]:
        ctx.progress("default: ssd")
        info["ssd"] = run_ssd(ctx)
    if switches["ia"]:
        ctx.progress("default: interference-aware update")
        info["ia"] = run_ia(
            ctx, retain_baseline=baseline, retain_targets=retain_targets, target_offset=offset
        )
    pruned: list[int] = []
    if switches["prune"]:
        pruned = sorted({int(o) for o in ctx.prune_outputs})
        prune_outputs(ctx.model, [*ctx.pruned_outputs, *pruned])
        info["pruned_outputs"] = pruned
    return MethodResult(model=ctx.model, info=info, pruned_outputs=pruned)
