"""Early stopping's target: a constant (the paper's AUC 0.5, ``ia.mia_target``) or per client from
the reference adapters that never saw the client (``ia.target: "references"``, issue 8 part 1).

An exact retrain forgets a client with traits of its own far *below* the unseen-data level (its
forget-set accuracy and loss-MIA AUC fall under the held-out ones), so a constant target is far
from it. A reference adapter trained on a random half of the clients that excluded the client is a
model that never saw it — what a retrain without the client is, up to the other half of the data.
The target of a request is, per forgotten task, the median over its OUT references of their
forget-set metric and forget-vs-held-out loss-MIA AUC
(:func:`worker.unlearning.likelihood_ratio.out_reference_targets`: the statistics early stopping
measures, on the same rows). No retrain of the request is read: the references are trained once
per model version, off the request path (:mod:`worker.unlearning.reference_adapters`).

The accuracy target (``ia.target_accuracy``) is the references' own forget-set accuracy
(``"absolute"``) or the checkpoint's held-out accuracy plus the references' forget-minus-held-out
gap (``"relative"``: the references, trained on half the clients, are less accurate everywhere
than a retrain on all the others; their gap to the unseen level is what they know of the client).
Either is the references' median, or with ``ia.target_accuracy_reference: "best"`` their highest
(each over the references: the highest metric, or the highest gap): a retrain trains on every
client of each OUT reference's half, and on more, so on the client's rows it is about as accurate
as the best of them.

Per-task requests (``ia.per_task_target: "task_withheld"``): a per-task retrain still trains on the
client's inputs with its kept tasks' labels, which an OUT reference never saw. With references
trained so that each client's IN references withheld one task's labels for it
(``audit.reference_withhold_tasks``, :func:`worker.unlearning.reference_adapters.assign_withheld`),
the target of a request forgetting task ``t`` of client ``c`` is read from the references that saw
``c`` without ``t``'s labels (and with every other task's); a reference that saw ``(c, t)``'s labels
never contributes. Without such a reference: the OUT references, with the reason recorded.

A per-task request read from the OUT references (``calibration: "out"``) may shift their AUC by
``ia.per_task_auc_shift``: the per-task retrain still trains on the client's inputs with its kept
tasks, which moves its forget-set AUC away from an unseen client's by a workload's measured amount
(chosen on tuning seeds; the evidence records the shift and the references' own value), and its
accuracy by ``ia.per_task_accuracy_shift`` for the same reason.

Distance of a checkpoint to it: per forgotten task the larger of ``|AUC − target AUC|`` and
``|accuracy − target accuracy|`` (both must be close, as in the benchmark's "close to the retrain"
criterion: a box, not a sum that lets one term hide the other), combined over tasks by
``ia.task_distance`` (mean or max).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from worker.unlearning.interference.config import IAConfig
from worker.unlearning.likelihood_ratio import out_reference_targets
from worker.unlearning.reference_adapters import LoadedReferences
from worker.unlearning.types import Batch, TaskSpec


@dataclass(frozen=True)
class ReferenceTarget:
    """Per forgotten task: the OUT references' median loss-MIA AUC, forget-set accuracy, and
    forget-set accuracy minus their own held-out accuracy (``accuracy_gap``). ``relative``: the
    accuracy target is the checkpoint's own held-out accuracy + ``accuracy_gap`` (references train
    on half the clients, so their absolute accuracy is lower than a retrain's everywhere; the gap
    to the unseen level is what they say about the client), else ``accuracy``."""

    mia_auc: dict[str, float]
    accuracy: dict[str, float]
    accuracy_gap: dict[str, float]
    relative: bool = False
    # per task, the references' spread (max − min) of the AUC and of the accuracy (of the gap for
    # a ``relative`` target): how far apart models that never saw the client are
    # (``ia.stop_within_spread``); empty: unknown
    auc_spread: dict[str, float] = field(default_factory=dict)
    accuracy_spread: dict[str, float] = field(default_factory=dict)

    def accuracy_goal(self, task: str, heldout_accuracy: Mapping[str, float]) -> float | None:
        if not self.relative:
            return self.accuracy[task]
        unseen = heldout_accuracy.get(task)
        return None if unseen is None else unseen + self.accuracy_gap[task]


def reference_distance(
    aucs: Mapping[str, float],
    accuracy: Mapping[str, float],
    target: ReferenceTarget,
    how: str = "mean",
    heldout_accuracy: Mapping[str, float] | None = None,
) -> float | None:
    """Per target task ``max(|AUC − target|, |accuracy − target|)`` (a task not measured on this
    checkpoint is left out), combined by ``how``: ``"mean"`` or ``"max"``. ``heldout_accuracy``:
    the checkpoint's own (for a ``relative`` target)."""
    gaps = [max(g) for g in task_gaps(aucs, accuracy, target, heldout_accuracy).values()]
    if not gaps:
        return None
    return float(max(gaps)) if how == "max" else float(sum(gaps) / len(gaps))


