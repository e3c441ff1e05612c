"""The unseen-data guard (``ia.unseen_guard``; a deviation from the paper, docs/methods.md, "The
unseen-data guard").

An exact retrain keeps what the forgotten data taught the model *about the population*: on
``digits-clients`` its held-out accuracy equals the pre-request model's (median −0.003 over 60
request-tasks), while the interference-aware update ends 2–5 points below it on the forgotten tasks
(docs/benchmarks.md). Ascending the forget loss also ascends the loss of data no client
contributed. With the guard, each task's forget gradient is made orthogonal to the same task's loss
gradient on a mini-batch of held-out rows too (beside the retain partitions' gradients, Eq. 10), so
to first order a step leaves the unseen population's loss where it was.

The guard reads only one half of the held-out split (its even positions); the other half
(:func:`scoring_rows`) is never differentiated, so a benchmark can score held-out accuracy on rows
the update did not fit. The guard never trains on held-out rows: it only removes directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.unlearning.grads import Cycler
from worker.unlearning.types import Batch


def guard_rows(heldout: Batch) -> Batch:
    """The held-out rows the guard differentiates: the split's even positions."""
    return heldout.select(torch.arange(0, len(heldout), 2))


def scoring_rows(heldout: Batch) -> Batch:
    """The held-out rows the guard never reads (the odd positions): where a benchmark scores
    held-out accuracy free of the guard's fit."""
    return heldout.select(torch.arange(1, len(heldout), 2))


class GuardSchedule:
    """The guard's held-out mini-batches over an update's steps (``ia.unseen_guard_batch`` rows
    each), differentiated every ``every`` steps (``ia.unseen_guard_every``); in between the last
    gradient is reused, so every step's forget term is guarded."""

    def __init__(self, rows: Batch, size: int, every: int, gen: torch.Generator) -> None:
        self.cycler, self.every = Cycler(rows, size, gen), every
        self.fresh = False
        self.last: Tensor | None = None  # [1, T, D]: the last differentiated guard partition

    def batches(self, step: int) -> list[Batch]:
        """The guard's partition to differentiate at ``step`` (none between recomputations)."""
        self.fresh = step % self.every == 0
        return [self.cycler.next()] if self.fresh else []

    def with_guard(self, flat: Tensor) -> Tensor:
        """The step's packed partition gradients ``[P, T, D]`` with the guard's as the last
        partition: this step's own (kept for later steps), else the last ones appended."""
        if self.fresh:
            self.last = flat[-1:]
            return flat
        assert self.last is not None  # step 0 is always a recomputation
        return torch.cat([flat, self.last])
