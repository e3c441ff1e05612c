"""E1 (rules-dec7d.md): the OUT references' targets extrapolated to a retrain's data size, scored
against the reference retrain. Scoring only: reads two bench JSONs of the same seeds, one with
references on halves (f = 1/2) and one on quarters (f = 1/4), and compares per request-task

    T(1/2)                                   the shipped target (the OUT references' median)
    T* = T(1/2) + beta * (T(1/2) - T(1/4))   beta = log2(f_R / (1/2)), f_R = (n - 1) / n

with the retrain's forget-set accuracy and MIA AUC (close: both within 0.05). n: the clients still
in the pool at the request (10 - (stage - 1) for FU, 10 for a per-task request).

    python bench-results/extrapolation-e1.py HALVES.json QUARTERS.json [N_CLIENTS]
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import defaultdict

from bench.closeness import CLOSE_TOLERANCE, aimed_targets


def rows(path):
    with open(path) as f:
        data = json.load(f)
    return {(r["setting"], r["stage"], r["seed"], r["method"]): r for r in data["runs"]}


def distance(t, ref):
    return max(abs(t["unl"] - ref["unl"]), abs(t["mia_auc"] - ref["mia_auc"]))


def main() -> None:
    halves, quarters = rows(sys.argv[1]), rows(sys.argv[2])
    n_clients = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    items = []  # (seed, kind, d_half, d_star, d_quarter, close flags, raw values for beta fit)
    mismatched = 0
    for key, row in halves.items():
        setting, stage, seed, method = key
        if method != "default":
            continue
        ret_h, ret_q = (
            halves.get((setting, stage, seed, "retrain")),
            quarters.get((setting, stage, seed, "retrain")),
        )
        other = quarters.get(key)
        if ret_h is None or ret_q is None or other is None:
            continue
        if json.dumps(ret_h["tasks"], sort_keys=True) != json.dumps(ret_q["tasks"], sort_keys=True):
            mismatched += 1
            continue
        th, tq = aimed_targets(row.get("target")), aimed_targets(other.get("target"))
        if not th or not tq:
            continue
        n = n_clients - (stage - 1) if setting == "FU" else n_clients
        beta = math.log2(((n - 1) / n) / 0.5)
        for task, h in th.items():
            q, ref = tq.get(task), ret_h["tasks"].get(task)
            if not q or not ref or None in (h["unl"], h["mia_auc"], q["unl"], q["mia_auc"]):
                continue
            if ref.get("unl") is None or ref.get("mia_auc") is None:
                continue
            star = {
                "unl": h["unl"] + beta * (h["unl"] - q["unl"]),
                "mia_auc": min(1.0, max(0.0, h["mia_auc"] + beta * (h["mia_auc"] - q["mia_auc"]))),
            }
            kind = "FU" if setting == "FU" else "PU"
            items.append(
                {"seed": seed, "kind": kind, "setting": setting, "task": task, "beta": beta,
                     "d_half": distance(h, ref), "d_star": distance(star, ref), "d_quarter": distance(q, ref),
                     "h": h, "q": q, "ref": ref}
            )  # fmt: skip
    print(f"request-tasks: {len(items)} (rows skipped for differing retrains: {mismatched})")
    for label, subset in (("all", items), ("FU", [i for i in items if i["kind"] == "FU"]),
                          ("PU", [i for i in items if i["kind"] == "PU"])):  # fmt: skip
        if not subset:
            continue
        close = {k: sum(i[k] <= CLOSE_TOLERANCE for i in subset) for k in ("d_quarter", "d_half", "d_star")}
        mean = {k: sum(i[k] for i in subset) / len(subset) for k in ("d_quarter", "d_half", "d_star")}
        print(
            f"{label:3} n={len(subset):3}  close: T(1/4) {close['d_quarter']}, T(1/2) {close['d_half']}, "
            f"T* {close['d_star']}   mean distance: {mean['d_quarter']:.4f}, {mean['d_half']:.4f}, "
            f"{mean['d_star']:.4f}"
        )
    # the 95 % interval of mean(d_star - d_half) from resampling seeds
    by_seed = defaultdict(list)
    for i in items:
        by_seed[i["seed"]].append(i["d_star"] - i["d_half"])
    seeds = sorted(by_seed)
    rng = random.Random(0)
    stats = []
    for _ in range(2000):
        pick = [rng.choice(seeds) for _ in seeds]
        diffs = [d for s in pick for d in by_seed[s]]
        stats.append(sum(diffs) / len(diffs))
    stats.sort()
    mean = sum(i["d_star"] - i["d_half"] for i in items) / len(items)
    print(
        f"distance T* - T(1/2): mean {mean:+.4f} [{stats[49]:+.4f}, {stats[1949]:+.4f}]"
        f" over {len(seeds)} seeds"
    )
    # not selectable: a single factor fitted by least squares per metric
    for metric in ("unl", "mia_auc"):
        num = sum((i["ref"][metric] - i["h"][metric]) * (i["h"][metric] - i["q"][metric]) for i in items)
        den = sum((i["h"][metric] - i["q"][metric]) ** 2 for i in items)
        mean_step = sum(i["h"][metric] - i["q"][metric] for i in items) / len(items)
        mean_err = sum(i["h"][metric] - i["ref"][metric] for i in items) / len(items)
        print(
            f"{metric:8} fitted beta {num / den if den else float('nan'):+.3f}; mean T(1/2) - T(1/4) "
            f"{mean_step:+.4f}; mean T(1/2) - retrain {mean_err:+.4f}"
        )


if __name__ == "__main__":
    main()
