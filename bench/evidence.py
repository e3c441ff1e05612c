"""Reading a request's evidence in the benchmarks (no torch: the latency bench imports it too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def ia_target(method_info: Any) -> Mapping[str, Any] | None:
    """The early-stopping target the interference-aware stage recorded (``run_ia``'s
    ``info["target"]``: source, reason, per-task values, seconds), or ``None`` for a method without
    one. ``ia`` and ``default`` both nest that stage's info under ``"ia"``; an info without that key
    is read as the stage's own."""
    if not isinstance(method_info, Mapping):
        return None
    stage = method_info.get("ia", method_info)
    target = stage.get("target") if isinstance(stage, Mapping) else None
    return target if isinstance(target, Mapping) else None


def ia_steps(method_info: Any) -> Mapping[str, Any] | None:
    """What the interference-aware stage's update ran: optimiser steps, passes over D_f, what ended
    it (``stopped``), the kept checkpoint (its pass, steps and distance); per checkpoint its steps,
    distance to the target, retain drop (early stopping keeps only checkpoints within
    ``ia.retain_tolerance`` of it) and the forgotten tasks' MIA AUC and forget-set metric; per
    forgotten task the steps its forget term was held past the target (``ia.hold_past_target``;
    ``None`` when off); and each return to the kept checkpoint (``ia.refine_rounds``: steps, from
    which checkpoint's steps, the new learning rate) (``None`` for a method without that stage).
    Read as :func:`ia_target` reads the target."""
    if not isinstance(method_info, Mapping):
        return None
    stage = method_info.get("ia", method_info)
    if not isinstance(stage, Mapping) or "steps" not in stage:
        return None
    history = stage.get("history") or []
    return {
        "steps": stage.get("steps"),
        "epochs_run": stage.get("epochs_run"),
        "stopped": stage.get("stopped"),
        "best_epoch": stage.get("best_epoch"),
        "best_steps": stage.get("best_steps"),
        "best_distance": stage.get("best_distance"),
        "held_steps": stage.get("held_steps"),
        "refinements": stage.get("refinements") or [],
        "checkpoints": [
            {
                "steps": h.get("steps"),
                "distance": h.get("distance"),
                "retain_drop": h.get("retain_drop"),
                "retain_gate": h.get("retain_gate"),
                # per forgotten task as measured at the checkpoint: a stop rule can be replayed
                # on a run's rows (docs/benchmarks.md, "Stopping inside the references' spread")
                "mia_auc": h.get("mia_auc"),
                "forget_accuracy": h.get("forget_accuracy"),
                **({"inside_spread": h["inside_spread"]} if "inside_spread" in h else {}),
            }
            for h in history
            if isinstance(h, Mapping)
        ],
    }


def failed_checks(acceptance: Any) -> list[dict[str, Any]]:
    """The acceptance checks of a request's evidence that failed: the method's own (``method_checks``,
    where the round fell back to the exact retrain) or else the published model's, each as
    ``{what, detail, margin}`` (empty when every check passed or none ran)."""
    if not isinstance(acceptance, Mapping):
        return []
    return failed_of(acceptance.get("method_checks") or acceptance.get("checks"))


def failed_of(checks: Any) -> list[dict[str, Any]]:
    """The failed ones of a list of acceptance checks (evidence JSON), each as
    ``{what, detail, margin}``; empty for ``None``."""
    return [
        {k: c.get(k) for k in ("what", "detail", "margin")}
        for c in checks or []
        if isinstance(c, Mapping) and not c.get("ok", True)
    ]
