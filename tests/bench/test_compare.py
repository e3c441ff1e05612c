"""``lethe bench compare``: one method's rows of two results on the same requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.compare import (
    NotPairedError,
    aimed_target,
    compare,
    format_comparison,
    load_result,
    main,
    merge,
    misses,
)
from bench.scoring import summarise


def _run(method: str, setting: str, seed: int, uis: float | None, **extra: Any) -> dict[str, Any]:
    return {"method": method, "setting": setting, "stage": 1, "seed": seed, "uis": uis, **extra}


def _target(acc: float, auc: float, **shifts: float) -> dict[str, Any]:
    return {"source": "references", "accuracy": "absolute", **shifts,
            "tasks": {"a": {"accuracy": acc, "mia_auc": auc}}}  # fmt: skip


def _result(rows: list[dict[str, Any]], retrain_unl: float = 0.5, val: float = 0.02) -> dict[str, Any]:
    retrains = [_run("retrain", s, seed, None, tasks={"a": {"unl": retrain_unl, "mia_auc": 0.4}})
                for s, seed in (("FU", 0), ("PU:a", 0))]  # fmt: skip
    summary = [
        {"setting": s, "stage": 1, "method": m, "uis": u, "close_fraction": 0.5, "close_n": 2,
         "val_gap": val, "val_rest_gap": val + 0.01, "kept_unl_gap": None if s == "FU" else 0.01}
        for m, u in (("default", 0.3), ("ssd", 0.6), ("ia", 0.5)) for s in ("FU", "PU:a")
    ]  # fmt: skip
    return {"runs": retrains + rows, "summary": summary}


def _rows(uis: float, close: bool, unl: float, update_distance: float) -> list[dict[str, Any]]:
    return [
        _run("default", "FU", 0, uis, tasks={"a": {"unl": unl, "mia_auc": 0.41}}, close={"a": close},
             target=_target(0.50, 0.40), target_close={"a": True}, update={"best_distance": update_distance}),
        _run("default", "PU:a", 0, uis + 0.1, tasks={"a": {"unl": unl, "mia_auc": 0.41}}, close={"a": False},
             target=_target(0.60, 0.50, accuracy_shift=-0.1, auc_shift=-0.1), target_close={"a": False},
             update={"best_distance": 0.2}),
    ]  # fmt: skip


def test_aimed_target_adds_the_recorded_shifts_and_ignores_constant_or_relative_targets() -> None:
    assert aimed_target(_target(0.6, 0.5, accuracy_shift=-0.1, auc_shift=-0.2), "a") == pytest.approx(
        (0.5, 0.3)
    )
    assert aimed_target(_target(0.5, 0.05, auc_shift=-0.1), "a") == pytest.approx((0.5, 0.0))  # an AUC
    assert aimed_target(_target(-0.08, 0.5), "a") == pytest.approx((-0.08, 0.5))  # −MAE is not clamped
    assert aimed_target({"source": "constant", "tasks": {}}, "a") is None
    assert aimed_target({**_target(0.6, 0.5), "accuracy": "relative"}, "a") is None
    assert aimed_target(_target(0.6, 0.5), "b") is None
    # ia.target_offset's per-task offset is added after the shifts, the AUC clamped after each
    offset = {"a": {"accuracy": 0.05, "mia_auc": -0.1, "accuracy_gap": 0.0}}
    assert aimed_target({**_target(0.6, 0.5, auc_shift=-0.2), "offset": offset}, "a") == pytest.approx(
        (0.65, 0.2)
    )
    assert aimed_target({**_target(0.6, 0.95, auc_shift=0.1), "offset": offset}, "a") == pytest.approx(
        (0.65, 0.9)
    )


def test_a_landing_miss_says_whether_its_path_came_near_the_retrain() -> None:
    """Two FU runs short of a close target (0.50 / 0.40; the retrain 0.50 / 0.40): one passed a
    checkpoint within 0.05 of the retrain on the way (the stop missed it), one never came near."""
    retrains = {("FU", 1, s): {"tasks": {"a": {"unl": 0.5, "mia_auc": 0.4}}} for s in (0, 1)}
    path = [{"steps": 0, "forget_accuracy": {"a": 0.9}, "mia_auc": {"a": 0.6}},
            {"steps": 24, "forget_accuracy": {"a": 0.53}, "mia_auc": {"a": 0.43}},
            {"steps": 48, "forget_accuracy": {"a": 0.2}, "mia_auc": {"a": 0.2}}]  # fmt: skip
    rows = [
        _run("default", "FU", seed, 0.3, tasks={"a": {"unl": 0.6, "mia_auc": 0.5}}, close={"a": False},
             target=_target(0.50, 0.40), target_close={"a": True},
             update={"checkpoints": cks, "best_distance": 0.1})
        for seed, cks in ((0, path), (1, [path[0], path[2], {"steps": 72}]))
    ]  # fmt: skip
    got = misses(rows, retrains)
    assert (got["short"], got["path_near"]) == (2, 1)
    assert misses(rows)["path_near"] == 0  # without the retrains nothing is said


def test_compare_pools_both_sides_over_the_shared_runs() -> None:
    base = _result(_rows(0.30, close=False, unl=0.60, update_distance=0.10))
    new = _result(_rows(0.20, close=True, unl=0.52, update_distance=0.03))
    c = compare(base, new, "default", "default")
    assert c["paired"] == {"identical_retrain_rows": 2, "shared_runs": 2}
    assert (c["runs"], c["changed_runs"], c["uis_lower"], c["uis_higher"]) == (2, 2, 2, 0)
    assert (c["base"]["close"], c["new"]["close"], c["new"]["request_tasks"]) == (0, 1, 2)
    assert c["new"]["median_uis"] == pytest.approx(0.25)
    assert c["new"]["targets_close"] == 1
    assert (c["base"]["kept_within_target"], c["new"]["kept_within_target"]) == (0, 1)
    # landing: FU 0.52 − 0.50 and 0.41 − 0.40; PU against the shifted target (0.50, 0.40)
    fu = c["new"]["landing"]["FU"]
    assert (fu["n"], fu["within"]) == (1, 1)
    assert (fu["accuracy"], fu["mia_auc"]) == (pytest.approx(0.02), pytest.approx(0.01))
    assert c["new"]["landing"]["PU"]["accuracy"] == pytest.approx(0.02)
    assert c["base"]["landing"]["FU"]["within"] == 0  # 0.60 is 0.10 above
    # misses: base's FU lands 0.10 above a close target (short of it), its PU aimed at a far one
    assert c["base"]["misses"] == {"target_far": 1, "past": 0, "short": 1, "mixed": 0, "no_target": 0,
                                   "path_near": 0}  # fmt: skip
    assert c["new"]["misses"]["target_far"] == 1
    assert sum(c["new"]["misses"].values()) == 1  # the close FU task is no miss
    # the summary's cells, the ratio to the best of ssd and ia (0.5), stages not worse
    assert [s["setting"] for s in c["stages"]] == ["FU", "PU:a"]
    assert c["stages"][0]["new"]["ratio"] == pytest.approx(0.6)
    assert c["stages_new_not_worse"] == 2
    assert c["new"]["val_gap"] == pytest.approx(0.02)
    assert c["new"]["kept_gap"] == pytest.approx(0.01)
    assert c["new"]["val_rest_gap"] == pytest.approx(0.03)
    text = format_comparison(c, "base.json", "new.json")
    assert "  base: 1; 0 / 1 / 0" in text
    assert "Val gap on unguarded rows" in text
    assert "0.030" in text
    assert "1/2" in text
    assert "stages where new's median UIS ≤ base's: 2 of 2" in text
    assert c["same_runs"]
    assert "runs differ" not in text
    # bench.paired: FU moved 0.10 → 0.02 from the retrain (0.60 → 0.52), PU the same; one seed, so
    # no interval over seeds
    diff = c["differences"]
    assert diff["distance"]["mean_difference"] == pytest.approx(-0.08)
    assert (diff["close"]["difference"], diff["distance"]["interval"]) == (1, None)
    assert "distance mean -0.0800 (nearer in 2, farther in 0 of 2); close +1" in text
    fewer = {**new, "runs": [r for r in new["runs"] if r["setting"] == "FU"]}
    partial = compare(base, fewer, "default", "default")
    assert not partial["same_runs"]
    assert partial["runs"] == 1
    assert "each per-stage cell is its own file's summary" in format_comparison(partial, "b", "n")


def test_results_of_other_requests_are_refused_unless_asked() -> None:
    base = _result(_rows(0.3, close=False, unl=0.6, update_distance=0.1))
    other = _result(_rows(0.3, close=False, unl=0.6, update_distance=0.1), retrain_unl=0.7)
    with pytest.raises(NotPairedError, match="identical in 0 of 2"):
        compare(base, other, "default", "default")
    assert compare(base, other, "default", "default", unpaired=True)["paired"]["identical_retrain_rows"] == 0
    with pytest.raises(ValueError, match="no rows of method 'default@x'"):
        compare(base, base, "default", "default@x")


def test_a_metric_that_only_one_result_records_does_not_unpair_them() -> None:
    """Results of before 5 Dec 2026 have no ``val_rest``: the same requests all the same."""
    old = _result(_rows(0.3, close=False, unl=0.6, update_distance=0.1))
    new = _result(_rows(0.3, close=False, unl=0.6, update_distance=0.1))
    for r in new["runs"]:
        r["tasks"]["a"]["val_rest"] = 0.5
    c = compare(old, new, "default", "default")
    assert c["paired"]["identical_retrain_rows"] == 2
    assert c["changed_runs"] == 0
    new["runs"][0]["tasks"]["a"]["mia_auc"] = 0.45  # a metric both record differs: not the same
    with pytest.raises(NotPairedError, match="identical in 1 of 2"):
        compare(old, new, "default", "default")


def test_the_command_prints_and_writes_the_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text(json.dumps(_result(_rows(0.3, close=False, unl=0.6, update_distance=0.1))))
    new.write_text(json.dumps(_result(_rows(0.2, close=True, unl=0.52, update_distance=0.03))))
    out = tmp_path / "c.json"
    assert main([str(base), str(new), "--json", str(out)]) == 0
    assert "base: base.json [default]" in capsys.readouterr().out
    assert json.loads(out.read_text())["new"]["close"] == 1
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps(_result(_rows(0.3, close=False, unl=0.6, update_distance=0.1), retrain_unl=0.9))
    )
    with pytest.raises(SystemExit) as exc:
        main([str(base), str(other)])
    assert exc.value.code == 2
    assert "do not score the same requests" in capsys.readouterr().err


def test_several_files_make_one_side_and_their_cells_are_named_by_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _result(_rows(0.3, close=False, unl=0.6, update_distance=0.1))
    second = _result(_rows(0.2, close=True, unl=0.52, update_distance=0.03))
    for r in second["runs"]:
        r["seed"] = 7  # the second file ran other seeds
    first["meta"], second["meta"] = {"seeds": [0, 1, 2]}, {"seeds": [7]}
    both = merge([first, second])
    assert len(both["runs"]) == len(first["runs"]) + len(second["runs"])
    assert {cell["part"] for cell in both["summary"]} == {"0–2", "7"}
    c = compare(both, both, "default", "default")
    assert (c["runs"], c["base"]["request_tasks"], c["base"]["close"]) == (4, 4, 1)
    assert {s["part"] for s in c["stages"]} == {"0–2", "7"}
    assert "FU [0–2]" in format_comparison(c, "a", "b")
    with pytest.raises(ValueError, match="in two of the files"):
        merge([first, first])
    paths = []
    for name, result in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(result))
        paths.append(str(tmp_path / name))
    assert main([",".join(paths), ",".join(paths)]) == 0
    assert "base: a.json, b.json [default]" in capsys.readouterr().out


def _scored(method: str, setting: str, seed: int, unl: float) -> dict[str, Any]:
    """A row as ``lethe bench`` writes it, with what the summary reads (per task Ret / Unl / Val)."""
    tasks = {"a": {"ret": 0.9, "unl": unl, "val": 0.7, "mia_auc": 0.5}}
    close = None if method == "retrain" else {"a": abs(unl - 0.4) <= 0.05}
    return {
        **_run(method, setting, seed, None if close is None else unl, tasks=tasks, close=close),
        "wall_s": 1.0,
    }


def test_a_stopped_runs_partial_file_is_read_as_its_finished_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run stopped early keeps its finished (seed, setting) units in ``.partial.jsonl``; compare
    reads them as the finished run's JSON would have them: runs in seed and setting order, the same
    summary, their seeds."""
    units = {
        (seed, setting): [_scored("retrain", setting, seed, 0.4), _scored("default", setting, seed, 0.4 + d)]
        for seed, d in ((0, 0.01), (1, 0.2)) for setting in ("FU", "PU:a")
    }  # fmt: skip
    partial = tmp_path / "run.partial.jsonl"
    # units finish in any order across worker processes
    order = [(1, "PU:a"), (0, "FU"), (1, "FU"), (0, "PU:a")]
    lines = [json.dumps({"runs": units[k], "train_s": {}, "refresh_s": [], "process": 1}) for k in order]
    partial.write_text("\n".join(lines) + "\n")
    runs = [r for k in sorted(units) for r in units[k]]
    loaded = load_result(partial)
    assert loaded == {"runs": runs, "summary": summarise(runs), "meta": {"seeds": [0, 1]}}
    finished = tmp_path / "run.json"
    finished.write_text(json.dumps({**loaded, "meta": {"seeds": [0, 1], "preset": "quick"}}))
    assert load_result(finished)["runs"] == runs
    assert main([str(finished), str(partial)]) == 0
    assert "retrain rows identical in 4 of 4" in capsys.readouterr().out
