"""``bench.paired``: the distance to the retrain and the close count, new − base, with intervals
over seeds (the unit a tuning run's noise comes in)."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from bench.paired import box_distance, paired_differences, seed_interval


def test_the_box_distance_is_the_larger_of_the_accuracy_and_auc_gaps() -> None:
    reference = {"unl": 0.50, "mia_auc": 0.40}
    assert box_distance({"unl": 0.60, "mia_auc": 0.41}, reference) == pytest.approx(0.10)
    assert box_distance({"unl": 0.48, "mia_auc": 0.33}, reference) == pytest.approx(0.07)
    assert box_distance({"unl": 0.6}, {"unl": 0.5, "mia_auc": 0.4}) is None


def test_the_seed_interval_resamples_whole_seeds() -> None:
    """One seed: nothing to resample. Seeds that all moved by the same amount: the interval is that
    amount. Otherwise it brackets the estimate and is the same on every call (a fixed generator)."""
    assert seed_interval([[0.1, 0.2]], statistics.fmean) is None
    assert seed_interval([[0.02, 0.02], [0.02]], statistics.fmean) == pytest.approx((0.02, 0.02))
    groups = [[-0.05, -0.01], [0.00], [0.03, 0.04, -0.02], [-0.04]]
    lo, hi = seed_interval(groups, statistics.fmean) or (0.0, 0.0)
    pooled = statistics.fmean(v for g in groups for v in g)
    assert lo < pooled < hi
    assert lo >= min(statistics.fmean(g) for g in groups)
    assert hi <= max(statistics.fmean(g) for g in groups)
    assert seed_interval(groups, statistics.fmean) == (lo, hi)
    # a whole seed is one draw: its request-tasks are never split (sums of whole groups only)
    sums = seed_interval([[1.0, 1.0], [0.0]], lambda v: float(sum(v)))
    assert sums is not None
    assert all(s in (0.0, 2.0, 4.0) for s in sums)


def _run(seed: int, stage: int, unl: float, close: bool) -> dict[str, Any]:
    return {"tasks": {"a": {"unl": unl, "mia_auc": 0.40}}, "close": {"a": close}, "seed": seed,
            "stage": stage}  # fmt: skip


def test_paired_differences_pair_each_request_task_with_its_retrain() -> None:
    """Two seeds, two stages each: new lands nearer on three request-tasks and farther on one; the
    close count rises by one on seed 1 and is unchanged on seed 2."""
    keys = [("FU", stage, seed) for seed in (1, 2) for stage in (1, 2)]
    retrains = {k: {"tasks": {"a": {"unl": 0.50, "mia_auc": 0.40}}} for k in keys}
    base = {k: _run(k[2], k[1], unl, close) for k, unl, close in
            zip(keys, (0.58, 0.56, 0.60, 0.52), (False, False, False, True), strict=True)}  # fmt: skip
    new = {k: _run(k[2], k[1], unl, close) for k, unl, close in
           zip(keys, (0.53, 0.56, 0.55, 0.54), (True, False, False, True), strict=True)}  # fmt: skip
    d = paired_differences(base, new, retrains, retrains, keys)
    assert (d["seeds"], d["request_tasks"]) == (2, 4)
    dist = d["distance"]
    assert dist["mean_difference"] == pytest.approx((-0.05 + 0.0 - 0.05 + 0.02) / 4)
    assert (dist["nearer"], dist["farther"]) == (2, 1)
    assert dist["base_mean"] == pytest.approx((0.08 + 0.06 + 0.10 + 0.02) / 4)
    assert dist["new_median"] == pytest.approx(0.045)
    lo, hi = dist["interval"]
    assert lo <= dist["mean_difference"] <= hi
    assert d["close"]["difference"] == 1
    assert d["close"]["per_seed"] == {1: 1, 2: 0}
    assert d["close"]["interval"] is not None
    # a request-task without its retrain's metric is left out, not scored as 0
    partial: dict[tuple[str, int, int], dict[str, Any]] = {**retrains, keys[0]: {"tasks": {}}}
    assert paired_differences(base, new, partial, partial, keys)["request_tasks"] == 3
