"""Subset-ID pruning (subset-wise paper Algorithm 1 step 5): a forgotten client's output of the
subset-ID head is suppressed for good.

A pruned output ``k`` has weight row 0 and bias ``PRUNED_LOGIT`` (the most negative finite float of
the head's dtype), so its logit is exactly ``PRUNED_LOGIT`` for every finite input. Why it cannot
win: every other logit is a finite number ≥ ``PRUNED_LOGIT``, so ``argmax`` picks ``k`` only if all
logits are pruned (or overflowed); its softmax probability underflows to exactly 0, so its
cross-entropy gradient is exactly 0 and plain training (SGD, Adam, AdamW) leaves the row at 0 and
the bias at (or, with weight decay, a hair above) ``PRUNED_LOGIT``. A finite value keeps losses and
``p·log p`` terms finite (−inf would give NaN). The engine re-applies the recorded outputs after
every later round (:func:`reapply_pruning`), which restores the exact values whatever happened in
between.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from worker.unlearning.lora import trainable_head
from worker.unlearning.types import SUBSET_HEAD


def pruned_logit(dtype: torch.dtype = torch.float32) -> float:
    """The bias of a pruned output: the most negative finite value of ``dtype``."""
    return float(torch.finfo(dtype).min)


PRUNED_LOGIT = pruned_logit(torch.float32)


def _heads_to_prune(model: nn.Module, head: str) -> list[nn.Linear]:
    """The trainable copy of ``head`` (peft) — or the plain head of an unwrapped model."""
    return [trainable_head(model, head)]


def prune_outputs(model: nn.Module, outputs: Iterable[int], *, head: str = SUBSET_HEAD) -> list[int]:
    """Suppress ``outputs`` of ``head`` (in place); returns the sorted outputs pruned."""
    idx_list = sorted({int(o) for o in outputs})
    if not idx_list:
        return []
    for linear in _heads_to_prune(model, head):
        n_out = int(linear.weight.shape[0])
        bad = [o for o in idx_list if not 0 <= o < n_out]
        if bad:
            raise IndexError(f"head {head!r} has {n_out} outputs; cannot prune {bad}")
        if linear.bias is None:
            raise ValueError(f"head {head!r} has no bias: its outputs cannot be suppressed")
        idx = torch.tensor(idx_list, dtype=torch.long, device=linear.weight.device)
        with torch.no_grad():
            linear.weight.index_fill_(0, idx, 0.0)
            linear.bias.index_fill_(0, idx, pruned_logit(linear.bias.dtype))
    return idx_list


def reapply_pruning(model: nn.Module, outputs: Iterable[int], *, head: str = SUBSET_HEAD) -> list[int]:
    """Re-apply the recorded pruned outputs (after any later update); same as :func:`prune_outputs`."""
    return prune_outputs(model, outputs, head=head)


def is_pruned(model: nn.Module, output: int, *, head: str = SUBSET_HEAD) -> bool:
    """True if ``output`` of ``head`` is still suppressed: weight row exactly 0 and the bias within
    a factor 1e-8 of ``PRUNED_LOGIT`` (weight decay shrinks it geometrically; re-application
    restores the exact value)."""
    linear = trainable_head(model, head)
    bias: Tensor | None = linear.bias
    if bias is None:
        return False
    row_zero = bool((linear.weight[output].detach() == 0).all())
    return row_zero and float(bias[output].detach()) <= pruned_logit(bias.dtype) * 1e-8
