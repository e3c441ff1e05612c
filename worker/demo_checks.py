"""What ``lethe demo`` checks on the serving host, as pure functions (shared with
``scripts/demo_reliability.py``, which measures how often the checks pass).

What a correct unlearning must show (checked on the pulled versions):

- forgotten data: the new version does no better on it than the old version does on data it never
  saw (the held-out split, same task), up to the sampling noise of the forgotten group: accuracy ≤
  held-out accuracy + FORGET_NOISE_Z standard errors of a proportion over the group's n samples.
  The old version must have been above that bound (it had memorised the data), so the accuracy
  falls by a clear margin; otherwise the demo has shown nothing and says so.
- everything else: held-out accuracy of every task stays within HELDOUT_TOLERANCE of the old
  version's. An exact retrain moves it 3–5 points from seed to seed on the default workload
  (docs/workloads.md), so a correct unlearning may move it that much, and no more. The tasks the
  per-task request keeps, on that request's samples (still training data), stay within the same
  tolerance plus FORGET_NOISE_Z standard errors of the group's n samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORGET_NOISE_Z = 2.0
HELDOUT_TOLERANCE = 0.05


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str
    # how far inside (> 0) or outside (< 0) its bound the measured accuracy is, in accuracy points
    margin: float = float("nan")


@dataclass(frozen=True)
class Group:
    """Rows the serving host measures: ``x`` with ``labels[task]`` for each of ``tasks``."""

    label: str
    x: Any  # a tensor of inputs
    labels: Mapping[str, Any]
    tasks: Sequence[str]
    forgotten: bool


@dataclass(frozen=True)
class Measured:
    group: str
    task: str
    n: int
    before: float
    after: float
    changed: float  # fraction of rows whose prediction changed


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def accuracy(pred: Any, labels: Any) -> tuple[float, int]:
    """Accuracy of ``pred`` on the labelled rows of ``labels`` (negative = no label), and their count."""
    mask = labels >= 0
    n = int(mask.sum())
    return (float((pred[mask] == labels[mask]).float().mean()) if n else float("nan")), n


def forget_check(what: str, before: float, after: float, n: int, heldout_before: float) -> Check:
    """The forgotten group's accuracy fell to the level of unseen data (see FORGET_NOISE_Z)."""
    if n == 0 or math.isnan(before) or math.isnan(heldout_before):
        return Check(what, False, "no labelled samples to measure")
    bound = heldout_before + FORGET_NOISE_Z * math.sqrt(heldout_before * (1 - heldout_before) / n)
    detail = (
        f"{fmt(before)} → {fmt(after)}; unseen-data level {fmt(heldout_before)} "
        f"+ {FORGET_NOISE_Z:g} SE (n={n}) = {fmt(bound)}"
    )
    if before <= bound:
        return Check(what, False, detail + ": the old version had not memorised it (nothing to show)")
    return Check(what, after <= bound, detail, margin=bound - after)


def heldout_check(task: str, before: float, after: float) -> Check:
    """Held-out accuracy stayed within HELDOUT_TOLERANCE of the old version's."""
    detail = (
        f"{fmt(before)} → {fmt(after)} (drop {100 * (before - after):+.1f} points; "
        f"allowed {100 * HELDOUT_TOLERANCE:.0f})"
    )
    margin = after - (before - HELDOUT_TOLERANCE)
    return Check(f"held-out accuracy kept: {task}", margin >= 0, detail, margin=margin)


def kept_check(what: str, before: float, after: float, n: int) -> Check:
    """Retained training data kept its accuracy (HELDOUT_TOLERANCE + sampling noise of n samples)."""
    if n == 0 or math.isnan(before):
        return Check(what, False, "no labelled samples to measure")
    allowed = HELDOUT_TOLERANCE + FORGET_NOISE_Z * math.sqrt(before * (1 - before) / n)
    detail = (
        f"{fmt(before)} → {fmt(after)} (drop {100 * (before - after):+.1f} points; allowed "
        f"{100 * allowed:.1f} = {100 * HELDOUT_TOLERANCE:.0f} + {FORGET_NOISE_Z:g} SE, n={n})"
    )
    margin = after - (before - allowed)
    return Check(what, margin >= 0, detail, margin=margin)


Predict = Callable[[Any], Mapping[str, Any]]  # inputs → per-task predicted classes


def measure(predict_before: Predict, predict_after: Predict, groups: Sequence[Group]) -> list[Measured]:
    """Accuracy of the old and the new version on every (group, task)."""
    rows: list[Measured] = []
    for g in groups:
        pb, pa = predict_before(g.x), predict_after(g.x)
        for task in g.tasks:
            y = g.labels[task]
            (acc_b, n), (acc_a, _) = accuracy(pb[task], y), accuracy(pa[task], y)
            changed = float((pb[task] != pa[task]).float().mean()) if len(y) else float("nan")
            rows.append(Measured(g.label, task, n, acc_b, acc_a, changed))
    return rows


def checks(measured: Sequence[Measured], groups: Sequence[Group], heldout_label: str) -> list[Check]:
    """Every group but the held-out one: forgotten or kept; then held-out accuracy of every task."""
    forgotten = {g.label for g in groups if g.forgotten}
    heldout = {m.task: m for m in measured if m.group == heldout_label}
    out = [
        forget_check(f"forgotten: {m.group}, {m.task}", m.before, m.after, m.n, heldout[m.task].before)
        if m.group in forgotten
        else kept_check(f"kept: {m.group}, {m.task}", m.before, m.after, m.n)
        for m in measured
        if m.group != heldout_label
    ]
    out += [heldout_check(task, m.before, m.after) for task, m in heldout.items()]
    return out
