"""The acceptance check's continuation (issue 8 part 3: "on failure: continue within a step budget
or a stronger setting, then fall back to the exact path").

When a round's update fails its acceptance check only on forget bounds (a forget set still above
the unseen-data level), the interference-aware stage runs once more for each such request, from the
model the round was about to publish, before the exact path (``retrain``) is paid for:

- the same interference-aware settings as the method's stage (``settings["ia"]``, with
  ``default``'s own block merged over it), and at most ``acceptance.continue_steps`` optimiser steps;
- early stopping aims at the acceptance check's forget bound instead of a target AUC: it keeps the
  first checkpoint whose every forgotten task is at the unseen-data level (held-out metric +
  ``acceptance.forget_z`` standard errors, ``ia.forget_accuracy_z``) and stops there
  (``ia.stop_at_unseen_level``), measured on every held-out row as the check is;
- SSD does not run again (it would dampen the same weights a second time) and the retain check's
  baseline is the model the continuation starts from.

Then the round checks every request again; a failure still falls back to the exact path. Nothing
here trains or reads a retrain: the continuation uses the forget set, the anchor and the held-out
(unseen-population) split, as the method does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.unlearning.methods.default import stage_settings

#: the method the continuation runs (its settings key): the interference-aware stage alone
CONTINUATION_METHOD = "ia"


def stage_block(settings: Mapping[str, Any], method: str) -> dict[str, Any] | None:
    """The interference-aware settings ``method`` ran its stage with (``None``: it has none)."""
    own = dict(settings.get("ia") or {})
    if method == "ia":
        return own
    if method == "default":
        switches, overrides = stage_settings(settings)
        return {**own, **overrides.get("ia", {})} if switches["ia"] else None
    return None


def continuation_settings(
    settings: Mapping[str, Any], method: str, steps: int, forget_z: float
) -> dict[str, Any] | None:
    """The round's settings with ``settings["ia"]`` replaced by the continuation's (see the module
    doc); ``None`` when there is no continuation: ``steps`` 0, ``forget_z`` 0 (no bound to stop
    at), or a method without an interference-aware stage."""
    block = stage_block(settings, method)
    if block is None or steps <= 0 or forget_z <= 0:
        return None
    block.update(
        early_stopping=True,
        target="constant",  # the stop is the forget bound, not a reference's AUC
        forget_accuracy_z=forget_z,
        stop_at_unseen_level=True,
        checkpoint_heldout_rows=0,  # every held-out row, as the check measures
        max_steps=steps,
        epochs=steps,  # every epoch is at least one step: max_steps is the budget
        min_steps=0,
        patience=0,
        stop_within=0.0,
        stop_within_spread=0.0,
        target_offset="none",
        hold_past_target=False,  # its aim is the bound: holding at a target could stop short of it
    )
    return {**settings, CONTINUATION_METHOD: block}
