"""The toy peft model and partitions the interference-aware tests share."""

from __future__ import annotations

import torch
from torch import nn

from worker.unlearning.interference.layout import FlatLayout
from worker.unlearning.lora import lora_pairs, param_groups
from worker.unlearning.model import wrap_lora
from worker.unlearning.types import IGNORE, Batch, ClassificationTask, Partitions
from worker.unlearning.workloads.mlp import NetConfig, mlp_model

TASKS = [ClassificationTask("a", 3), ClassificationTask("b", 2)]


def ia_model(seed: int = 0, *, trained: bool = True) -> nn.Module:
    net = mlp_model(
        NetConfig(input_dim=5, hidden_dims=(6,), embed_dim=6, task_outputs={"a": 3, "b": 2}, num_subsets=3)
    )
    model = wrap_lora(net, rank=4, seed=seed)
    if trained:  # a trained adapter has B != 0
        gen = torch.Generator().manual_seed(seed + 1)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for pair in lora_pairs(model):
                params[pair.b].copy_(torch.randn(params[pair.b].shape, generator=gen) * 0.3)
    return model


def ia_batch(n: int, seed: int, tasks: list[str]) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 3, (n,), generator=gen)
    b = torch.randint(0, 2, (n,), generator=gen)
    labels = {
        "a": a if "a" in tasks else torch.full((n,), IGNORE, dtype=torch.long),
        "b": b if "b" in tasks else torch.full((n,), IGNORE, dtype=torch.long),
    }
    return Batch(
        inputs={"x": torch.randn(n, 5, generator=gen)},
        labels=labels,
        subset=torch.zeros(n, dtype=torch.long),
        sample_ids=[f"{seed}-{i}" for i in range(n)],
    )


def empty_batch() -> Batch:
    return ia_batch(0, 0, [])


def partial_partitions() -> Partitions:
    """Partial-task request: forget task "a" on 6 instances, keep "b"."""
    return Partitions(
        forget=ia_batch(6, 1, ["a"]),
        retain_task=ia_batch(6, 1, ["b"]),
        retain_inst=ia_batch(8, 2, ["a"]),
        retain_clean=ia_batch(8, 2, ["b"]),
        forget_tasks=["a"],
        retain_tasks=["b"],
        anchor_sample_ids=[],
    )


def head_a_layout(model: nn.Module) -> FlatLayout:
    groups = param_groups(model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return FlatLayout(shapes, groups.lora, groups.head_params(["a"]))


def layout_pairs(model: nn.Module) -> list[tuple[str, str]]:
    return [(p.a, p.b) for p in lora_pairs(model)]
