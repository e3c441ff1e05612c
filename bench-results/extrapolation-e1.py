"""E1 (rules-dec7d.md): the OUT references' targets extrapolated to a retrain's data size, scored
against the reference retrain. Scoring only: reads two bench JSONs of the same seeds, one with
references on halves (f = 1/2) and one on quarters (f = 1/4), and compares per request-task

    T(1/2)                                   the shipped target (the OUT references' median)
    T* = T(1/2) + beta * (T(1/2) - T(1/4))   beta = log2(f_R / (1/2)), f_R = (n - 1) / n

with the retrain's forget-set accuracy and MIA AUC (the box distance of ``bench.paired``; close:
within 0.05). n: the clients still in the pool at the request (10 - (stage - 1) for FU, 10 for a
per-task request). The two files must hold the same requests (identical ``retrain`` rows).

    python bench-results/extrapolation-e1.py HALVES.json QUARTERS.json [N_CLIENTS]
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bench.closeness import CLOSE_TOLERANCE, aimed_targets
from bench.compare import load_result, method_rows, paired_runs
from bench.paired import box_distance, seed_interval

SHARES = ("d_quarter", "d_half", "d_star")


def extrapolated(half: dict, quarter: dict, beta: float) -> dict:
    """T* per metric, the AUC clamped to [0, 1] as the worker clamps a target's."""
    star = {m: half[m] + beta * (half[m] - quarter[m]) for m in ("unl", "mia_auc")}
    star["mia_auc"] = min(1.0, max(0.0, star["mia_auc"]))
    return star


def main() -> None:
    halves, quarters = (load_result(Path(p)) for p in sys.argv[1:3])
    n_clients = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    same, shared = paired_runs(halves, quarters)
    if same != shared:
        sys.exit(f"the files score different requests: {shared - same} of {shared} retrain rows differ")
    retrains, rows_q = method_rows(halves, "retrain"), method_rows(quarters, "default")
    items = []
    for key, row in method_rows(halves, "default").items():
        setting, stage, seed = key
        if key not in rows_q or key not in retrains:
            continue
        th, tq = aimed_targets(row.get("target")), aimed_targets(rows_q[key].get("target"))
        n = n_clients - (stage - 1) if setting == "FU" else n_clients
        beta = math.log2(((n - 1) / n) / 0.5)
        for task, h in (th or {}).items():
            q, ref = (tq or {}).get(task), retrains[key]["tasks"].get(task) or {}
            d_half, d_quarter = box_distance(h, ref), box_distance(q or {}, ref)
            if d_half is None or d_quarter is None or q is None:
                continue
            star = extrapolated(h, q, beta)
            kind = "FU" if setting == "FU" else "PU"
            items.append({"seed": seed, "kind": kind, "d_half": d_half, "d_quarter": d_quarter,
                          "d_star": box_distance(star, ref), "h": h, "q": q, "ref": ref})  # fmt: skip
    print(f"request-tasks: {len(items)} (runs with identical retrains: {same} of {shared})")
    for label in ("all", "FU", "PU"):
        subset = [i for i in items if label in ("all", i["kind"])]
        if not subset:
            continue
        close = {k: sum(i[k] <= CLOSE_TOLERANCE for i in subset) for k in SHARES}
        mean = {k: statistics.fmean(i[k] for i in subset) for k in SHARES}
        print(
            f"{label:3} n={len(subset):3}  close: T(1/4) {close['d_quarter']}, T(1/2) {close['d_half']}, "
            f"T* {close['d_star']}   mean distance: {mean['d_quarter']:.4f}, {mean['d_half']:.4f}, "
            f"{mean['d_star']:.4f}"
        )
    by_seed = defaultdict(list)
    for i in items:
        by_seed[i["seed"]].append(i["d_star"] - i["d_half"])
    low, high = seed_interval(list(by_seed.values()), statistics.fmean) or (math.nan, math.nan)
    mean = statistics.fmean(d for ds in by_seed.values() for d in ds)
    print(f"distance T* - T(1/2): mean {mean:+.4f} [{low:+.4f}, {high:+.4f}] over {len(by_seed)} seeds")
    # not selectable: a single factor fitted by least squares per metric
    for metric in ("unl", "mia_auc"):
        steps = [i["h"][metric] - i["q"][metric] for i in items]
        errors = [i["ref"][metric] - i["h"][metric] for i in items]
        den = sum(s * s for s in steps)
        fitted = sum(e * s for e, s in zip(errors, steps, strict=True)) / den if den else math.nan
        print(
            f"{metric:8} fitted beta {fitted:+.3f}; mean T(1/2) - T(1/4) {statistics.fmean(steps):+.4f}; "
            f"mean T(1/2) - retrain {-statistics.fmean(errors):+.4f}"
        )


if __name__ == "__main__":
    main()
