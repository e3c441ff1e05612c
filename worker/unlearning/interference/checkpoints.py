"""Early stopping: what is measured after every epoch, and which checkpoint is kept.

After every epoch (a pass over D_f) the forget-vs-held-out loss-MIA AUC and the accuracy on the
retain check rows are measured; the checkpoint whose AUC is closest to the target (the retrain
reference's when given, else ``mia_target``, default 0.5) among those within the retain tolerance
is kept — epoch 0, the model as given, included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from worker.unlearning.audit import mia_from_outputs, model_outputs
from worker.unlearning.interference.retain import retain_accuracy, retain_drop
from worker.unlearning.lora import Forward
from worker.unlearning.types import Batch, TaskSpec, cat_inputs, inputs_to


def mia_distance(
    aucs: Mapping[str, float], target: float | Mapping[str, float], default: float
) -> float | None:
    if not aucs:
        return None
    gaps = []
    for t, auc in aucs.items():
        goal = target.get(t, default) if isinstance(target, Mapping) else float(target)
        gaps.append(abs(auc - goal))
    return float(sum(gaps) / len(gaps))


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

    def __call__(self, model: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        out = model_outputs(model, self.inputs, forward=self.forward)
        parts = {k: torch.split(v, self.sizes) for k, v in out.items()}
        f_out, v_out, c_out = ({k: p[i] for k, p in parts.items()} for i in range(3))
        aucs = mia_from_outputs(self.forget_tasks, f_out, self.forget, v_out, self.heldout)
        return aucs, retain_accuracy(self.tasks, c_out, self.check, self.forget.sample_ids, self.anchor_ids)


def select_checkpoint(history: Sequence[Mapping[str, Any]], tolerance: float) -> int:
    """The index in ``history`` early stopping keeps: among the checkpoints whose ``retain_drop``
    is within ``tolerance``, the one whose MIA ``distance`` to the target is smallest (earliest on
    ties); when none is within it, the one with the smallest drop. A checkpoint without a distance
    ranks after those with one."""

    def closeness(i: int) -> tuple[float, int]:
        d = history[i]["distance"]
        return (math.inf if d is None else float(d), i)

    within = [i for i, h in enumerate(history) if h["retain_drop"] <= tolerance + 1e-12]
    if within:
        return min(within, key=closeness)
    return min(range(len(history)), key=lambda i: (history[i]["retain_drop"], *closeness(i)))


class Checkpoints:
    """The model after every epoch (epoch 0: as given): what the :class:`Monitor` measured, and a
    copy of the updated parameters, so that early stopping can restore the one it keeps.

    ``retain_baseline``: the accuracy the retain drop is measured from (``None``: epoch 0's)."""

    def __init__(
        self,
        monitor: Monitor,
        params: Mapping[str, Tensor],
        *,
        target: float | Mapping[str, float],
        default_target: float,
        retain_baseline: Mapping[str, float] | None,
    ) -> None:
        self.monitor, self.params = monitor, dict(params)
        self.target, self.default_target = target, default_target
        self.measure_baseline = retain_baseline is None
        self.baseline: dict[str, float] = dict(retain_baseline or {})
        self.history: list[dict[str, Any]] = []
        self.states: list[dict[str, Tensor]] = []

    def record(self, model: nn.Module, epoch: int) -> None:
        aucs, accuracy = self.monitor(model)
        if not self.history and self.measure_baseline:
            self.baseline.update(accuracy)
        self.history.append(
            {
                "epoch": epoch,
                "mia_auc": aucs,
                "distance": mia_distance(aucs, self.target, self.default_target),
                "retain_accuracy": accuracy,
                "retain_drop": retain_drop(accuracy, self.baseline),
            }
        )
        self.states.append({n: p.detach().clone() for n, p in self.params.items()})
