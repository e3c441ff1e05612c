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

from worker.unlearning.types import Batch


def guard_rows(heldout: Batch) -> Batch:
    """The held-out rows the guard differentiates: the split's even positions."""
    return heldout.select(torch.arange(0, len(heldout), 2))


def scoring_rows(heldout: Batch) -> Batch:
    """The held-out rows the guard never reads (the odd positions): where a benchmark scores
    held-out accuracy free of the guard's fit."""
    return heldout.select(torch.arange(1, len(heldout), 2))
