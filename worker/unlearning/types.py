"""Shared vocabulary of the ML core: tasks, batches and the multi-task loss.

A model of the core is an ``nn.Module`` whose ``forward(inputs)`` (``inputs`` a ``dict[str,
Tensor]``, one row per sample in every leaf) returns ``dict[str, Tensor]``: one
entry per main task (keyed by task name) and one for the subset-ID head (key ``SUBSET_HEAD``).
Labels use ``IGNORE`` (-1) for classification (long labels) and NaN for regression (float
targets) where a sample has no supervision for a task (it was never labelled, it was forgotten for
that task, or its label was purged): :func:`is_supervised` / :func:`unsupervised_value` tell them
by the label tensor's dtype, so the core never compares labels with ``IGNORE`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUBSET_HEAD = "subset_id"
IGNORE = -1


def is_supervised(target: Tensor) -> Tensor:
    """Bool mask ``[N]`` of the samples with a label: no NaN in the row (float targets), not
    ``IGNORE`` (others)."""
    if target.is_floating_point():
        return ~torch.isnan(target).reshape(target.shape[0], -1).any(dim=1)
    return target != IGNORE


def without_labels(target: Tensor, rows: Tensor) -> Tensor:
    """A copy of ``target`` with the rows of the bool mask ``rows`` unlabelled (IGNORE / NaN)."""
    mask = rows.reshape(-1, *([1] * (target.dim() - 1)))
    return torch.where(mask, torch.full_like(target, unsupervised_value(target)), target)


def unsupervised_value(target: Tensor) -> float:
    """The "no label" value of ``target``'s dtype: NaN for float targets, ``IGNORE`` otherwise."""
    return float("nan") if target.is_floating_point() else IGNORE


def unsupervised_like(target: Tensor, n: int) -> Tensor:
    """``n`` "no label" entries of ``target``'s dtype and device."""
    return torch.full(
        (n, *target.shape[1:]), unsupervised_value(target), dtype=target.dtype, device=target.device
    )


