"""``bench.round_wall`` (docs/benchmarks.md, "Default's wall on scenes") on the toy workload: one
row per (client, method) with the method's CPU time measured, the directory prepared once and
reused, and ``engine.apply_method`` restored afterwards."""

from __future__ import annotations

from pathlib import Path

from bench import round_wall
from worker.unlearning import engine
from worker.unlearning.workloads.toy import ToyWorkload


def test_rows_per_client_and_method_and_the_engine_restored(tmp_path: Path) -> None:
    apply = engine.apply_method
    wl = ToyWorkload(num_clients=3, per_client=12)
    rows = round_wall.measure(tmp_path, wl, ["u0", "u1"], ["default", "retrain"])
    assert [(r["client"], r["method"]) for r in rows] == [
        ("u0", "default"), ("u0", "retrain"), ("u1", "default"), ("u1", "retrain"),
    ]  # fmt: skip
    assert engine.apply_method is apply
    for row in rows:
        assert row["device"] == "cpu"
        assert 0 < row["method_cpu_s"] <= row["round_cpu_s"]
        assert 0 < row["method_wall_s"] <= row["round_wall_s"]
        # the acceptance check's path: the method's update (continued or not) or the exact path
        assert row["path"] in {row["method"], f"{row['method']}+continuation", "retrain"}
        assert set(row["forget_auc"]) == {"kind", "side"}
        assert (tmp_path / f"out-{row['method']}-{row['client']}").is_dir()
        # the published model's failed checks: the method's own where its update was published
        if row["path"] == row["method"]:
            assert row["published_failed"] == row["method_failed"]
        assert all(c["what"] and c["detail"] for c in row["published_failed"])
    v1 = (tmp_path / "v1").stat().st_mtime_ns
    again = round_wall.measure(tmp_path, wl, ["u2"], ["default"])  # reuses the prepared directory
    assert (tmp_path / "v1").stat().st_mtime_ns == v1
    assert len(again) == 1


def test_repeated_method_runs_restore_the_model_and_publish_the_same_round(tmp_path: Path) -> None:
    """``repeat``: the method runs N times on the round's context, the model restored between runs,
    so the round's outcome is the single run's (the same forget-vs-unseen AUCs)."""
    wl = ToyWorkload(num_clients=3, per_client=12)
    once = round_wall.measure(tmp_path, wl, ["u0"], ["default"])[0]
    thrice = round_wall.measure(tmp_path, wl, ["u0"], ["default"], repeat=3)[0]
    assert len(once["method_cpu_runs_s"]) == 1
    assert len(thrice["method_cpu_runs_s"]) == len(thrice["method_wall_runs_s"]) == 3
    assert thrice["method_cpu_s"] == sorted(thrice["method_cpu_runs_s"])[1]
    assert thrice["forget_auc"] == once["forget_auc"]


def test_reference_adapters_are_prepared_with_the_model_and_read_by_every_round(tmp_path: Path) -> None:
    """Settings that ask for reference adapters: preparation trains them into ``DIR/references``
    and each round's ``default`` aims at their per-client target (without them it would fall back
    to the constant, and the row would say so)."""
    wl = ToyWorkload(num_clients=4, per_client=12)
    settings = {"audit": {"reference_adapters": 2}, "default": {"ia": {"target": "references"}}}
    row = round_wall.measure(tmp_path, wl, ["u0"], ["default"], settings=settings)[0]
    assert (tmp_path / "references").is_dir()
    assert row["target"]["source"] == "references"
    assert row["target"]["wall_s"] > 0
    assert row["update"]["steps"] == row["update"]["checkpoints"][-1]["steps"] > 0
    # each checkpoint's retain drop from the pre-request model, what decides whether early
    # stopping may keep it
    drops = [c["retain_drop"] for c in row["update"]["checkpoints"]]
    assert len(drops) >= 2
    assert all(isinstance(d, float) and -1 <= d <= 1 for d in drops)
    # and what the gate judged: the same drop without ``ia.retain_noise_z``
    assert [c["retain_gate"] for c in row["update"]["checkpoints"]] == drops
