"""``settings["ia"]``: switches and validation."""

from __future__ import annotations

import pytest

from worker.unlearning.interference.config import IAConfig


def test_config_switches_and_validation() -> None:
    cfg = IAConfig.from_settings({"projection": False, "orth_task": 0, "epochs": 3})
    assert cfg.retain_switches == {"clean": True, "inst": True, "task": False}
    assert not cfg.projection
    with pytest.raises(ValueError, match="unknown interference-aware setting"):
        IAConfig.from_settings({"eta3": 1})