class TaskSpec(Protocol):
    """A main task: its head width, its per-sample loss and its metric (higher is better)."""

    @property
    def name(self) -> str: ...

    @property
    def num_outputs(self) -> int: ...

    @property
    def weight(self) -> float: ...

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Loss of each sample, shape ``[N]``; 0 where the sample has no label."""
        ...

    def supervised(self, target: Tensor) -> Tensor:
        """Bool mask ``[N]`` of the samples with a label for this task."""
        ...

    def metric(self, output: Tensor, target: Tensor) -> float:
        """Task metric over the supervised samples (NaN when there are none)."""
        ...


@dataclass(frozen=True)
class ClassificationTask:
    """Multi-class classification: cross-entropy loss, accuracy metric. Targets are class indices
    ``[N]`` (``IGNORE`` = no label) or class probabilities ``[N, C]`` (a NaN row = no label; the
    interference-aware update's distilled retain targets, :func:`soft_targets`), whose accuracy
    counts the most probable class."""

    name: str
    num_outputs: int
    weight: float = 1.0

    def supervised(self, target: Tensor) -> Tensor:
        return is_supervised(target)

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        supervised = self.supervised(target)
        safe_target = torch.where(supervised.reshape(-1, *([1] * (target.dim() - 1))), target,
                                  torch.zeros_like(target))  # fmt: skip
        loss = F.cross_entropy(output, safe_target, reduction="none")
        return loss * supervised.to(loss.dtype)

    def per_sample_metric(self, output: Tensor, target: Tensor) -> Tensor:
        """1 where the predicted class is the label, else 0, shape ``[N]`` (meaningless where the
        sample has no label): :meth:`metric` is its mean over the supervised samples."""
        classes = target.argmax(dim=-1) if target.is_floating_point() else target
        return (output.argmax(dim=-1) == classes).to(torch.float32)

    def metric(self, output: Tensor, target: Tensor) -> float:
        supervised = self.supervised(target)
        if not bool(supervised.any()):
            return float("nan")
        return float(self.per_sample_metric(output, target)[supervised].mean())


def soft_targets(target: Tensor, num_classes: int) -> Tensor:
    """Class-index targets ``[N]`` as one-hot probabilities ``[N, C]`` (``IGNORE`` → a NaN row);
    probabilities are returned as they are."""
    if target.is_floating_point():
        return target
    onehot = F.one_hot(target.clamp_min(0), num_classes).to(torch.float32)
    return torch.where((target != IGNORE)[:, None], onehot, torch.full_like(onehot, float("nan")))


Inputs = dict[str, Tensor]


def num_rows(inputs: Mapping[str, Tensor]) -> int:
    """The number of samples of an input dict (its leaves' first dimension)."""
    return int(next(iter(inputs.values())).shape[0])


def cat_inputs(parts: Sequence[Mapping[str, Tensor]]) -> Inputs:
    """The rows of the input dicts ``parts`` one after the other (leaf by leaf)."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def inputs_to(inputs: Mapping[str, Tensor], device: torch.device | str) -> Inputs:
    return {k: v.to(device) for k, v in inputs.items()}


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (the CPU for a module without any): the device a caller
    moves a CPU batch to before a forward (a GPU worker's rounds; the data store is on the CPU)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def input_rows(inputs: Mapping[str, Tensor], start: int, stop: int) -> Inputs:
    return {k: v[start:stop] for k, v in inputs.items()}


@dataclass(frozen=True)
class RegressionTask:
    """Regression on a float target (NaN = no label): per-sample squared error (summed over the
    outputs when ``num_outputs > 1``, targets then ``[N, num_outputs]``; a row counts as labelled
    when none of its entries is NaN). Metric: the negative mean absolute error over the labelled
    samples (higher is better, 0 = perfect), so that every task's metric is maximised."""

    name: str
    num_outputs: int = 1
    weight: float = 1.0

    def supervised(self, target: Tensor) -> Tensor:
        return is_supervised(target)

    def _pred(self, output: Tensor, target: Tensor) -> Tensor:
        return output.reshape(target.shape) if target.dim() == 1 else output

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        supervised = self.supervised(target)
        safe = torch.where(torch.isnan(target), torch.zeros_like(target), target)
        err = (self._pred(output, target) - safe) ** 2
        loss = err.reshape(err.shape[0], -1).sum(dim=1)
        return loss * supervised.to(loss.dtype)

    def per_sample_metric(self, output: Tensor, target: Tensor) -> Tensor:
        """Minus each sample's absolute error (averaged over its outputs), shape ``[N]`` (NaN where
        the sample has no label): :meth:`metric` is its mean over the supervised samples."""
        err = (self._pred(output, target) - target).abs()
        return -err.reshape(err.shape[0], -1).mean(dim=1)

    def metric(self, output: Tensor, target: Tensor) -> float:
        supervised = self.supervised(target)
        if not bool(supervised.any()):
            return float("nan")
        return float(self.per_sample_metric(output, target)[supervised].mean())

    def metric_standard_error(self, output: Tensor, target: Tensor) -> float:
        """The standard error of :meth:`metric` over the labelled samples (their absolute errors'
        standard deviation / √n): the acceptance check's noise term for a metric that is not a
        proportion (NaN without two labelled samples)."""
        supervised = self.supervised(target)
        n = int(supervised.sum())
        if n < 2:
            return float("nan")
        scores = self.per_sample_metric(output, target)[supervised]
        return float(scores.std() / math.sqrt(n))


@dataclass
class Batch:
    """Inputs (the model's input dict) and targets of a set of samples."""

    inputs: dict[str, Tensor]
    labels: dict[str, Tensor]
    subset: Tensor  # index of the sample's client in the subset-ID head; IGNORE if none
    sample_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.subset.shape[0])

    @property
    def device(self) -> torch.device:
        return self.subset.device

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            labels={name: y.to(device) for name, y in self.labels.items()},
            subset=self.subset.to(device),
            sample_ids=self.sample_ids,
        )

    def select(self, index: Tensor) -> Batch:
        """The rows ``index`` (a long or bool tensor) of this batch."""
        if index.dtype == torch.bool:
            index = index.nonzero(as_tuple=True)[0]
        ids = [self.sample_ids[i] for i in index.tolist()] if self.sample_ids else []
        return Batch(
            inputs={k: v[index] for k, v in self.inputs.items()},
            labels={name: y[index] for name, y in self.labels.items()},
            subset=self.subset[index],
            sample_ids=ids,
        )

    def split(self, size: int) -> list[Batch]:
        """Consecutive mini-batches of at most ``size`` rows."""
        n = len(self)
        return [self.select(torch.arange(i, min(i + size, n))) for i in range(0, n, size)]


def main_task_losses(
    outputs: dict[str, Tensor], labels: dict[str, Tensor], tasks: Sequence[TaskSpec]
) -> Tensor:
    """Weighted sum over ``tasks`` of each sample's loss, shape ``[N]`` (interference paper Eq. 2)."""
    total: Tensor | None = None
    for task in tasks:
        term = task.weight * task.per_sample_loss(outputs[task.name], labels[task.name])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("main_task_losses needs at least one task")
    return total


