"""What Eq. 11's forget term ascends on D_f's labels (``ia.forget_loss``; docs/methods.md, "The
forget term's loss").

The paper ascends the task loss, cross-entropy for a classification task. Its gradient on the
logits is ``p − y``: a sample the model fits confidently (``p_y → 1``) barely moves, while one
near the decision boundary flips. Memorised samples are the confident ones, and a loss-based
membership attack ranks exactly them: ascent lowers the forget set's accuracy before its losses
look unseen (measured on ``digits-clients``' per-task requests: the kept checkpoint at the target's
accuracy, its MIA AUC a median 0.043 above the target's).

``"unlikelihood"`` ascends ``log(1 − p_y)`` instead (the unlikelihood objective, Welleck et al.
2020, as a forget loss): its gradient on the label's logit is ``−p_y``, largest on the confident
samples and vanishing once a sample no longer predicts its label, so the update spends its step
where a membership attack looks. ``"log_odds"`` ascends ``log((1 − p_y) / p_y)``, the sum of the
two: its gradient on the label's logit is −1 whatever the confidence. A regression task keeps its
loss (there is no ``p_y``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from worker.unlearning.types import ClassificationTask, TaskSpec, soft_targets


def log_unlikelihood(output: Tensor, target: Tensor) -> Tensor:
    """``log(1 − Σ_k q_k·softmax(output)_k)`` per row ``[N]`` for class probabilities ``q``
    (``log(1 − p_y)`` for a one-hot label), stable as that probability nears 1: since the
    probabilities sum to 1 it is ``log Σ_k (1 − q_k)·p_k``, a log-sum-exp of the logits shifted by
    ``log(1 − q_k)`` minus that of the logits."""
    shifted = output + torch.log((1.0 - target).clamp_min(0.0))
    return torch.logsumexp(shifted, dim=-1) - torch.logsumexp(output, dim=-1)


@dataclass(frozen=True)
class Unlikelihood:
    """A classification task whose per-sample "loss" is ``log(1 − p_y)`` (0 where unlabelled): the
    quantity the forget term ascends with ``ia.forget_loss: "unlikelihood"``. Everything else is
    the wrapped task's."""

    task: ClassificationTask
    # ``"log_odds"``: plus the cross-entropy, i.e. ``log((1 − p_y) / p_y)``, whose gradient on the
    # label's logit is −1 for every sample: neither the unsure nor the confident ones first
    plus_cross_entropy: bool = False

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def num_outputs(self) -> int:
        return self.task.num_outputs

    @property
    def weight(self) -> float:
        return self.task.weight

    def supervised(self, target: Tensor) -> Tensor:
        return self.task.supervised(target)

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        supervised = self.supervised(target)
        probs = soft_targets(target, self.num_outputs)  # class indices as one-hot rows
        safe = torch.where(supervised[:, None], probs, torch.zeros_like(probs))
        loss = log_unlikelihood(output, safe) * supervised.to(output.dtype)
        return loss + self.task.per_sample_loss(output, target) if self.plus_cross_entropy else loss

    def metric(self, output: Tensor, target: Tensor) -> float:
        return self.task.metric(output, target)


#: what the forget term ascends on the labels under each new ``ia.forget_loss`` (the evidence's name;
#: ``"cross_entropy"``, the paper's, is "ascend on the labels")
ASCENDED = {"unlikelihood": "log(1 − p_y)", "log_odds": "log((1 − p_y) / p_y)"}


def forget_loss_tasks(tasks: Sequence[TaskSpec], mode: str) -> list[TaskSpec] | None:
    """The tasks whose losses the forget partition differentiates: ``None`` (the tasks' own losses,
    ``"cross_entropy"``: the paper) or each classification task as :class:`Unlikelihood`
    (``"unlikelihood"``; ``"log_odds"``: plus the cross-entropy)."""
    if mode == "cross_entropy":
        return None
    if mode not in ASCENDED:
        raise ValueError(f"unknown forget loss {mode!r}")
    plus = mode == "log_odds"
    return [Unlikelihood(t, plus) if isinstance(t, ClassificationTask) else t for t in tasks]
