"""E2 (rules-dec7d.md): what task-withheld references say about a per-task retrain. Scoring only.

Reads one bench JSON run with ``audit.reference_withhold_tasks`` whose ``default`` rows aim at the
OUT target and whose ``default@withheld`` rows at the task-withheld one, and scores, per per-task
request-task, candidate targets against the reference retrain (close: accuracy and MIA AUC both
within 0.05):

- OUT: the OUT references' median (what ships);
- withheld: the median of the references that saw the client without the task;
- hybrid: OUT accuracy, withheld AUC;
- OUT + d (leave one seed out): d = withheld − OUT, its mean over the other seeds' requests of
  the same task added to OUT (a per-workload constant learnt from references alone);
- OUT + error (leave one seed out): the mean (retrain − OUT) of the other seeds (a constant fitted
  on retrains, for scale: not something the request path may use).

    python bench-results/withheld-e2.py RESULTS.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench.closeness import aimed_targets, close_flags
from bench.compare import load_result, method_rows

METRICS = ("unl", "mia_auc")


def main() -> None:
    result = load_result(Path(sys.argv[1]))
    retrains, withheld = method_rows(result, "retrain"), method_rows(result, "default@withheld")
    items = []
    for key, row in method_rows(result, "default").items():
        ret, other = retrains.get(key), withheld.get(key)
        if key[0] == "FU" or ret is None or other is None:
            continue
        out, wh = aimed_targets(row.get("target")) or {}, aimed_targets(other.get("target")) or {}
        calibration = (other.get("target") or {}).get("calibration")
        for task in sorted(out.keys() & wh.keys()):
            ref = ret["tasks"].get(task) or {}
            if any(ref.get(m) is None for m in METRICS):
                continue
            items.append({"seed": key[2], "task": task, "out": out[task], "wh": wh[task], "ref": ref,
                          "calibration": calibration})  # fmt: skip
    print(f"per-task request-tasks: {len(items)}; withheld calibration used in "
          f"{sum(i['calibration'] == 'task_withheld' for i in items)}")  # fmt: skip

    def close(target, ref):
        """The benchmark's one definition of close (:func:`bench.closeness.close_flags`)."""
        return close_flags({"t": target}, {"t": ref}, ["t"])["t"]

    def loso(item, key):
        """Mean over the other seeds' request-tasks of the same task of key(i), per metric."""
        pool = [i for i in items if i["task"] == item["task"] and i["seed"] != item["seed"]]
        return {m: statistics.mean(key(i, m) for i in pool) for m in METRICS}

    def d_of(i, m):
        return i["wh"][m] - i["out"][m]

    def err_of(i, m):
        return i["ref"][m] - i["out"][m]

    counts = {"OUT": 0, "withheld": 0, "hybrid": 0, "OUT + d": 0, "OUT + error (fitted on retrains)": 0}
    for i in items:
        counts["OUT"] += close(i["out"], i["ref"])
        counts["withheld"] += close(i["wh"], i["ref"])
        counts["hybrid"] += close({"unl": i["out"]["unl"], "mia_auc": i["wh"]["mia_auc"]}, i["ref"])
        d, e = loso(i, d_of), loso(i, err_of)
        counts["OUT + d"] += close({m: i["out"][m] + d[m] for m in METRICS}, i["ref"])
        counts["OUT + error (fitted on retrains)"] += close(
            {m: i["out"][m] + e[m] for m in METRICS}, i["ref"]
        )
    for name, n in counts.items():
        print(f"  {name:34} close {n}/{len(items)}")
    for task in sorted({i["task"] for i in items}):
        sub = [i for i in items if i["task"] == task]
        for m in METRICS:
            d = [d_of(i, m) for i in sub]
            e = [err_of(i, m) for i in sub]
            corr = statistics.correlation(d, e) if len(sub) > 2 else float("nan")
            print(
                f"  {task:12} {m:8} d = withheld − OUT {statistics.mean(d):+.3f} ± {statistics.stdev(d):.3f};"
                f" error = retrain − OUT {statistics.mean(e):+.3f} ± {statistics.stdev(e):.3f};"
                f" correlation {corr:+.2f}"
            )


if __name__ == "__main__":
    main()