def main_task_loss(
    outputs: dict[str, Tensor], labels: dict[str, Tensor], tasks: Sequence[TaskSpec]
) -> Tensor:
    """Mean over supervised (sample, task) pairs of the weighted task losses: a scalar."""
    per_sample = main_task_losses(outputs, labels, tasks)
    supervised = sum(t.supervised(labels[t.name]).to(per_sample.dtype) for t in tasks)
    denominator = torch.clamp(torch.as_tensor(supervised).sum(), min=1.0)
    return per_sample.sum() / denominator


@dataclass(frozen=True)
class ForgetSpec:
    """One forget request, as the pipeline hands it to the engine (docs/architecture.md).

    ``kind="client"``: forget the client's samples (``sample_ids`` None = all of them) for
    ``tasks`` (empty = every task: full-task unlearning). ``kind="task"``: forget ``tasks`` (a
    non-empty list) for ``sample_ids`` (None = all samples of ``client_id``): partial-task
    unlearning when some tasks remain.
    """

    request_id: str
    kind: Literal["client", "task"]
    client_id: str | None
    sample_ids: list[str] | None
    tasks: list[str]


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """The rows of ``batches`` one after the other (tasks missing from a batch are unlabelled, in
    the dtype the task has in the other batches: ``IGNORE`` or NaN)."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    names: list[str] = []
    for b in batches:
        names.extend(n for n in b.labels if n not in names)
    like = {n: next(b.labels[n] for b in batches if n in b.labels) for n in names}
    batches, like = _soft_where_any(batches, like)
    labels = {
        n: torch.cat(
            [
                b.labels[n] if n in b.labels else unsupervised_like(like[n], len(b)).to(b.device)
                for b in batches
            ]
        )
        for n in names
    }
    with_ids = all(len(b.sample_ids) == len(b) for b in batches)
    keys = list(batches[0].inputs)
    if any(list(b.inputs) != keys for b in batches):
        raise ValueError("concat_batches needs batches with the same input keys")
    return Batch(
        inputs={k: torch.cat([b.inputs[k] for b in batches]) for k in keys},
        labels=labels,
        subset=torch.cat([b.subset for b in batches]),
        sample_ids=[s for b in batches for s in b.sample_ids] if with_ids else [],
    )


def _soft_where_any(
    batches: Sequence[Batch], like: dict[str, Tensor]
) -> tuple[list[Batch], dict[str, Tensor]]:
    """A task with float rows ``[N, C]`` (class probabilities) in some batches and class indices in
    others gets probabilities everywhere (:func:`soft_targets`), so that its labels concatenate."""
    out, like = list(batches), dict(like)
    for name in like:
        probs = next((b.labels[name] for b in out if _is_soft(b.labels.get(name))), None)
        if probs is None:
            continue
        like[name] = probs
        out = [
            replace(b, labels={**b.labels, name: soft_targets(b.labels[name], probs.shape[1])})
            if name in b.labels
            else b
            for b in out
        ]
    return out, like


def _is_soft(target: Tensor | None) -> bool:
    """Float rows ``[N, C]``: class probabilities (or a multi-output regression's values, which
    :func:`soft_targets` leaves as they are)."""
    return target is not None and target.is_floating_point() and target.dim() == 2


def empty_batch(like: Batch, task_names: Sequence[str]) -> Batch:
    """A batch of zero rows with the inputs (keys, per-sample shapes, dtypes) of ``like``."""
    return Batch(
        inputs={k: v[:0] for k, v in like.inputs.items()},
        labels={name: torch.zeros(0, dtype=torch.long) for name in task_names},
        subset=torch.zeros(0, dtype=torch.long),
        sample_ids=[],
    )


@dataclass
class Partitions:
    """The four data partitions of one forget request (interference paper Eq. 3).

    Each partition is a ``Batch`` whose labels are ``IGNORE`` outside its task set, so that one
    masked loss serves all four. Retain partitions over X_r use the seeded anchor subset.
    """

    forget: Batch  # D_f        = X_f x T_f
    retain_task: Batch  # D_r^task   = X_f x T_r (empty when T_r is empty: full-task request)
    retain_inst: Batch  # D_r^inst   = X_r x T_f
    retain_clean: Batch  # D_r^clean  = X_r x T_r (empty in full-task requests)
    forget_tasks: list[str]
    retain_tasks: list[str]
    anchor_sample_ids: list[str]
