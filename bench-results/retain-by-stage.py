"""U3/U5 (rules-dec7e.md): ``default`` rows side by side on UIS, close and, per sequential stage,
the forgotten tasks' Ret and every task's Val against the reference retrain. Scoring only.

Each file's ``default*`` rows are labelled with the file's name (the same method in two files is two
rows); the stages at ≤ 0.7× compare each row's summary median with the best of ``ssd`` and ``ia``
(``bench.compare.best_baselines``) in the files of the same workload and seeds.

    python bench-results/retain-by-stage.py RESULTS.json [...]
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bench.compare import best_baselines, load_result, method_rows, summary_by_cell

GOAL = 0.7


def main() -> None:
    results = [(path, load_result(path)) for path in map(Path, sys.argv[1:])]
    # the best of ssd and ia per cell, from the files of the same workload and seeds (never across)
    group_of = {
        path: (str(result["meta"].get("workload")), tuple(sorted({int(r["seed"]) for r in result["runs"]})))
        for path, result in results
    }
    baselines = {
        group: best_baselines([result for path, result in results if group_of[path] == group])
        for group in set(group_of.values())
    }
    pooled: dict[str, list[float]] = defaultdict(list)
    at_goal: dict[str, list[bool]] = defaultdict(list)
    close: dict[str, int] = defaultdict(int)
    gaps: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for path, result in results:
        retrains = method_rows(result, "retrain")
        for method in sorted({r["method"] for r in result["runs"]}):
            if not method.startswith("default"):
                continue
            label = f"{method} [{path.stem}]"
            for cell, summary in summary_by_cell(result, method).items():
                best = baselines[group_of[path]].get(cell)
                if best is not None and summary.get("uis") is not None:
                    at_goal[label].append(float(summary["uis"]) <= GOAL * best)
            for key, row in method_rows(result, method).items():
                stage, retrain = key[1], retrains.get(key)
                if row.get("uis") is not None:
                    pooled[label].append(float(row["uis"]))
                if retrain is None:
                    continue
                close[label] += sum(bool(v) for v in (row.get("close") or {}).values())
                for task, metrics in row["tasks"].items():
                    if task in (row.get("close") or {}):  # the request-tasks: the forgotten ones
                        gaps[(label, "ret", stage)].append(metrics["ret"] - retrain["tasks"][task]["ret"])
                    gaps[(label, "val", stage)].append(metrics["val"] - retrain["tasks"][task]["val"])
    print("| row | pooled median UIS | stages ≤ 0.7× | close | Ret − retrain, stages 1–3 | Val − retrain |")
    print("|---|---|---|---|---|---|")
    for label in sorted(close):
        by_stage = {
            metric: ", ".join(f"{100 * statistics.median(gaps[(label, metric, s)]):+.1f}" for s in (1, 2, 3))
            for metric in ("ret", "val")
        }
        stages = f"{sum(at_goal[label])}/{len(at_goal[label])}"
        print(
            f"| {label} | {statistics.median(pooled[label]):.3f} | {stages} | {close[label]} "
            f"| {by_stage['ret']} | {by_stage['val']} |"
        )


if __name__ == "__main__":
    main()
