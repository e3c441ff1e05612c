"""Small seeded networks and batches shared by the ML-core unit tests (tasks ``a``: 3 classes,
``b``: 2 classes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from worker.unlearning.lora import lora_pairs
from worker.unlearning.model import wrap_lora
from worker.unlearning.types import IGNORE, Batch
from worker.unlearning.workloads.mlp import NetConfig, mlp_model


def toy_model(
    *, hidden: int, rank: int, num_subsets: int, b_scale: float = 0.3, input_dim: int = 4
) -> nn.Module:
    """A seeded MLP model (one hidden layer, embedding of the same width) with a LoRA
    adapter whose B factors are drawn from N(0, ``b_scale``²) — a trained adapter has B ≠ 0, so
    the A factors get gradients; ``b_scale = 0`` keeps the fresh adapter (B = 0)."""
    torch.manual_seed(0)
    net = mlp_model(
        NetConfig(
            input_dim=input_dim,
            hidden_dims=(hidden,),
            embed_dim=hidden,
            task_outputs={"a": 3, "b": 2},
            num_subsets=num_subsets,
        )
    )
    model = wrap_lora(net, rank=rank, seed=0)
    if b_scale:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for pair in lora_pairs(model):
                params[pair.b].normal_(0.0, b_scale)
    return model


def toy_batch(
    n: int, seed: int, tasks: Sequence[str] = ("a", "b"), *, subset: int = 0, input_dim: int = 4
) -> Batch:
    """``n`` seeded samples with labels for ``tasks`` (``IGNORE`` for the others), subset label
    ``subset`` and sample ids ``"<seed>-<i>"``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 3, (n,), generator=gen)
    b = torch.randint(0, 2, (n,), generator=gen)
    return Batch(
        inputs={"x": torch.randn(n, input_dim, generator=gen)},
        labels={
            "a": a if "a" in tasks else torch.full((n,), IGNORE, dtype=torch.long),
            "b": b if "b" in tasks else torch.full((n,), IGNORE, dtype=torch.long),
        },
        subset=torch.full((n,), subset, dtype=torch.long),
        sample_ids=[f"{seed}-{i}" for i in range(n)],
    )
