"""Paired differences between two methods' rows on the same requests, with intervals over seeds.

A rule that asks "close + 2 of 60" judges a count whose paired difference between two settings
moved with a standard deviation of about 1.2 request-tasks per seed on scenes (17 candidates,
docs/benchmarks.md, "How much a tuning run can tell"): on five seeds a candidate that changes
nothing passes such a bar about one time in four. This module gives a rule the two figures it
needs to say how far a difference is from noise:

- **distance to the retrain**: per request-task, ``max(|Δ accuracy|, |Δ AUC|)`` of the forget set
  against the reference retrain (the box that "close" thresholds at 0.05), so a change that moves
  request-tasks nearer without crossing the threshold still shows;
- for it and for the close count, the new − base difference and a 95 % interval from resampling
  *seeds* with replacement (a seed's stages share one model, so its request-tasks are not
  independent draws; the seed is the unit).

Scoring only (torch-free): it reads the rows' metrics and the reference retrain's.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Key = tuple[str, int, int]  # (setting, stage, seed)

#: bootstrap draws and the generator's seed: the interval is the same on every run of the command
DRAWS = 2000
RNG_SEED = 0
LEVEL = 0.95


def box_distance(metrics: Mapping[str, Any], reference: Mapping[str, Any]) -> float | None:
    """``max(|unl − reference unl|, |mia_auc − reference mia_auc|)``; ``None`` if either is missing."""
    gaps = []
    for k in ("unl", "mia_auc"):
        a, b = metrics.get(k), reference.get(k)
        if a is None or b is None:
            return None
        gaps.append(abs(float(a) - float(b)))
    return max(gaps)


def seed_interval(
    groups: Sequence[Sequence[float]],
    statistic: Callable[[list[float]], float],
    *,
    draws: int = DRAWS,
    level: float = LEVEL,
    rng_seed: int = RNG_SEED,
) -> tuple[float, float] | None:
    """The percentile interval of ``statistic`` over ``draws`` resamples of ``groups`` (one per seed)
    with replacement, their values pooled; ``None`` with fewer than two groups (nothing to resample)."""
    if len(groups) < 2:
        return None
    rng = random.Random(rng_seed)

    def resample() -> list[float]:
        return [v for _ in groups for v in groups[rng.randrange(len(groups))]]

    stats = sorted(statistic(resample()) for _ in range(draws))
    tail = (1.0 - level) / 2.0
    return stats[int(tail * draws)], stats[min(draws - 1, int((1.0 - tail) * draws))]


def _distances(
    rows: Mapping[Key, Mapping[str, Any]], retrains: Mapping[Key, Mapping[str, Any]], key: Key
) -> dict[str, float | None]:
    """Per request-task of the run (its ``close`` keys), the box distance to its reference retrain."""
    row, ref = rows[key], retrains.get(key)
    tasks = dict(row.get("tasks") or {})
    ref_tasks = dict((ref or {}).get("tasks") or {})
    return {t: box_distance(tasks.get(t) or {}, ref_tasks.get(t) or {}) for t in (row.get("close") or {})}


def paired_differences(
    base_rows: Mapping[Key, Mapping[str, Any]],
    new_rows: Mapping[Key, Mapping[str, Any]],
    base_retrains: Mapping[Key, Mapping[str, Any]],
    new_retrains: Mapping[Key, Mapping[str, Any]],
    keys: Sequence[Key],
) -> dict[str, Any]:
    """Over the shared runs ``keys``: each side's median and mean distance to its reference retrain,
    the mean paired difference (new − base) with its interval over seeds and how many request-tasks
    moved nearer or farther, and the close count's difference with its interval."""
    by_seed: dict[int, list[float]] = {}
    close_by_seed: dict[int, int] = {}
    base_d: list[float] = []
    new_d: list[float] = []
    for key in keys:
        a, b = _distances(base_rows, base_retrains, key), _distances(new_rows, new_retrains, key)
        seed = key[2]
        for task, da in a.items():
            db = b.get(task)
            if da is None or db is None:
                continue
            base_d.append(da)
            new_d.append(db)
            by_seed.setdefault(seed, []).append(db - da)
        close_a = sum(bool(v) for v in (base_rows[key].get("close") or {}).values())
        close_b = sum(bool(v) for v in (new_rows[key].get("close") or {}).values())
        close_by_seed[seed] = close_by_seed.get(seed, 0) + close_b - close_a
    diffs = [v for g in by_seed.values() for v in g]
    close_groups = [[float(v)] for v in close_by_seed.values()]
    return {
        "seeds": len(close_by_seed),
        "request_tasks": len(diffs),
        "distance": {
            "base_median": statistics.median(base_d) if base_d else None,
            "base_mean": statistics.fmean(base_d) if base_d else None,
            "new_median": statistics.median(new_d) if new_d else None,
            "new_mean": statistics.fmean(new_d) if new_d else None,
            "mean_difference": statistics.fmean(diffs) if diffs else None,
            "interval": seed_interval(list(by_seed.values()), statistics.fmean) if diffs else None,
            "nearer": sum(d < 0 for d in diffs),
            "farther": sum(d > 0 for d in diffs),
        },
        "close": {
            "difference": sum(close_by_seed.values()),
            "interval": seed_interval(close_groups, lambda v: float(sum(v))),
            "per_seed": dict(sorted(close_by_seed.items())),
        },
    }
