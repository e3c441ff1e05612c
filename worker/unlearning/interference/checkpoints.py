"""Early stopping: what is measured after every epoch, and which checkpoint is kept.

After every epoch (a pass over D_f) the forget-vs-held-out loss-MIA AUC and the accuracy on the
retain check rows are measured; the checkpoint whose AUC is closest to the target (the retrain
reference's when given, else ``mia_target``, default 0.5) among those within the retain tolerance
is kept — epoch 0, the model as given, included. With ``ia.forget_accuracy_z`` the checkpoints
whose forget-set accuracy is at the unseen-data level (the acceptance check's bound) come first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from worker.unlearning.acceptance import metric_standard_error, unseen_bound
from worker.unlearning.audit import mia_from_outputs, model_outputs
from worker.unlearning.interference.retain import (
    RetainLevel,
    kept_deviation,
    retain_drop,
    retain_level,
    retain_noise,
    task_accuracy,
)
from worker.unlearning.interference.targets import ReferenceTarget, inside_spread, reference_distance
from worker.unlearning.lora import Forward, restore
from worker.unlearning.types import Batch, TaskSpec, cat_inputs, inputs_to


def auc_goal(target: float | Mapping[str, float], task: str, default: float) -> float:
    """``task``'s constant AUC target: per task where ``target`` is a mapping (else ``default``)."""
    return target.get(task, default) if isinstance(target, Mapping) else float(target)


def mia_distance(
    aucs: Mapping[str, float], target: float | Mapping[str, float], default: float, how: str = "mean"
) -> float | None:
    """The forgotten tasks' ``|AUC − target|`` combined by ``how``: ``"mean"`` or ``"max"``."""
    if not aucs:
        return None
    gaps = [abs(auc - auc_goal(target, t, default)) for t, auc in aucs.items()]
    return float(max(gaps)) if how == "max" else float(sum(gaps) / len(gaps))


def past_target(
    checkpoint: Mapping[str, Any],
    target: float | Mapping[str, float],
    default: float,
    reference: ReferenceTarget | None = None,
) -> frozenset[str]:
    """The forgotten tasks that ``checkpoint`` (a history entry) has past its target
    (``ia.hold_past_target``): with a per-client ``reference``, forget-set accuracy *and* MIA AUC
    both below the reference target's (one below and one above is not past: the forget term still
    moves the other towards it); without, the AUC below the constant target."""
    aucs, accuracy = checkpoint["mia_auc"], checkpoint["forget_accuracy"]
    past = set()
    for t, auc in aucs.items():
        if reference is None:
            if auc < auc_goal(target, t, default):
                past.add(t)
            continue
        acc_goal = reference.accuracy_goal(t, checkpoint.get("heldout_accuracy") or {})
        below = acc_goal is not None and t in accuracy and accuracy[t] < acc_goal
        if below and t in reference.mia_auc and auc < reference.mia_auc[t]:
            past.add(t)
    return frozenset(past)


def forget_excess(
    forget_acc: Mapping[str, float],
    heldout_acc: Mapping[str, float],
    counts: Mapping[str, int],
    z: float,
    standard_errors: Mapping[str, float] | None = None,
) -> float | None:
    """How far the worst forgotten task's forget-set accuracy is above the unseen-data level
    (held-out accuracy + ``z`` standard errors over the forget set's n); ≤ 0: at the level.
    ``standard_errors``: per task, the forget-set metric's own standard error where it is not a
    proportion (a regression's −MAE), as the acceptance check's bound uses it."""
    own = dict(standard_errors or {})
    gaps = [
        acc - unseen_bound(heldout_acc[t], counts[t], z, own.get(t))
        for t, acc in forget_acc.items()
        if t in heldout_acc and counts.get(t, 0) > 0
    ]
    return max(gaps, default=None)


@dataclass(frozen=True)
class Measured:
    """One checkpoint's measurements (:class:`Monitor`)."""

    aucs: dict[str, float]  # forgotten task → forget-vs-held-out loss-MIA AUC
    accuracy: dict[str, float]  # retain check rows (:func:`retain_accuracy`)
    forget_accuracy: dict[str, float]  # forgotten task → accuracy on D_f
    heldout_accuracy: dict[str, float]  # forgotten task → accuracy on the held-out rows
    # forgotten task → the standard error of its D_f metric, for a metric that is not a proportion
    forget_standard_error: dict[str, float] = field(default_factory=dict)
    # the per-row scores behind ``accuracy`` (:class:`RetainLevel`; the retain gate's noise term)
    retain_rows: dict[str, Tensor] = field(default_factory=dict)


