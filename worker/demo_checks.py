"""What ``lethe demo`` checks on the serving host, as pure functions (shared with
``python -m bench reliability``, which measures how often the checks pass).

What a correct unlearning must show (checked on the pulled versions):

- forgotten data: the new version does no better on it than the old version does on data it never
  saw (the held-out split, same task), up to the sampling noise of the forgotten group: accuracy ≤
  held-out accuracy + FORGET_NOISE_Z standard errors of a proportion over the group's n samples.
  The old version must have been above that bound (it had memorised the data), so the accuracy
  falls by a clear margin; otherwise the demo has shown nothing and says so.
- everything else: held-out accuracy of every task stays within HELDOUT_TOLERANCE of the old
  version's, plus FORGET_NOISE_Z standard errors of the paired change over the held-out rows (the
  standard deviation of the per-row differences in correctness / √n). An exact retrain from another
  seed lands up to 12 points under v1 on the default workload (docs/methods.md, "The held-out bound"),
  so a correct unlearning may move it that much, and no more. The tasks the
  per-task request keeps, on that request's samples (still training data), stay within the same
  tolerance plus FORGET_NOISE_Z standard errors of the group's n samples, against the version that
  request was applied to (:func:`since`): in two rounds that is the per-client request's version,
  whose own path (an exact retrain, say) is not the per-task request's doing — the engine's
  acceptance check compares with the same version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

# one definition of each check, shared with the engine's acceptance check (a request that completed
# has passed these on its own data, or its evidence says why not)
from worker.unlearning.acceptance import (
    FORGET_NOISE_Z,
    HELDOUT_TOLERANCE,
    Check,
    fmt,
    forget_check,
    heldout_check,
    kept_check,
    paired_standard_error,
    unseen_bound,
)

__all__ = [
    "FORGET_NOISE_Z",
    "HELDOUT_TOLERANCE",
    "Check",
    "Group",
    "Measured",
    "accuracy",
    "checks",
    "fmt",
    "forget_check",
    "heldout_check",
    "kept_check",
    "measure",
    "memorisation_margin",
    "rank_by_memorisation",
    "since",
]


@dataclass(frozen=True)
class Group:
    """Rows the serving host measures: ``x`` with ``labels[task]`` for each of ``tasks``."""

    label: str
    x: Any  # the model's inputs (a dict of tensors)
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
    # standard error of ``after - before`` from the rows' draw (acceptance.paired_standard_error)
    paired_se: float = float("nan")
    # the version ``before`` was measured on, where it is not the one the demo started from
    before_version: str = ""


def accuracy(pred: Any, labels: Any) -> tuple[float, int]:
    """Accuracy of ``pred`` on the labelled rows of ``labels`` (negative = no label), and their count."""
    mask = labels >= 0
    n = int(mask.sum())
    return (float((pred[mask] == labels[mask]).float().mean()) if n else float("nan")), n


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
            mask = y >= 0
            se = paired_standard_error((pb[task] == y)[mask], (pa[task] == y)[mask])
            rows.append(Measured(g.label, task, n, acc_b, acc_a, changed, se))
    return rows


def since(
    measured: Sequence[Measured], group: str, before: Mapping[str, float], version: str
) -> list[Measured]:
    """``measured`` with ``group``'s rows compared with another version than the first: ``before``
    is that version's accuracy per task on the group's rows, ``version`` names it. Which rows
    changed prediction, and the paired standard error, are not known against it (NaN)."""
    nan = float("nan")
    return [
        replace(m, before=before[m.task], changed=nan, paired_se=nan, before_version=version)
        if m.group == group
        else m
        for m in measured
    ]


def checks(measured: Sequence[Measured], groups: Sequence[Group], heldout_label: str) -> list[Check]:
    """Every group but the held-out one: forgotten or kept; then held-out accuracy of every task."""
    forgotten = {g.label for g in groups if g.forgotten}
    heldout = {m.task: m for m in measured if m.group == heldout_label}
    out = [
        forget_check(f"forgotten: {m.group}, {m.task}", m.before, m.after, m.n, heldout[m.task].before)
        if m.group in forgotten
        else _against(kept_check(f"kept: {m.group}, {m.task}", m.before, m.after, m.n), m)
        for m in measured
        if m.group != heldout_label
    ]
    out += [heldout_check(task, m.before, m.after, se=m.paired_se, n=m.n) for task, m in heldout.items()]
    return out


def _against(check: Check, m: Measured) -> Check:
    """``check`` with the version its ``before`` came from in its detail (where :func:`since` set one)."""
    return replace(check, detail=f"{check.detail}; against {m.before_version}") if m.before_version else check


def memorisation_margin(
    pred: Mapping[str, Any],
    labels: Mapping[str, Any],
    tasks: Sequence[str],
    heldout_levels: Mapping[str, float],
) -> float:
    """How clearly a version remembers labelled rows, from its predictions on them: over ``tasks``,
    the least of its accuracy on the rows minus the forget check's bound at the version's held-out
    level (:func:`forget_check`'s). At or under 0, a forget check on those rows would have nothing
    to show, whatever the new version does."""
    margins = []
    for task in tasks:
        acc, n = accuracy(pred[task], labels[task])
        margins.append(acc - unseen_bound(heldout_levels[task], n) if n else -math.inf)
    return min(margins)


def rank_by_memorisation(
    predict: Predict, rows: Mapping[str, tuple[Any, Mapping[str, Any]]], tasks: Sequence[str], heldout: Group
) -> list[str]:
    """The keys of ``rows`` (clients: their inputs and labels), the most clearly remembered by the
    version behind ``predict`` first (:func:`memorisation_margin` on every task; ties keep the given
    order). The demo forgets the first: a client the version had not memorised on some task gives
    its forget check nothing to show (measured: on one machine's AVX2 path, worker seed 1, v1 held
    the demo's first client's ``orientation`` under the bound in 20 of 20 draws)."""
    held = predict(heldout.x)
    levels = {task: accuracy(held[task], heldout.labels[task])[0] for task in tasks}
    margin = {
        key: memorisation_margin(predict(x), labels, tasks, levels) for key, (x, labels) in rows.items()
    }
    return sorted(margin, key=lambda key: -margin[key])
