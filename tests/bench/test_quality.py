"""The benchmark core writes the JSON format of issue #3 (smoke preset on the toy workload), and
runs fair (issue 8, part 6): tuning seeds apart from evaluation seeds, one anchor fraction, UNO's
paper step count, a second retrain as the noise floor, the close-to-retrain share beside UIS."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel

from bench import quality
from bench.quality import PRESETS, TUNED_QUICK, TUNING_GRIDS, fair_settings, run_bench, work_units
from bench.report import format_table
from bench.scoring import SECOND_RETRAIN, registered_methods, served_paths, target_close_by_method
from worker.unlearning.engine import StageResult, anchor_fraction, run_stage
from worker.unlearning.methods import available_methods
from worker.unlearning.workloads.digits import DigitsClients
from worker.unlearning.workloads.toy import ToyWorkload


def test_bench_with_references_refreshes_them_between_stages_and_records_the_target(tmp_path: Path) -> None:
    """``references=K``: K reference adapters per seed (timed off the method's wall), dropped and
    retrained between stages on their half minus the forgotten clients; an extra variant with
    ``ia.target: "references"`` aims at them (its rows record the target), the plain one at 0.5."""
    refs = {"default": {"ia": {"target": "references", "epochs": 2}}}
    result = run_bench(
        "smoke", None, seeds=[3], workload=ToyWorkload(num_clients=4, per_client=10), methods=["default"],
        references=2, extra_variants={"default@refs": ("default", refs)}, echo=None,
        settings_overrides={"ia": {"epochs": 2}},
    )  # fmt: skip
    meta = result["meta"]["references"]
    assert meta["k"] == 2
    assert meta["train_s"]["3"] > 0
    # stage 1's client was IN one of the two references: dropped and retrained before stage 2
    assert [(r["dropped"], r["refreshed"]) for r in meta["refresh_s"]] in ([([0], [0])], [([1], [1])])
    rows = {(r["method"], r["stage"]): r for r in result["runs"]}
    for stage in (1, 2):
        assert rows[("default", stage)]["target"]["source"] == "constant"
        target = rows[("default@refs", stage)]["target"]
        assert target["source"] == "references"
        assert set(target["tasks"]) == {"kind", "side"}
        assert all(t["references"] == 1 for t in target["tasks"].values())
        update = rows[("default@refs", stage)]["update"]
        assert update["steps"] > 0
        assert update["stopped"] in ("within_target", "patience", "budget")
        assert update["checkpoints"][0]["steps"] == 0
        # scored against the stage's reference retrain: a constant target has none to score
        assert rows[("default", stage)]["target_close"] is None
        assert set(rows[("default@refs", stage)]["target_close"]) == set(
            rows[("default@refs", stage)]["close"]
        )
    assert result["meta"]["method_settings"]["default@refs"] == refs
    assert set(target_close_by_method(result["runs"])) == {"default@refs"}


def test_the_bench_trains_as_many_references_as_the_workload_gives_a_model() -> None:
    """Without ``references`` the bench follows the settings' ``audit.reference_adapters`` (a
    workload whose ``default`` aims at references is benchmarked as the worker runs it); an explicit
    0 still turns them off."""
    toy = ToyWorkload(num_clients=4, per_client=10)
    settings = {"audit": {"reference_adapters": 2}}
    kwargs: dict[str, Any] = {"seeds": [3], "workload": toy, "methods": ["original"], "echo": None}
    assert run_bench("smoke", None, settings_overrides=settings, **kwargs)["meta"]["references"]["k"] == 2
    off = run_bench("smoke", None, settings_overrides=settings, references=0, **kwargs)["meta"]["references"]
    assert off == {"k": 0, "train_s": {}, "refresh_s": []}


def test_bench_smoke_writes_the_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        "smoke", out, seeds=[3], workload=ToyWorkload(), methods=["original", "retrain", "ssd"]
    )
    data = json.loads(out.read_text())
    assert data["runs"] == result["runs"]
    runs = data["runs"]
    methods = ("original", "retrain", SECOND_RETRAIN, "ssd")
    assert {(r["stage"], r["method"]) for r in runs} == {(s, m) for s in (1, 2) for m in methods}
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
            "close",
            "earlier",
            "target",
            "target_close",
            "update",
            "served",
        }
        assert r["served"] is None  # no row is a --served twin
        assert r["target"] is None  # no method here has an early-stopping target
        assert r["target_close"] is None
        assert r["update"] is None  # nor an interference-aware update
        # stage 2 scores every model but the reference on stage 1's forget set too
        if r["stage"] == 1 or r["method"] == "retrain":
            assert r["earlier"] is None
        else:
            assert set(r["earlier"]) == {"1:kind", "1:side"}
            assert all(-1.0 <= g <= 1.0 for g in r["earlier"].values())
        # nothing here computes I_D ahead: the ssd method's reference layout ends D with the
        # request's own forget set (default's stage, which does, is in test_unl_engine.py)
        assert r["importance_precompute_s"] == 0.0
        assert r["setting"] == "FU"
        assert r["seed"] == 3
        assert r["wall_s"] >= 0.0
        assert set(r["tasks"]) == {"kind", "side"}
        for metrics in r["tasks"].values():
            # val_rest: Val on the held-out rows ia.unseen_guard never differentiates
            assert set(metrics) == {"ret", "unl", "val", "mia_auc", "val_rest"}
            assert 0.0 <= metrics["val_rest"] <= 1.0
        if r["method"] == "retrain":
            assert r["uis"] is None
            assert r["close"] is None  # the reference itself
        else:
            assert isinstance(r["uis"], float)
            assert set(r["close"]) <= {"kind", "side"}  # FU: every task is a request-task
    for row in data["summary"]:
        if row["method"] == "retrain":
            assert row["close_fraction"] is None
        else:
            assert row["close_n"] >= 1
            assert 0.0 <= row["close_fraction"] <= 1.0
    meta = data["meta"]
    assert meta["tuning"]["ran"] is False
    assert meta["tuning"]["seeds"] == [100]
    assert meta["evaluation_seeds"] == [3]
    assert {"torch", "cpu_capability", "threads"} <= set(meta["environment"])
    out_text = capsys.readouterr().out
    assert "lethe bench" in out_text
    assert "close" in out_text
    assert SECOND_RETRAIN in out_text
    assert "total wall" in format_table(result)
    assert "earlier forget sets" in format_table(result)
    # the quality bench draws its plots beside the JSON (tests/bench/test_plots.py checks them)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "bench-uis-by-stage.png",
        "bench-uis-vs-wall.png",
    ]


def test_tuning_runs_the_grid_on_the_tuning_seeds_only(tmp_path: Path) -> None:
    """Issue 8 part 6 (defect: settings tuned on the seeds the benchmark reports): ``tune_grid``
    scores every grid value on the tuning seeds and reports the chosen one on the evaluation seeds."""
    result = run_bench(
        "smoke",
        tmp_path / "b.json",
        seeds=[3],
        workload=ToyWorkload(),
        methods=["retrain", "ssd"],
        tune_grid=True,
        tuning_seeds=[101],
        echo=None,
    )
    tuning = result["meta"]["tuning"]
    assert tuning["ran"] is True
    assert tuning["seeds"] == [101]
    values = list(TUNING_GRIDS["ssd"][1])
    assert [row["value"] for row in tuning["scores"]["ssd"]] == values
    assert all(row["n"] == 2 for row in tuning["scores"]["ssd"])  # 1 seed × 2 stages each
    best = min(tuning["scores"]["ssd"], key=lambda row: row["median_uis"])
    assert tuning["chosen"] == {"ssd": best["value"]}
    assert result["meta"]["method_settings"]["ssd"] == {"ssd": {"alpha": best["value"]}}
    # evaluation rows are the evaluation seed's only, under the method's plain name
    assert {r["seed"] for r in result["runs"]} == {3}
    assert {r["method"] for r in result["runs"]} == {"retrain", SECOND_RETRAIN, "ssd"}


def test_second_retrain_is_scored_on_partial_task_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise floor has a UIS and a close share on PU requests too (its kept tasks are scored
    against its own model before the request, as a method's are)."""
    pu = dataclasses.replace(PRESETS["smoke"], settings=("PU:kind",))
    monkeypatch.setitem(PRESETS, "pu", pu)
    result = run_bench("pu", None, seeds=[3], workload=ToyWorkload(), methods=["retrain"], echo=None)
    rows = [r for r in result["runs"] if r["method"] == SECOND_RETRAIN]
    assert [r["stage"] for r in rows] == [1, 2]
    for r in rows:
        assert isinstance(r["uis"], float)
        assert set(r["close"]) == {"kind"}  # only the forgotten task is a request-task