class Monitor:
    """What early stopping measures after every epoch, in one forward pass: each forgotten task's
    forget-vs-held-out loss-MIA AUC and each task's accuracy on the retain check rows."""

    def __init__(
        self,
        forget: Batch,
        heldout: Batch,
        check: Batch,
        forget_tasks: Sequence[TaskSpec],
        tasks: Sequence[TaskSpec],
        device: str,
        forward: Forward | None = None,
        anchor_ids: Sequence[str] | None = None,
    ) -> None:
        self.forget, self.heldout, self.check, self.forward = forget, heldout, check, forward
        self.anchor_ids = anchor_ids
        self.forget_tasks, self.tasks = list(forget_tasks), list(tasks)
        self.inputs = inputs_to(cat_inputs([forget.inputs, heldout.inputs, check.inputs]), device)
        self.sizes = [len(forget), len(heldout), len(check)]
        self.forget_counts = {
            t.name: int(t.supervised(forget.labels[t.name]).sum())
            for t in self.forget_tasks
            if t.name in forget.labels
        }

    def __call__(self, model: nn.Module) -> Measured:
        out = model_outputs(model, self.inputs, forward=self.forward)
        parts = {k: torch.split(v, self.sizes) for k, v in out.items()}
        f_out, v_out, c_out = ({k: p[i] for k, p in parts.items()} for i in range(3))
        retained = retain_level(self.tasks, c_out, self.check, self.forget.sample_ids, self.anchor_ids)
        return Measured(
            aucs=mia_from_outputs(self.forget_tasks, f_out, self.forget, v_out, self.heldout),
            accuracy=retained.accuracy,
            retain_rows=retained.rows,
            forget_accuracy=task_accuracy(self.forget_tasks, f_out, self.forget),
            heldout_accuracy=task_accuracy(self.forget_tasks, v_out, self.heldout),
            forget_standard_error=metric_standard_errors(self.forget_tasks, f_out, self.forget),
        )


def metric_standard_errors(
    tasks: Sequence[TaskSpec], outputs: Mapping[str, Tensor], batch: Batch
) -> dict[str, float]:
    """Per task whose metric is not a proportion (a regression), its standard error on ``batch``
    (:func:`~worker.unlearning.acceptance.metric_standard_error`, the check's noise term for it)."""
    out: dict[str, float] = {}
    for task in tasks:
        y = batch.labels.get(task.name)
        se = None if y is None or not len(batch) else metric_standard_error(task, outputs[task.name], y)
        if se is not None:
            out[task.name] = se
    return out


def checkpoint_heldout(heldout: Batch, rows: int, seed: int) -> Batch:
    """The held-out rows the checkpoints measure (``ia.checkpoint_heldout_rows``): a seeded subset
    of ``rows`` of them in their original order, the same for every checkpoint of a request so that
    checkpoints stay comparable; all of them when ``rows`` is 0 or not fewer. Idempotent: a subset
    of ``rows`` rows is returned as it is."""
    if rows <= 0 or len(heldout) <= rows:
        return heldout
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(heldout), generator=gen)[:rows].sort().values
    return heldout.select(keep)


def select_checkpoint(
    history: Sequence[Mapping[str, Any]], tolerance: float, pick: str = "closest", start: int = 0
) -> int:
    """The index in ``history`` early stopping keeps: among the checkpoints whose ``retain_drop``
    (its ``retain_gate`` where recorded: the drop less the rows' noise) is within ``tolerance``,
    the one whose MIA ``distance`` to the target is smallest (earliest on ties) — among those
    whose ``forget_excess`` is ≤ 0 (forget-set accuracy at the unseen-data level) when there are
    any, and with ``pick="earliest"`` the first of those; when none is within the tolerance, the
    one with the smallest ``retain_drop``. A checkpoint without a distance ranks after those with
    one. ``start``: the first index that may be kept (1: never the model as given,
    ``ia.stop_at_unseen_level``'s continuation of a model that failed its check); the last
    checkpoint when ``history`` has no other."""
    start = min(start, len(history) - 1)

    def closeness(i: int) -> tuple[float, int]:
        d = history[i]["distance"]
        return (math.inf if d is None else float(d), i)

    candidates = range(start, len(history))
    within = [i for i in candidates if within_tolerance(history[i], tolerance)]
    forgotten = [i for i in within if at_unseen_level(history[i], tolerance)]
    if forgotten:
        return forgotten[0] if pick == "earliest" else min(forgotten, key=closeness)
    if within:
        return min(within, key=closeness)
    # the least damaged as measured: the noise allowance grows with how many rows changed, so
    # among checkpoints that all fail the gate it would favour the most changed one
    return min(candidates, key=lambda i: (history[i]["retain_drop"], *closeness(i)))


def at_unseen_level(checkpoint: Mapping[str, Any], retain_tolerance: float) -> bool:
    """Whether ``checkpoint`` (a history entry) has every forgotten task at the unseen-data level
    (its ``forget_excess`` ≤ 0, measured with ``ia.forget_accuracy_z``) within the retain tolerance."""
    excess = checkpoint.get("forget_excess")
    return excess is not None and float(excess) <= 0 and within_tolerance(checkpoint, retain_tolerance)


def gated_drop(checkpoint: Mapping[str, Any]) -> float:
    """What the retain gate judges: ``checkpoint``'s ``retain_gate`` (its drop less each task's
    noise allowance, ``ia.retain_noise_z``) where recorded, else its ``retain_drop``."""
    return float(checkpoint.get("retain_gate", checkpoint["retain_drop"]))


