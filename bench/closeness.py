"""Closeness to the reference retrain, read from JSON alone (no torch: ``lethe bench compare``
imports it): the tolerance, whether a result's forget-set accuracy and MIA AUC are both within it
(``close``), and the per-client target early stopping aimed at, with a per-task request's shifts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

CLOSE_TOLERANCE = 0.05  # |Unl − retrain Unl| and |MIA − retrain MIA| both within this: "close"


def number(value: Any) -> float | None:
    """``value`` as a float; ``None`` for None or NaN (a metric not measured)."""
    if value is None:
        return None
    f = float(value)
    return None if math.isnan(f) else f


def close_flags(
    tasks: Mapping[str, Mapping[str, float | None]],
    reference: Mapping[str, Mapping[str, float | None]],
    request_tasks: Sequence[str],
) -> dict[str, bool]:
    """Per request-task with both values measured: Unl and MIA AUC both within the tolerance of the
    reference's (a task without forget-set data this stage is left out, not counted as close)."""
    out: dict[str, bool] = {}
    for t in request_tasks:
        mine, ref = tasks.get(t, {}), reference.get(t, {})
        values = [mine.get("unl"), ref.get("unl"), mine.get("mia_auc"), ref.get("mia_auc")]
        if any(v is None for v in values):
            continue
        u, ru, a, ra = (float(v) for v in values if v is not None)
        out[t] = abs(u - ru) <= CLOSE_TOLERANCE and abs(a - ra) <= CLOSE_TOLERANCE
    return out


def aimed_targets(target: Mapping[str, Any] | None) -> dict[str, dict[str, float | None]] | None:
    """Per task, the forget-set accuracy (``unl``) and MIA AUC a run's early stopping aimed at: the
    references' values (a row's ``target``, :func:`bench.scoring.target_of`; the accuracy their
    median or, with ``accuracy_reference: "best"``, their highest) plus the per-task
    shifts and the offset (``ia.target_offset``) it recorded, the AUC clamped to [0, 1] after each
    as the worker clamps it (an accuracy is not: a regression task's metric is −MAE). ``None`` for
    a constant target (it has no accuracy) or a ``"relative"`` one (it moves with each
    checkpoint's held-out accuracy)."""
    if not target or target.get("source") != "references" or target.get("accuracy") == "relative":
        return None
    acc_shift, auc_shift = float(target.get("accuracy_shift") or 0.0), float(target.get("auc_shift") or 0.0)
    out: dict[str, dict[str, float | None]] = {}
    offsets = dict(target.get("offset") or {})
    best = target.get("accuracy_reference") == "best"
    for task, values in dict(target.get("tasks") or {}).items():
        acc = number(dict(values.get("best") or {}).get("accuracy") if best else values.get("accuracy"))
        auc = number(values.get("mia_auc"))
        offset = dict(offsets.get(task) or {})
        acc_off, auc_off = float(offset.get("accuracy") or 0.0), float(offset.get("mia_auc") or 0.0)
        out[task] = {
            "unl": None if acc is None else acc + acc_shift + acc_off,
            "mia_auc": None if auc is None else _clamped(_clamped(auc + auc_shift) + auc_off),
        }
    return out


def target_close(
    target: Mapping[str, Any] | None,
    reference: Mapping[str, Mapping[str, float | None]] | None,
    request_tasks: Sequence[str],
) -> dict[str, bool] | None:
    """Per request-task, :func:`close_flags` of the per-client target early stopping aimed at
    (:func:`aimed_targets`) to the reference retrain; ``None`` without one."""
    aimed = aimed_targets(target)
    if reference is None or aimed is None:
        return None
    return close_flags(aimed, reference, request_tasks)


def _clamped(auc: float) -> float:
    return min(1.0, max(0.0, auc))
