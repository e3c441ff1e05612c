"""``lethe bench noise``: the per-seed paired close differences of a result's variants, pooled."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench.noise import main, pooled_noise, variant_differences


def _run(method: str, seed: int, stage: int, unl: float) -> dict[str, Any]:
    close = None if method == "retrain" else {"a": abs(unl - 0.5) <= 0.05}
    return {"method": method, "setting": "FU", "stage": stage, "seed": seed, "uis": 0.3,
            "tasks": {"a": {"unl": unl, "mia_auc": 0.4}}, "close": close}  # fmt: skip


def _result() -> dict[str, Any]:
    """Seeds 1–2, two stages: ``default@x`` closes one more request-task on seed 1 and one fewer on
    seed 2; ``default@y`` changes nothing; ``ia@z`` is not a variant of ``default``."""
    unl = {"default": (0.60, 0.52, 0.52, 0.60), "default@x": (0.53, 0.52, 0.60, 0.60),
           "default@y": (0.60, 0.52, 0.52, 0.60), "ia@z": (0.5, 0.5, 0.5, 0.5),
           "retrain": (0.5, 0.5, 0.5, 0.5)}  # fmt: skip
    cells = [(seed, stage) for seed in (1, 2) for stage in (1, 2)]
    return {"runs": [_run(m, seed, stage, u) for m, us in unl.items()
                     for (seed, stage), u in zip(cells, us, strict=True)]}  # fmt: skip


def test_each_variant_is_paired_with_its_base_seed_by_seed() -> None:
    got = variant_differences(_result(), "default")
    assert [c["method"] for c in got] == ["default@x", "default@y"]
    assert got[0]["close_per_seed"] == {1: 1, 2: -1}
    assert got[0]["distance_mean_difference"] == pytest.approx((-0.07 + 0.0 + 0.08 + 0.0) / 4)
    assert got[1]["close_per_seed"] == {1: 0, 2: 0}


def test_the_pooled_spread_scales_with_the_square_root_of_the_seeds(tmp_path: Path, capsys: Any) -> None:
    comparisons = variant_differences(_result(), "default")
    noise = pooled_noise(comparisons)
    sd = statistics.stdev([1.0, -1.0, 0.0, 0.0])
    assert (noise["seed_differences"], noise["mean"]) == (4, 0.0)
    assert noise["sd"] == pytest.approx(sd)
    assert noise["sum_sd"][5] == pytest.approx(sd * math.sqrt(5))
    assert pooled_noise([])["sd"] is None
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"runs": _result()["runs"], "summary": [], "meta": {}}))
    out = tmp_path / "noise.json"
    assert main([str(path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "default@x" in text
    assert "close per seed [1, -1] (sum +0)" in text
    assert "pooled over 4 seed differences of 2 comparisons" in text
    assert json.loads(out.read_text())["pooled"]["seed_differences"] == 4