def within_tolerance(checkpoint: Mapping[str, Any], retain_tolerance: float) -> bool:
    """Whether ``checkpoint``'s :func:`gated_drop` is within the retain tolerance."""
    return gated_drop(checkpoint) <= retain_tolerance + 1e-12


class Checkpoints:
    """The model after every epoch (epoch 0: as given): what the :class:`Monitor` measured, and a
    copy of the updated parameters, so that early stopping can restore the one it keeps.

    ``retain_baseline``: the accuracy the retain drop is measured from, with its per-row scores
    (``None``: epoch 0's). ``retain_noise_z``: the retain gate's noise term (``ia.retain_noise_z``;
    each checkpoint's ``retain_gate`` is its drop less that many standard errors of each task's
    paired change from the baseline's rows, its ``retain_drop`` the drop as measured)."""

    def __init__(
        self,
        monitor: Monitor,
        params: Mapping[str, Tensor],
        *,
        target: float | Mapping[str, float],
        default_target: float,
        retain_baseline: RetainLevel | None,
        task_distance: str = "mean",
        forget_accuracy_z: float = 0.0,
        kept_two_sided: bool = False,
        reference: ReferenceTarget | None = None,
        kept_level: bool = False,
        relative_drop: bool = False,
        retain_noise_z: float = 0.0,
        stop_spread: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self.monitor, self.params = monitor, dict(params)
        self.stop_spread = stop_spread  # (factor, floor): ia.stop_within_spread, ia.stop_within
        self.reference = reference
        self.target, self.default_target = target, default_target
        self.task_distance, self.forget_accuracy_z = task_distance, forget_accuracy_z
        self.kept_two_sided = kept_two_sided
        self.kept_level = kept_level
        self.relative_drop = relative_drop
        self.retain_noise_z = retain_noise_z
        self.measure_baseline = retain_baseline is None
        self.baseline: dict[str, float] = dict(retain_baseline.accuracy if retain_baseline else {})
        self.baseline_rows: dict[str, Tensor] = dict(retain_baseline.rows if retain_baseline else {})
        self.history: list[dict[str, Any]] = []
        self.states: list[dict[str, Tensor]] = []
        self.weights_at = -1  # the entry the model's weights are at: the latest, or one restored

    def record(self, model: nn.Module, epoch: int, steps: int = 0) -> None:
        m = self.monitor(model)
        if not self.history and self.measure_baseline:
            self.baseline.update(m.accuracy)
            self.baseline_rows.update(m.retain_rows)
        excess = None
        if self.forget_accuracy_z > 0:
            excess = forget_excess(
                m.forget_accuracy,
                m.heldout_accuracy,
                self.monitor.forget_counts,
                self.forget_accuracy_z,
                m.forget_standard_error,
            )
        noise = retain_noise(self.baseline_rows, m.retain_rows, self.retain_noise_z)

        def drop(allowance: Mapping[str, float] | None = None) -> float:
            return retain_drop(m.accuracy, self.baseline, kept_two_sided=self.kept_two_sided,
                               relative=self.relative_drop, noise=allowance)  # fmt: skip

        self.history.append(
            {
                "epoch": epoch,
                "steps": steps,
                "mia_auc": m.aucs,
                "distance": self._distance(m),
                **self._inside_spread(m),
                "forget_accuracy": m.forget_accuracy,
                "heldout_accuracy": m.heldout_accuracy,
                "forget_excess": excess,
                "retain_accuracy": m.accuracy,
                "retain_drop": drop(),
                "retain_gate": drop(noise),
            }
        )
        self.states.append({n: p.detach().clone() for n, p in self.params.items()})
        self.weights_at = len(self.history) - 1

    def restore(self, model: nn.Module, index: int) -> None:
        """Put checkpoint ``index``'s parameters back into ``model`` (the kept one at the end of a
        run, or where ``ia.refine_rounds`` goes back to)."""
        restore(model, self.states[index])
        self.weights_at = index

    def past_target(self) -> frozenset[str]:
        """The forgotten tasks the checkpoint the weights are at has past its target
        (:func:`past_target`)."""
        return past_target(self.history[self.weights_at], self.target, self.default_target, self.reference)

    def _inside_spread(self, m: Measured) -> dict[str, bool]:
        """``{"inside_spread": …}`` when ``ia.stop_within_spread`` is on with a reference target (the
        history of a run without it is unchanged)."""
        factor, floor = self.stop_spread
        if self.reference is None or factor <= 0:
            return {}
        inside = inside_spread(m.aucs, m.forget_accuracy, self.reference, factor, floor, m.heldout_accuracy)
        return {"inside_spread": inside}

    def _distance(self, m: Measured) -> float | None:
        if self.reference is not None:  # per client, from the OUT reference adapters
            d = reference_distance(
                m.aucs, m.forget_accuracy, self.reference, self.task_distance, m.heldout_accuracy
            )
        else:
            d = mia_distance(m.aucs, self.target, self.default_target, self.task_distance)
        kept = kept_deviation(m.accuracy, self.baseline) if self.kept_level else None
        # ia.kept_level: a box, as the reference distance is, so a kept-task rise cannot hide
        return d if d is None or kept is None else max(d, kept)
