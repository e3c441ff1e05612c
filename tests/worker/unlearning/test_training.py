"""The v1 recipe's options (:mod:`worker.unlearning.training`)."""

from __future__ import annotations

import pytest
import torch

from tests.worker.unlearning.toy_nets import toy_batch, toy_model
from worker.unlearning.training import TrainConfig, v1_loss
from worker.unlearning.types import ClassificationTask, concat_batches

TASKS = [ClassificationTask("a", 3), ClassificationTask("b", 2)]


def _grads(detach: bool) -> dict[str, torch.Tensor]:
    """Gradients of L_aux alone (λ_main = λ_dis = 0) on a trained-looking adapter (B ≠ 0)."""
    model = toy_model(hidden=8, rank=2, num_subsets=2)
    batch = concat_batches([toy_batch(8, seed=1, subset=0), toy_batch(8, seed=2, subset=1)])
    cfg = TrainConfig(lambda_main=0.0, lambda_aux=1.0, lambda_dis=0.0, detach_subset_head=detach)
    v1_loss(model, batch, TASKS, cfg, phase_two=True).backward()  # type: ignore[no-untyped-call]
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("detach", [False, True])
def test_detached_subset_head_trains_the_head_and_leaves_the_adapter_to_the_tasks(detach: bool) -> None:
    """``detach_subset_head`` (new; the scenes recipe): L_aux still trains the subset-ID head, but
    no longer moves the LoRA factors, so the client classifier stops taking the small adapter's
    capacity from the tasks. Without it (the old and default behaviour) L_aux reaches the adapter."""
    grads = _grads(detach)
    head = [g for n, g in grads.items() if "subset_id" in n]
    lora = [g for n, g in grads.items() if "lora_" in n]
    assert head
    assert any(bool(g.abs().sum() > 0) for g in head)
    lora_moved = any(bool(g.abs().sum() > 0) for g in lora)
    assert lora_moved is not detach
