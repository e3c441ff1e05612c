"""U0 (rules-dec7e.md): what bounds the UIS goal. Scoring only, from saved bench results.

UIS (interference paper Eqs. 30-31, ``worker.unlearning.audit.unlearning_impact_score``) is a
mean over tasks of relative deviations. Split a row's UIS into the part that early stopping aims
at, the forgotten tasks' forget-set accuracy (``unl``) and MIA AUC against the retrain (F), and the
rest (R: those tasks' Ret and Val, and every term of the kept tasks, whose reference is the model
before the request). Per (setting, stage), medians over seeds, each over the best of ``ssd``/``ia``:

- ``default`` as measured: F(landing) + R(default);
- a perfect landing: F(target) + R(default), the forgotten tasks' two terms taken at the target
  ``default`` aimed at (later stages start where the measured run left them);
- ``retrain_2`` on the targets: F(target) + R(retrain_2), what a method aiming at those targets
  could reach if the rest of its score were as small as a second retrain's.

Then the rest's largest terms, ``default`` against ``retrain_2`` (forgotten tasks' Ret and Val at
every stage; kept tasks' terms at stage 1, where the reference is the ``original`` row).

    python bench-results/uis-bound.py RESULTS.json [...]
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.closeness import aimed_targets, number
from bench.compare import BASELINES, load_result, method_rows, summary_by_cell

AIMED = ("unl", "mia_auc")
REST = ("ret", "val", "unl", "mia_auc")
GOAL = 0.7


def relative(value: float, reference: float) -> float:
    """One UIS term, as ``worker.unlearning.audit.unlearning_impact_score`` computes it (reference
    floored at 1e-3; not imported: that module brings torch, and this script reads JSON)."""
    return abs(value - reference) / max(abs(reference), 1e-3)


def aimed_part(
    row: Mapping[str, Any],
    retrain: Mapping[str, Any],
    values: Mapping[str, Mapping[str, Any]],
    forgotten: list[str],
) -> float | None:
    """The ``forgotten`` tasks' ``unl`` and AUC terms of ``row``'s UIS with those metrics at ``values``."""
    total = 0.0
    for task in forgotten:
        for metric in AIMED:
            mine, ref = (
                number((values.get(task) or {}).get(metric)),
                number(retrain["tasks"][task].get(metric)),
            )
            if mine is None or ref is None:
                return None
            total += relative(mine, ref)
    return total / len(row["tasks"])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> None:
    for path in sys.argv[1:]:
        result = load_result(Path(path))
        rows = {m: method_rows(result, m) for m in ("retrain", "retrain_2", "default", "original")}
        # per cell (the summary's key: part, setting, stage), the baselines' median UIS by method
        baselines: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
        for method in BASELINES:
            for cell, summary in summary_by_cell(result, method).items():
                if summary.get("uis") is not None:
                    baselines[cell][method] = float(summary["uis"])
        cells: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        rest_terms: dict[str, dict[tuple[str, str, str], list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for key, row in rows["default"].items():
            setting, stage, _ = key
            retrain, second = rows["retrain"].get(key), rows["retrain_2"].get(key)
            targets = aimed_targets(row.get("target"))
            if retrain is None or second is None or row.get("uis") is None or not targets:
                continue
            forgotten = list(row.get("close") or {})  # the request-tasks, as the bench scored them
            f_land = aimed_part(row, retrain, row["tasks"], forgotten)
            f_target = aimed_part(row, retrain, targets, forgotten)
            f_second = aimed_part(second, retrain, second["tasks"], forgotten)
            if f_land is None or f_target is None or f_second is None or second.get("uis") is None:
                continue
            rest, rest_second = float(row["uis"]) - f_land, float(second["uis"]) - f_second
            cell = cells[("", setting, stage)]
            cell["default"].append(float(row["uis"]))
            cell["perfect landing"].append(f_target + rest)
            cell["retrain_2 on targets"].append(f_target + rest_second)
            cell["F landing"].append(f_land)
            cell["F target"].append(f_target)
            cell["R default"].append(rest)
            cell["R retrain_2"].append(rest_second)
            original = rows["original"].get(key)
            for name, model in (("default", row), ("retrain_2", second)):
                n = len(model["tasks"])
                for task, metrics in model["tasks"].items():
                    is_forgotten = task in forgotten
                    ref = retrain if is_forgotten else (original if stage == 1 else None)
                    if ref is None:
                        continue
                    for metric in ("ret", "val") if is_forgotten else REST:
                        mine, theirs = number(metrics.get(metric)), number(ref["tasks"][task].get(metric))
                        if mine is not None and theirs is not None:
                            kind = "forgotten" if is_forgotten else "kept"
                            rest_terms[name][(setting.split(":")[0], f"{kind} {task}", metric)].append(
                                relative(mine, theirs) / n
                            )
        print(f"== {path}")
        header = (
            "stage",
            "best other",
            "default",
            "perfect landing",
            "retrain_2 on targets",
            "F landing",
            "F target",
            "R default",
            "R retrain_2",
        )
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for (part, setting, stage), cell in sorted(cells.items()):
            by_method = baselines.get((part, setting, stage), {})
            best_name = min(by_method, key=lambda m: by_method[m]) if by_method else "-"
            best = by_method.get(best_name, float("nan"))
            parts = [f"{setting} {stage}", f"`{best_name}` {best:.3f}"]
            for column in header[2:5]:
                value = median(cell[column])
                flag = "" if value is None or value / best <= GOAL else " ✗"
                parts.append("-" if value is None else f"{value:.3f} ({value / best:.2f}×{flag})")
            parts += ["-" if median(cell[c]) is None else f"{median(cell[c]):.3f}" for c in header[5:]]
            print("| " + " | ".join(parts) + " |")
        print("\nthe rest's terms (mean share of UIS), default against retrain_2:")
        for (kind, task, metric), values in sorted(
            rest_terms["default"].items(), key=lambda kv: -statistics.fmean(kv[1])
        ):
            other = rest_terms["retrain_2"].get((kind, task, metric)) or [float("nan")]
            print(
                f"  {kind:<3} {task:<26} {metric:<8} default {statistics.fmean(values):.3f}"
                f"  retrain_2 {statistics.fmean(other):.3f}  (n {len(values)})"
            )


if __name__ == "__main__":
    main()
