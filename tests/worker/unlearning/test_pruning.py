"""Subset-ID pruning: a pruned output never wins, and stays pruned through training + re-application."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.unlearning.lora import trainable_head
from worker.unlearning.model import wrap_lora
from worker.unlearning.pruning import PRUNED_LOGIT, is_pruned, prune_outputs, reapply_pruning
from worker.unlearning.types import SUBSET_HEAD
from worker.unlearning.workloads.mlp import NetConfig, mlp_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = mlp_model(
        NetConfig(input_dim=4, hidden_dims=(8,), embed_dim=8, task_outputs={"a": 3}, num_subsets=4)
    )
    return wrap_lora(net, rank=4, seed=0)


def _favour(model: nn.Module, output: int) -> None:
    """Make ``output`` the subset-ID head's winner on every input (before pruning)."""
    head = trainable_head(model, SUBSET_HEAD)
    with torch.no_grad():
        head.bias[output] = 1e3


def test_pruned_output_never_wins_and_has_zero_probability() -> None:
    model = _model()
    _favour(model, 2)
    x = torch.randn(256, 4) * 10
    assert bool((model({"x": x})[SUBSET_HEAD].argmax(-1) == 2).all())
    assert prune_outputs(model, [2, 2]) == [2]
    logits = model({"x": x})[SUBSET_HEAD]
    assert not bool((logits.argmax(-1) == 2).any())
    assert bool((logits[:, 2] == PRUNED_LOGIT).all())  # exactly the bias, whatever the input
    assert bool((torch.softmax(logits, -1)[:, 2] == 0).all())
    assert torch.isfinite(F.log_softmax(logits, -1)[:, [0, 1, 3]]).all()
    assert is_pruned(model, 2)
    assert not is_pruned(model, 1)


def test_pruning_persists_through_training_and_reapplication() -> None:
    model = _model()
    prune_outputs(model, [1])
    head = trainable_head(model, SUBSET_HEAD)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.5, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(32, 4, generator=gen)
        # the retain set of a later round has no sample of the pruned client (label 1)
        target = torch.tensor([0, 2, 3])[torch.randint(0, 3, (32,), generator=gen)]
        out = model({"x": x})
        loss = F.cross_entropy(out[SUBSET_HEAD], target) + F.cross_entropy(out["a"], target % 3)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    x = torch.randn(512, 4, generator=gen) * 5
    assert not bool((model({"x": x})[SUBSET_HEAD].argmax(-1) == 1).any())
    assert bool((head.weight[1] == 0).all())  # zero gradient: AdamW never moves the row
    assert is_pruned(model, 1)
    # an adversarial update (e.g. a method that touches the head) is undone by re-application
    with torch.no_grad():
        head.weight[1] += 5.0
        head.bias[1] = 100.0
    assert bool((model({"x": x})[SUBSET_HEAD].argmax(-1) == 1).any())
    reapply_pruning(model, [1])
    assert not bool((model({"x": x})[SUBSET_HEAD].argmax(-1) == 1).any())
    assert float(head.bias[1].detach()) == PRUNED_LOGIT


def test_pruning_touches_only_the_trainable_copy() -> None:
    model = _model()
    wrapper = model.get_submodule(f"base_model.model.heads.{SUBSET_HEAD}")
    original = wrapper.get_submodule("original_module")
    assert isinstance(original, nn.Linear)
    before = original.bias.detach().clone()
    prune_outputs(model, [0, 3])
    assert torch.equal(original.bias.detach(), before)
    assert is_pruned(model, 0)
    assert is_pruned(model, 3)


def test_out_of_range_output_is_rejected() -> None:
    with pytest.raises(IndexError):
        prune_outputs(_model(), [4])
