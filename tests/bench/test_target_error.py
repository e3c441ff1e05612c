"""``lethe bench targets``: the per-client targets' error against the reference retrain, split into
the references' disagreement and the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.target_error import main, order_factors, reference_design, split, target_errors, workload_label


def _target(acc: float, auc: float, n: int = 2, spread: float = 0.1) -> dict[str, Any]:
    return {"source": "references", "accuracy": "absolute",
            "tasks": {"shape": {"accuracy": acc, "mia_auc": auc, "references": n,
                                "spread": {"accuracy": spread, "mia_auc": spread / 2}}}}  # fmt: skip


def _runs(
    seed: int, setting: str, acc: float, auc: float, target: dict[str, Any] | None
) -> list[dict[str, Any]]:
    retrain = {"method": "retrain", "setting": setting, "stage": 1, "seed": seed, "close": None,
               "tasks": {"shape": {"unl": 0.6, "mia_auc": 0.4}}}  # fmt: skip
    default = {"method": "default", "setting": setting, "stage": 1, "seed": seed, "close": {"shape": True},
               "tasks": {"shape": {"unl": acc, "mia_auc": auc}}, "target": target}  # fmt: skip
    return [retrain, default]


def _result(runs: list[dict[str, Any]], k: int = 4, fraction: float | None = None) -> dict[str, Any]:
    overrides = {} if fraction is None else {"audit": {"reference_in_fraction": fraction}}
    return {"runs": runs, "summary": [], "meta": {"workload": "scenes", "workload_options": {"clients": 8},
            "references": {"k": k}, "settings_overrides": overrides}}  # fmt: skip


def test_the_order_factors_are_exact_for_two_references_and_close_for_three() -> None:
    assert order_factors(1) == (1.0, 0.0)
    assert order_factors(2) == (0.5, 2.0)
    m3, c3 = order_factors(3)
    # the median of three standard normals has variance 0.4487; their range a mean square of
    # E[R]² + Var(R) = 1.6926² + 0.8884² = 3.654 (order-statistics tables)
    assert m3 == pytest.approx(0.4487, rel=0.02)
    assert c3 == pytest.approx(3.654, rel=0.02)
    assert order_factors(3) == (m3, c3)  # a fixed draw: the same figures every call
    with pytest.raises(ValueError, match="at least 1"):
        order_factors(0)


def test_groups_are_by_design_kind_and_task_and_a_run_counts_once() -> None:
    first = _result(
        _runs(1, "FU", 0.0, 0.0, _target(0.62, 0.43)) + _runs(1, "PU:shape", 0.0, 0.0, _target(0.5, 0.5))
    )
    again = _result(_runs(1, "FU", 0.0, 0.0, _target(0.9, 0.9)))  # the same run in a second file
    other = _result(_runs(2, "FU", 0.0, 0.0, _target(0.6, 0.4, n=4)), k=8, fraction=0.75)
    constant = _result(_runs(3, "FU", 0.0, 0.0, {"source": "constant", "mia_auc": 0.5}))
    best_target = _target(0.6, 0.4)
    best_target["tasks"]["shape"]["best"] = {"accuracy": 0.65}
    best = _result(_runs(4, "FU", 0.0, 0.0, {**best_target, "accuracy_reference": "best"}))
    groups = target_errors([first, again, other, constant, best])
    label = workload_label(first)
    assert label == "scenes(clients=8)"
    assert sorted(groups) == [(label, "K4 f0.5", "FU", "shape"), (label, "K4 f0.5", "PU", "shape"),
                              (label, "K4 f0.5 best-accuracy", "FU", "shape"),
                              (label, "K8 f0.75", "FU", "shape")]  # fmt: skip
    (fu,) = groups[(label, "K4 f0.5", "FU", "shape")]
    assert fu["error"] == pytest.approx({"accuracy": 0.02, "mia_auc": 0.03})
    assert (fu["references"], fu["spread"]) == (2, {"accuracy": 0.1, "mia_auc": 0.05})
    assert groups[(label, "K8 f0.75", "FU", "shape")][0]["references"] == 4
    assert groups[(label, "K4 f0.5 best-accuracy", "FU", "shape")][0]["error"]["accuracy"] == pytest.approx(
        0.05
    )
    withheld = {
        "meta": {"references": {"k": 8}, "settings_overrides": {"audit": {"reference_withhold_tasks": True}}}
    }
    read = {**_target(0.6, 0.4, n=1), "calibration": "task_withheld"}
    read_withheld = _result(_runs(5, "PU:shape", 0.0, 0.0, read))
    assert list(target_errors([read_withheld])) == [(label, "K4 f0.5 task-withheld targets", "PU", "shape")]
    assert reference_design(withheld) == "K8 f0.5 withheld"
    assert reference_design({"runs": [], "meta": {"seeds": [1]}}) == "references unknown"


def test_the_split_recovers_the_noise_and_the_rest_it_was_built_from() -> None:
    """Targets built as the median of two references, each off the retrain by a shared part (sd
    0.04) plus its own noise (sd 0.08): the split gives back about 0.08 per reference, 0.057 of
    noise in the target, a rest of 0.04, and with eight references √(0.04² + 0.08² m(8))."""
    rng = np.random.default_rng(7)
    rest = rng.normal(0.0, 0.04, 4000)
    refs = rest[:, None] + rng.normal(0.0, 0.08, (4000, 2))
    entries: list[dict[str, Any]] = [
        {"error": {"accuracy": float(r.mean()), "mia_auc": float(r.mean()) / 2}, "references": 2,
         "spread": {"accuracy": float(abs(r[0] - r[1])), "mia_auc": float(abs(r[0] - r[1])) / 2}}
        for r in refs
    ]  # fmt: skip
    s = split(entries)
    acc: dict[str, Any] = s["accuracy"]
    assert acc["sigma"] == pytest.approx(0.08, rel=0.05)
    assert acc["noise"] == pytest.approx(0.08 / np.sqrt(2), rel=0.05)
    assert acc["rest"] == pytest.approx(0.04, rel=0.15)
    assert acc["with"][2] == pytest.approx(acc["sd"])
    assert acc["with"][8] == pytest.approx(
        np.sqrt(acc["rest"] ** 2 + acc["sigma"] ** 2 * order_factors(8)[0])
    )
    assert s["mia_auc"]["rest"] == pytest.approx(acc["rest"] / 2)
    # both errors here are the same draw, so a target is close exactly when its accuracy error is
    assert s["targets_close"] == sum(abs(e["error"]["accuracy"]) <= 0.05 for e in entries)


def test_without_spreads_the_split_says_only_what_the_errors_say() -> None:
    entries: list[dict[str, Any]] = [{"error": {"accuracy": e, "mia_auc": 0.0}, "references": 1,
                "spread": {"accuracy": None, "mia_auc": None}} for e in (0.1, -0.1)]  # fmt: skip
    s = split(entries)
    assert s["accuracy"] == {"bias": 0.0, "sd": pytest.approx(0.1)}
    assert s["targets_close"] == 0
    assert split(entries[:1])["accuracy"]["sd"] is None


def test_the_command_prints_each_group_and_writes_json(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "r.json"
    runs = [run for seed in (1, 2, 3) for run in _runs(seed, "FU", 0.0, 0.0, _target(0.6 + seed / 100, 0.4))]
    # a second retrain of seeds 1 and 2, 0.02 off the first on accuracy and equal on AUC
    runs += [{"method": "retrain_2", "setting": "FU", "stage": 1, "seed": seed, "close": {"shape": True},
              "tasks": {"shape": {"unl": 0.6 + sign * 0.02, "mia_auc": 0.4}}}
             for seed, sign in ((1, 1), (2, -1))]  # fmt: skip
    path.write_text(json.dumps(_result(runs)))
    out = tmp_path / "targets.json"
    assert main([str(path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scenes(clients=8) K4 f0.5 FU:shape: 3/3 targets close (median 2 OUT references)" in text
    assert "N=8" in text
    (group,) = json.loads(out.read_text())["groups"]
    assert (group["references"], group["out_references"], group["targets_close"]) == ("K4 f0.5", 2, 3)
    assert group["accuracy"]["bias"] == pytest.approx(0.02)
    assert (group["accuracy"]["retrain_sd"], group["accuracy"]["retrain_pairs"]) == (
        pytest.approx(0.02 / 2**0.5),
        2,
    )
    assert group["mia_auc"]["retrain_sd"] == 0.0
    assert "a retrain's own sd 0.014 (2 pairs)" in text
    withheld_runs = _runs(4, "PU:shape", 0.0, 0.0, {**_target(0.6, 0.4, n=1), "calibration": "task_withheld"})
    path.write_text(json.dumps(_result(withheld_runs)))
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "task-withheld targets PU:shape: 1/1 targets close (median 1 task-withheld references)" in text
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(_result([])))
    with pytest.raises(SystemExit) as exc:
        main([str(empty)])
    assert exc.value.code == 2


def test_it_reads_json_alone_without_torch() -> None:
    """Like ``lethe bench compare``, it scores from the files: torch is not imported."""
    code = "import sys, bench.target_error; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
