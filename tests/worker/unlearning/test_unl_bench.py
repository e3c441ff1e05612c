"""The benchmark core writes the JSON format of issue #3 (smoke preset on the toy workload)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.unlearning.bench import PRESETS, format_table, registered_methods, run_bench
from worker.unlearning.methods import available_methods
from worker.unlearning.workloads.toy import ToyWorkload


def test_bench_smoke_writes_the_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        "smoke", out, seeds=[3], workload=ToyWorkload(), methods=["original", "retrain", "ssd"]
    )
    data = json.loads(out.read_text())
    assert data["runs"] == result["runs"]
    runs = data["runs"]
    assert {(r["stage"], r["method"]) for r in runs} == {
        (s, m) for s in (1, 2) for m in ("original", "retrain", "ssd")
    }
    for r in runs:
        assert set(r) == {
            "setting",
            "stage",
            "method",
            "seed",
            "uis",
            "wall_s",
            "importance_precompute_s",
            "tasks",
        }
        # nothing here computes I_D ahead: the ssd method's reference layout ends D with the
        # request's own forget set (default's stage, which does, is in test_unl_engine.py)
        assert r["importance_precompute_s"] == 0.0
        assert r["setting"] == "FU"
        assert r["seed"] == 3
        assert r["wall_s"] >= 0.0
        assert set(r["tasks"]) == {"kind", "side"}
        for metrics in r["tasks"].values():
            assert set(metrics) == {"ret", "unl", "val", "mia_auc"}
        if r["method"] == "retrain":
            assert r["uis"] is None
        else:
            assert isinstance(r["uis"], float)
    assert "lethe bench" in capsys.readouterr().out
    assert "total wall" in format_table(result)


def test_full_preset_runs_every_registered_method_and_quick_the_core_five() -> None:
    assert PRESETS["full"].methods is None  # resolved to the registry when the bench runs
    full = registered_methods()
    assert sorted(full) == sorted(available_methods())
    assert full[:2] == ["original", "retrain"]
    assert full[-1] == "default"
    assert PRESETS["quick"].methods == ("original", "retrain", "ssd", "ia", "default")
