"""The forget term's targets from the reference adapters that never saw the client
(``ia.forget_targets: "references"``; a deviation from the interference paper, docs/methods.md
"The forget term towards the references' predictions").

Eq. 11's forget term ascends the task loss on D_f's labels: it pushes the forgotten samples away
from their labels without end, and only early stopping decides where the update stops. A model
that never saw the client does not answer "anything but the label" on its samples; it answers what
the rest of the population taught it. The OUT reference adapters (trained once per model version on
random halves of the clients, off the request path: :mod:`worker.unlearning.reference_adapters`)
are such models. With this setting each forgotten row's target for each forgotten task is the mean,
over the references OUT for the row's client, of their prediction (class probabilities averaged; a
regression's value averaged), and the forget term *descends* the loss towards it — still projected
on the task's subspace and orthogonalised against the retain gradients. Its fixed point is a model
that treats the client's samples as the references do, rather than one that is merely wrong on
them; early stopping still keeps the checkpoint closest to the per-client target.

No retrain of the request is read: the references' outputs on every client's samples are computed
when the references are trained (``row_outputs``), so this costs the request path no forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from worker.unlearning.reference_adapters import LoadedReferences
from worker.unlearning.types import Batch, ClassificationTask, TaskSpec


def mean_prediction(task: TaskSpec, outputs: Tensor, out: Tensor) -> Tensor:
    """The mean prediction over the references OUT for each row: ``outputs`` ``[K, N, ...]`` (each
    reference's raw output), ``out`` ``[K, N]`` bool. Class probabilities ``[N, C]`` for a
    classification task, values shaped as the task's output otherwise; a row with no OUT reference
    is NaN (unlabelled)."""
    preds = torch.softmax(outputs, dim=-1) if isinstance(task, ClassificationTask) else outputs
    weights = out.to(preds.dtype).reshape(*out.shape, *([1] * (preds.dim() - 2)))
    count = weights.sum(0)
    mean = (preds * weights).sum(0) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def reference_forget_targets(
    references: LoadedReferences | None,
    tasks: Sequence[TaskSpec],
    *,
    forget: Batch,
    forget_tasks: Sequence[str],
    client_index: Mapping[str, int] | None,
    device: str = "cpu",
) -> tuple[Batch | None, dict[str, Any]]:
    """``forget`` with each forgotten task's labels replaced by the OUT references' mean prediction
    (:func:`mean_prediction`), and the evidence (references used, rows with a target). ``None``
    (the forget term keeps the labels, the reason says why) without references, or where no
    reference is OUT for any forgotten row."""
    if references is None or client_index is None or not references.models:
        return None, {"source": "labels", "reason": "no reference adapters for this model"}
    out = references.refs.out_mask(forget.subset.cpu(), dict(client_index))  # [K, N]
    active = [r for r, any_out in enumerate(out.any(dim=1).tolist()) if any_out]
    if not active:  # also an empty forget set
        return None, {"source": "labels", "reason": "no reference that never saw the forgotten rows' clients"}
    outputs = [references.outputs(r, [("forget", forget)], device) for r in active]
    mask = out[active]
    labels = dict(forget.labels)
    covered: dict[str, int] = {}
    for task in tasks:
        name = task.name
        if name not in forget_tasks or name not in labels:
            continue
        stacked = torch.stack([o[name].detach().cpu() for o in outputs])
        target = mean_prediction(task, stacked, mask)
        if not isinstance(task, ClassificationTask):
            target = target.reshape(labels[name].shape).to(labels[name].dtype)
        # only the rows labelled for the task get a target: the others stay out of the forget term
        keep = task.supervised(labels[name].cpu())
        target = torch.where(keep.reshape(-1, *([1] * (target.dim() - 1))), target,
                             torch.full_like(target, float("nan")))  # fmt: skip
        labels[name] = target.to(forget.labels[name].device)
        covered[name] = int(task.supervised(target).sum())
    evidence = {
        "source": "references",
        "references": len(active),
        "rows_with_target": covered,
        "rows": len(forget),
    }
    return replace(forget, labels=labels), evidence
