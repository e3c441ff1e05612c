"""worker.unlearning.continuation: the settings the acceptance check's continuation runs with."""

from __future__ import annotations

from typing import Any

import pytest

from worker.unlearning.continuation import CONTINUATION_METHOD, continuation_settings, stage_block
from worker.unlearning.interference import IAConfig

IA = {"lr": 1e-3, "epochs": 5, "patience": 10, "min_steps": 10}
SETTINGS: dict[str, Any] = {
    "ia": IA,
    "default": {"ssd": {"alpha": 3.0}, "ia": {"target": "references", "epochs": 10, "stop_within": 0.02}},
    "anchor_fraction": 0.1,
}


def test_defaults_stage_block_is_its_own_merged_over_the_ia_settings() -> None:
    merged = {**IA, "epochs": 10, "target": "references", "stop_within": 0.02}
    assert stage_block(SETTINGS, "default") == merged
    assert stage_block(SETTINGS, "ia") == SETTINGS["ia"]
    assert stage_block({"default": {"ia": False}}, "default") is None
    assert stage_block(SETTINGS, "ssd") is None
    assert stage_block(SETTINGS, "retrain") is None


def test_the_continuation_keeps_the_stage_and_stops_at_the_checks_bound() -> None:
    out = continuation_settings(SETTINGS, "default", 100, 2.0)
    assert out is not None
    assert {k: v for k, v in out.items() if k != CONTINUATION_METHOD} == {
        k: v for k, v in SETTINGS.items() if k != CONTINUATION_METHOD
    }  # everything else as the round had it (the anchor fraction too)
    cfg = IAConfig.from_settings(out[CONTINUATION_METHOD])  # valid settings
    assert cfg.lr == 1e-3  # the stage's own step size
    assert (cfg.max_steps, cfg.min_steps, cfg.patience, cfg.stop_within) == (100, 0, 0, 0.0)
    assert cfg.epochs >= cfg.max_steps  # the step budget, not the epochs, ends it
    assert (cfg.forget_accuracy_z, cfg.stop_at_unseen_level, cfg.target) == (2.0, True, "constant")
    assert cfg.checkpoint_heldout_rows == 0  # every held-out row, as the check
    assert cfg.early_stopping
    # a stage that holds its forget term past the target does not hold it short of the bound
    holding = {**SETTINGS, "default": {**SETTINGS["default"], "ia": {"hold_past_target": True}}}
    held = continuation_settings(holding, "default", 100, 2.0)
    assert held is not None
    assert stage_block(holding, "default")["hold_past_target"]  # type: ignore[index]
    assert not IAConfig.from_settings(held[CONTINUATION_METHOD]).hold_past_target


@pytest.mark.parametrize(
    ("method", "steps", "z"), [("default", 0, 2.0), ("default", 100, 0.0), ("ssd", 100, 2.0)]
)
def test_no_continuation_without_a_budget_a_bound_or_a_stage(method: str, steps: int, z: float) -> None:
    assert continuation_settings(SETTINGS, method, steps, z) is None