def task_gaps(
    aucs: Mapping[str, float],
    accuracy: Mapping[str, float],
    target: ReferenceTarget,
    heldout_accuracy: Mapping[str, float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Per target task measured on this checkpoint, ``(|AUC − target|, |accuracy − target|)``."""
    gaps = {}
    for t, goal in target.mia_auc.items():
        acc_goal = target.accuracy_goal(t, heldout_accuracy or {})
        if t in aucs and t in accuracy and acc_goal is not None:
            gaps[t] = (abs(aucs[t] - goal), abs(accuracy[t] - acc_goal))
    return gaps


def inside_spread(
    aucs: Mapping[str, float],
    accuracy: Mapping[str, float],
    target: ReferenceTarget,
    factor: float,
    floor: float,
    heldout_accuracy: Mapping[str, float] | None = None,
) -> bool:
    """Whether every target task is measured and, on both its AUC and its accuracy, within
    ``max(floor, factor × spread)`` of the target (``ia.stop_within_spread``: ``factor`` 0.5 with
    two OUT references is "between them"). The references that never saw the client disagree by
    their spread; a checkpoint inside it is as close to a retrain as they can tell."""
    gaps = task_gaps(aucs, accuracy, target, heldout_accuracy)
    if factor <= 0 or not gaps or len(gaps) < len(target.mia_auc):
        return False
    return all(
        auc_gap <= max(floor, factor * target.auc_spread.get(t, 0.0))
        and acc_gap <= max(floor, factor * target.accuracy_spread.get(t, 0.0))
        for t, (auc_gap, acc_gap) in gaps.items()
    )


def request_target(
    cfg: IAConfig,
    references: LoadedReferences | None,
    tasks: Sequence[TaskSpec],
    *,
    forget: Batch,
    heldout: Batch,
    forget_tasks: Sequence[str],
    client_index: Mapping[str, int] | None,
    device: str = "cpu",
) -> tuple[ReferenceTarget | None, dict[str, Any]]:
    """The request's reference target (``None``: the constant ``cfg.mia_target``) and its evidence:
    ``source`` (``"references"`` or ``"constant"``), why a constant was used where references were
    asked for, and per task the per-reference values, median and spread, ``wall_s``."""
    if cfg.target == "constant":
        return None, {"source": "constant", "mia_auc": cfg.mia_target}
    fallback = {"source": "constant", "mia_auc": cfg.mia_target, "requested": "references"}
    if references is None or client_index is None or not references.models:
        return None, {**fallback, "reason": "no reference adapters for this model (named fallback)"}
    t0 = time.perf_counter()
    calibration, forget_mask, why = _calibration(cfg, references, tasks, forget, forget_tasks, client_index)
    per_task = out_reference_targets(
        references, tasks, forget=forget, unseen=heldout, forget_tasks=forget_tasks,
        client_index=dict(client_index), device=device, forget_mask=forget_mask,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    # the forgotten tasks measurable at all (a labelled forget row and a labelled held-out row)
    wanted = [
        t.name
        for t in tasks
        if t.name in forget_tasks
        and all(t.name in b.labels and bool(t.supervised(b.labels[t.name]).any()) for b in (forget, heldout))
    ]
    missing = [t for t in wanted if t not in per_task]
    if missing or not per_task:
        return None, {
            **fallback,
            "reason": f"no OUT reference (one that never saw the client) for tasks {missing or wanted}",
            "tasks": per_task,
            "wall_s": wall,
        }
    shifted = calibration == "out" and is_per_task(tasks, forget_tasks)
    shift = cfg.per_task_auc_shift if shifted else 0.0
    acc_shift = cfg.per_task_accuracy_shift if shifted else 0.0
    relative = cfg.target_accuracy == "relative"
    # the accuracy part: the OUT references' median, or their best (``ia.target_accuracy_reference``)
    pick = {t: v["best"] if cfg.target_accuracy_reference == "best" else v for t, v in per_task.items()}
    target = ReferenceTarget(
        mia_auc={t: _clamped(float(v["mia_auc"]) + shift) for t, v in per_task.items()},
        # not clamped: a regression task's metric is −MAE (≤ 0)
        accuracy={t: float(v["accuracy"]) + acc_shift for t, v in pick.items()},
        accuracy_gap={t: float(v["accuracy_gap"]) + acc_shift for t, v in pick.items()},
        relative=relative,
        auc_spread={t: float(v["spread"]["mia_auc"]) for t, v in per_task.items()},
        accuracy_spread={
            t: float(v["spread"]["accuracy_gap" if relative else "accuracy"]) for t, v in per_task.items()
        },
    )
    evidence = {
        "source": "references",
        "calibration": calibration,
        **({"calibration_reason": why} if why else {}),
        # added to the OUT references' AUC of a per-task request (``tasks`` keeps their own value)
        "auc_shift": shift,
        "accuracy_shift": acc_shift,
        "accuracy": cfg.target_accuracy,
        # the accuracy part from the references' median or their best (``tasks`` keeps both)
        "accuracy_reference": cfg.target_accuracy_reference,
        "recipe_digest": references.refs.recipe_digest,
        "references": len(references.models),
        "combine": "per task max(|AUC - target|, |accuracy - target|), tasks by ia.task_distance",
        "tasks": per_task,
        "wall_s": wall,
    }
    return target, evidence


def offset_target(target: ReferenceTarget, offsets: Mapping[str, Mapping[str, float]]) -> ReferenceTarget:
    """``target`` moved by the references' offset measured on unseen clients
    (``ia.target_offset``, :mod:`worker.unlearning.interference.unseen_offset`): per task with an
    offset, its ``mia_auc`` (clamped to [0, 1]), ``accuracy`` and ``accuracy_gap`` each plus the
    offset's; the spreads are the references' own. A task without an offset keeps its target."""

    def moved(values: Mapping[str, float], key: str) -> dict[str, float]:
        return {t: v + offsets[t][key] if t in offsets else v for t, v in values.items()}

    aucs = moved(target.mia_auc, "mia_auc")
    return replace(
        target,
        mia_auc={t: _clamped(v) for t, v in aucs.items()},
        accuracy=moved(target.accuracy, "accuracy"),
        accuracy_gap=moved(target.accuracy_gap, "accuracy_gap"),
    )


def is_per_task(tasks: Sequence[TaskSpec], forget_tasks: Sequence[str]) -> bool:
    """A request that forgets some of the model's tasks, not all (a per-client request)."""
    return set(forget_tasks) < {t.name for t in tasks}


def _clamped(auc: float) -> float:
    return min(1.0, max(0.0, auc))


def _calibration(
    cfg: IAConfig,
    references: LoadedReferences,
    tasks: Sequence[TaskSpec],
    forget: Batch,
    forget_tasks: Sequence[str],
    client_index: Mapping[str, int],
) -> tuple[str, Tensor | None, str | None]:
    """Which references a request's target reads: ``("out", None, why)`` — those that never saw the
    client (a per-client request; a per-task one without task-withheld references, ``why`` says so)
    — or ``("task_withheld", mask, None)`` for a per-task request with ``per_task_target:
    "task_withheld"``: the ``[K, len(forget)]`` references that saw each row's client without
    exactly the forgotten tasks' labels."""
    if not is_per_task(tasks, forget_tasks) or cfg.per_task_target == "out":
        return "out", None, None
    mask = references.refs.withheld_mask(forget.subset, dict(client_index), list(forget_tasks))
    if not bool(mask.any()):
        return "out", None, "no reference trained on the client with exactly these tasks' labels withheld"
    return "task_withheld", mask, None