def test_without_the_second_retrain_no_noise_floor_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``second_retrain=False`` (a variant comparison whose noise floor an earlier run measured):
    no ``retrain_2`` rows, every other row as a run with it (so the two runs can be read together),
    the JSON says so, and the close-share goal is left open, not judged."""
    result = run_bench(
        "smoke", None, seeds=[3], workload=ToyWorkload(), methods=["retrain", "ssd"], echo=None,
        second_retrain=False,
    )  # fmt: skip
    assert {r["method"] for r in result["runs"]} == {"retrain", "ssd"}
    full = run_bench("smoke", None, seeds=[3], workload=ToyWorkload(), methods=["retrain", "ssd"], echo=None)
    assert [(r["method"], r["uis"], r["tasks"]) for r in full["runs"] if r["method"] != SECOND_RETRAIN] == [
        (r["method"], r["uis"], r["tasks"]) for r in result["runs"]
    ]
    assert result["meta"]["second_retrain"] is False
    assert all(c["retrain_2_close_fraction"] is None for c in result["goals"]["per_stage"])
    assert result["goals"]["close_goal_met_count"] == "0/0"
    with pytest.raises(ValueError, match="exact path"):
        run_bench(
            "smoke", None, seeds=[3], workload=ToyWorkload(), methods=["ssd"], served=["ssd"],
            second_retrain=False, echo=None,
        )  # fmt: skip


def test_tuning_seeds_must_differ_from_evaluation_seeds() -> None:
    with pytest.raises(ValueError, match="tuning seeds"):
        run_bench("smoke", None, seeds=[100], workload=ToyWorkload(), tune_grid=True, echo=None)


def test_one_anchor_fraction_for_every_method() -> None:
    """Issue 8 part 6 (defect: default and ia ran with anchor 0.5, the baselines with 0.1)."""
    raw = DigitsClients().default_settings()
    assert anchor_fraction(raw, "default") != anchor_fraction(raw, "ssd")  # the old, unfair settings
    fair = fair_settings(raw, PRESETS["quick"].anchor_fraction)
    assert "anchor_fractions" not in fair
    assert {anchor_fraction(fair, m) for m in available_methods()} == {PRESETS["quick"].anchor_fraction}
    # None keeps the workload's single value
    assert {anchor_fraction(fair_settings(raw, None), m) for m in available_methods()} == {0.1}


def test_uno_runs_its_paper_step_count_and_quick_uses_the_committed_tuning() -> None:
    """Issue 8 part 6 (defect: UNO ran 30 steps instead of the paper's K = 530)."""
    for name in ("quick", "full"):
        assert PRESETS[name].overrides["uno"]["epochs"] == 530
        assert not set(PRESETS[name].seeds) & set(PRESETS[name].tuning_seeds)
    assert dict(PRESETS["quick"].tuned) == TUNED_QUICK
    assert set(TUNED_QUICK) <= set(TUNING_GRIDS)
    assert all(v in TUNING_GRIDS[m][1] for m, v in TUNED_QUICK.items())


def test_full_preset_runs_every_registered_method_and_quick_the_core_five() -> None:
    assert PRESETS["full"].methods is None  # resolved to the registry when the bench runs
    full = registered_methods()
    assert sorted(full) == sorted(available_methods())
    assert full[:2] == ["original", "retrain"]
    assert full[-1] == "default"
    assert PRESETS["quick"].methods == ("original", "retrain", "ssd", "ia", "default")


def test_every_method_of_every_stage_runs_through_run_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7 part 6 (defect: ``_run_setting`` had a copy of the round's stage loop): each request
    of each approximate method runs through ``engine.run_stage``, as a round's requests do; the
    retrains only score them."""
    calls: list[tuple[str, str, int]] = []

    def spy(*args: Any, **kwargs: Any) -> tuple[PeftModel, StageResult]:
        calls.append((args[2].request_id, kwargs["method"], kwargs["stage"]))
        return run_stage(*args, **kwargs)

    monkeypatch.setattr(quality, "run_stage", spy)
    run_bench(
        "smoke", None, seeds=[3], workload=ToyWorkload(), methods=["retrain", "original", "ssd"], echo=None
    )
    assert [(m, s) for _, m, s in calls] == [("original", 1), ("ssd", 1), ("original", 2), ("ssd", 2)]
    assert calls[0][0] == calls[1][0] != calls[2][0]  # one request per stage, the same for every method


def test_served_rows_score_what_a_round_publishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``served=["default"]``: a twin row per stage scored on the model a round would publish. Stage 1's
    update fails a forget bound and passes after the acceptance check's continuation: the continued
    model is served. Stage 2's fails again after it: the exact path is served, which in the bench is the
    stage's second retrain (the round's own retrain would be the scoring reference, seed for seed),
    checked in turn as a round checks its exact path."""
    from worker.unlearning import engine
    from worker.unlearning.acceptance import Check

    fails = [Check("forgotten: forget set, kind", False, "above the unseen level", margin=-0.01)]
    passes = [Check("forgotten: forget set, kind", True, "ok", margin=0.01)]
    # stage 1: the update, its continuation; stage 2: the same, then the exact path's own check
    answers = [fails, passes, fails, fails, passes]
    calls: list[int] = []

    def check(*args: object, **kwargs: object) -> list[Check]:
        calls.append(1)
        return answers[len(calls) - 1]

    monkeypatch.setattr(engine, "check_request", check)  # the round's checks, the exact path's too
    result = run_bench(
        "smoke", None, seeds=[3], workload=ToyWorkload(num_clients=4, per_client=10), methods=["default"],
        served=["default"], echo=None, settings_overrides={"ia": {"epochs": 2}},
    )  # fmt: skip
    assert len(calls) == 5
    assert result["meta"]["served"] == ["default+served"]
    rows = {(r["method"], r["stage"]): r for r in result["runs"]}
    assert rows[("default", 1)]["served"] is None  # the method's update alone, as before
    first = rows[("default+served", 1)]["served"]
    assert (first["path"], first["continued"], first["failed"]) == ("default+continuation", True, [])
    assert first["method_failed"] == ["forgotten: forget set, kind"]
    assert first["continuation_s"] > 0
    assert first["exact_path_s"] is None
    assert rows[("default+served", 1)]["wall_s"] >= first["continuation_s"]
    second = rows[("default+served", 2)]
    assert second["served"]["path"] == "retrain"
    assert second["served"]["failed"] == ["forgotten: forget set, kind"]
    floor = rows[(SECOND_RETRAIN, 2)]
    assert second["served"]["exact_path_s"] == floor["wall_s"]
    assert second["served"]["exact_path_failed"] == []
    assert second["tasks"] == floor["tasks"]  # the served model is the second retrain
    assert second["close"] == floor["close"]
    # the twin is what default publishes, not another method to rank; its close share has its own goal
    goals = result["goals"]
    assert all(c["lowest_uis_all_methods"] == "default" for c in goals["per_stage"])
    assert all(c["served_close_fraction"] is not None for c in goals["per_stage"])
    assert goals["served_close_goal_met_count"].endswith("/2")
    assert "what a round publishes (default+served)" in format_table(result)
    paths = served_paths(result["runs"])
    assert paths == {"default+served": {"default+continuation": 1, "failed": 0, "retrain": 1}}
    assert "default+served default+continuation 1, failed 0, retrain 1" in format_table(result)


def test_served_names_an_approximate_method_of_the_run() -> None:
    with pytest.raises(ValueError, match="--served"):
        run_bench(
            "smoke", None, seeds=[3], workload=ToyWorkload(), methods=["ssd"], served=["default"], echo=None
        )


def test_request_settings_run_only_the_chosen_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--request-settings FU``: a larger pool makes every stage dear, so a run can keep one
    setting; the JSON names what ran."""
    both = dataclasses.replace(PRESETS["smoke"], settings=None, stages=1)
    monkeypatch.setitem(PRESETS, "both", both)
    result = run_bench(
        "both",
        None,
        seeds=[3],
        workload=ToyWorkload(),
        methods=["retrain"],
        echo=None,
        request_settings=["PU:kind"],
    )
    assert {r["setting"] for r in result["runs"]} == {"PU:kind"}
    assert result["meta"]["setting_names"] == ["PU:kind"]


def test_request_settings_must_be_the_workloads() -> None:
    with pytest.raises(ValueError, match="request settings"):
        run_bench("smoke", None, seeds=[3], workload=ToyWorkload(), request_settings=["PU:nope"], echo=None)


def test_a_seed_process_exits_when_the_bench_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed bench's spawned seed processes were re-parented and trained on for minutes."""
    exits: list[int] = []
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    quality.exit_with_parent(4242, 0.0, exit=exits.append, checks=3)  # the bench is alive
    assert exits == []
    monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented: the bench is gone
    quality.exit_with_parent(4242, 0.0, exit=exits.append, checks=3)
    assert exits == [1]


def test_a_seed_s_settings_are_submitted_apart_and_its_rows_stay_in_seed_order() -> None:
    """With several processes, a seed's second setting is submitted after every seed's first, so
    it reads what the first stored in a training cache instead of training it alongside."""
    rows, submitted = work_units([5, 6, 7], ["FU", "PU:t"], jobs=2)
    assert rows == [(5, "FU"), (5, "PU:t"), (6, "FU"), (6, "PU:t"), (7, "FU"), (7, "PU:t")]
    assert submitted == [(5, "FU"), (6, "FU"), (7, "FU"), (5, "PU:t"), (6, "PU:t"), (7, "PU:t")]
    assert work_units([5, 6], ["FU", "PU:t"], jobs=1) == ([(5, None), (6, None)],) * 2
    assert work_units([5, 6], None, jobs=2) == ([(5, None), (6, None)],) * 2
