"""How much a tuning run's paired close count moves by chance (``lethe bench noise``).

    lethe bench noise RESULT.json [RESULT.json …] [--method default] [--json OUT]

For every variant of ``--method`` in each result (a method row ``METHOD@label``, run beside the
base on the same requests), the per-seed difference in the close count (variant − base) and of the
mean distance to the retrain (:mod:`bench.paired`). Pooled over every comparison: the mean and the
standard deviation of a seed's close difference, and from them the standard deviation of the
summed difference a rule on n seeds judges. Most variants change little, so the pooled spread is
an upper bound of the noise a rule has to clear (a variant with a real effect adds its own spread).

docs/benchmarks.md, "How much a tuning run can tell", reads it on scenes' tuning runs.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.compare import load_result, method_rows, results_parser
from bench.paired import paired_differences

SEED_COUNTS = (3, 5, 10, 20)


def variant_differences(result: Mapping[str, Any], method: str) -> list[dict[str, Any]]:
    """Per variant ``method@…`` of ``result``: its per-seed close differences against ``method``
    and the mean paired distance difference (:func:`bench.paired.paired_differences`)."""
    base = method_rows(result, method)
    retrains = method_rows(result, "retrain")
    out = []
    for variant in sorted({r["method"] for r in result["runs"] if str(r["method"]).startswith(f"{method}@")}):
        rows = method_rows(result, variant)
        keys = sorted(set(base) & set(rows))
        d = paired_differences(base, rows, retrains, retrains, keys)
        out.append({"method": variant, "close_per_seed": d["close"]["per_seed"],
                    "distance_mean_difference": d["distance"]["mean_difference"]})  # fmt: skip
    return out


def pooled_noise(comparisons: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of one seed's close difference over every comparison's seeds,
    and the standard deviation of a sum over n seeds (independent seeds: sd × √n)."""
    per_seed = [float(v) for c in comparisons for v in c["close_per_seed"].values()]
    if len(per_seed) < 2:
        return {"seed_differences": len(per_seed), "mean": None, "sd": None, "sum_sd": {}}
    sd = statistics.stdev(per_seed)
    return {
        "seed_differences": len(per_seed),
        "mean": statistics.fmean(per_seed),
        "sd": sd,
        "sum_sd": {n: sd * math.sqrt(n) for n in SEED_COUNTS},
    }


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench noise") -> int:
    parser = results_parser(prog, __doc__, "the base method; its variants are METHOD@…")
    args = parser.parse_args(argv)
    comparisons = []
    try:
        for path in args.results:
            for c in variant_differences(load_result(Path(path)), args.method):
                comparisons.append({"result": Path(path).name, **c})
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    for c in comparisons:
        diffs = list(c["close_per_seed"].values())
        distance = c["distance_mean_difference"]
        shown = "—" if distance is None else f"{distance:+.4f}"
        print(f"{c['result']:<44} {c['method']:<20} close per seed {diffs} (sum {sum(diffs):+d}); "
              f"distance mean {shown}")  # fmt: skip
    noise = pooled_noise(comparisons)
    if noise["sd"] is None:
        print("fewer than two seed differences: no spread to report")
    else:
        sums = ", ".join(f"{n} seeds {sd:.1f}" for n, sd in noise["sum_sd"].items())
        print(f"pooled over {noise['seed_differences']} seed differences of {len(comparisons)} comparisons: "
              f"mean {noise['mean']:+.2f}, sd {noise['sd']:.2f} request-tasks per seed; "
              f"sd of the summed difference: {sums}")  # fmt: skip
    if args.json_path is not None:
        args.json_path.write_text(json.dumps({"comparisons": comparisons, "pooled": noise}, indent=2) + "\n")
    return 0
