"""U3/U5 (rules-dec7e.md): ``default`` rows side by side on UIS, close and, per sequential stage,
the forgotten tasks' Ret and every task's Val against the reference retrain. Scoring only.

Each file's ``default*`` rows are labelled with the file's name (the same method in two files is two
rows); ``ssd`` and ``ia`` come from whichever file with the same seeds has them, for the stages at
≤ 0.7× the best of them.

    python bench-results/retain-by-stage.py RESULTS.json [...]
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bench.compare import load_result, method_rows

GOAL = 0.7


def main() -> None:
    # cells by (seeds, setting, stage): baselines pair only with rows of the same seeds
    uis: dict[tuple[tuple[int, ...], str, int], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    close: dict[str, int] = defaultdict(int)
    gaps: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for path in map(Path, sys.argv[1:]):
        result = load_result(path)
        retrains = method_rows(result, "retrain")
        seeds = tuple(sorted({int(r["seed"]) for r in result["runs"]}))
        for method in sorted({r["method"] for r in result["runs"]}):
            if method not in ("ssd", "ia") and not method.startswith("default"):
                continue
            label = method if method in ("ssd", "ia") else f"{method} [{path.stem}]"
            for key, row in method_rows(result, method).items():
                setting, stage, _ = key
                if row.get("uis") is not None:
                    uis[(seeds, setting, stage)][label].append(float(row["uis"]))
                retrain = retrains.get(key)
                if label in ("ssd", "ia") or retrain is None:
                    continue
                close[label] += sum(bool(v) for v in (row.get("close") or {}).values())
                forgotten = list(row["tasks"]) if setting == "FU" else [setting.split(":", 1)[1]]
                for task, metrics in row["tasks"].items():
                    if task in forgotten:
                        gaps[(label, "ret", stage)].append(metrics["ret"] - retrain["tasks"][task]["ret"])
                    gaps[(label, "val", stage)].append(metrics["val"] - retrain["tasks"][task]["val"])
    print("| row | pooled median UIS | stages ≤ 0.7× | close | Ret − retrain, stages 1–3 | Val − retrain |")
    print("|---|---|---|---|---|---|")
    for label in sorted(close):
        cells = [cell for cell in uis.values() if cell.get(label)]
        pooled = statistics.median([x for cell in cells for x in cell[label]])
        judged = [cell for cell in cells if cell.get("ssd") and cell.get("ia")]
        at_goal = sum(
            statistics.median(cell[label]) <= GOAL * min(statistics.median(cell[b]) for b in ("ssd", "ia"))
            for cell in judged
        )
        by_stage = {
            metric: ", ".join(f"{100 * statistics.median(gaps[(label, metric, s)]):+.1f}" for s in (1, 2, 3))
            for metric in ("ret", "val")
        }
        print(
            f"| {label} | {pooled:.3f} | {at_goal}/{len(judged)} | {close[label]} | {by_stage['ret']} "
            f"| {by_stage['val']} |"
        )


if __name__ == "__main__":
    main()
