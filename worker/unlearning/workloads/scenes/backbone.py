"""The scenes backbone: a small transformers ``ViTModel`` built from a config (nothing downloaded).

Pooling is the CLS token of ``last_hidden_state`` (after ViT's final layer norm); one ``nn.Linear``
head per task on top. LoRA targets the four attention projections, named ``q_proj`` / ``k_proj`` /
``v_proj`` / ``o_proj`` in transformers 5 (``layers.N.attention.q_proj``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import ViTConfig, ViTModel

from worker.unlearning.workloads.scenes.generator import TASKS

#: every attention projection, not only q / v (since 3 Dec 2026): with q / v alone v1 lost 2.3–2.4
#: points of held-out ``scale`` R² against the base on data seeds 1–2 (issue 7 part 4 allows 2);
#: with all four it loses 0.8 / 1.1 / 0.5 on seeds 0 / 1 / 2 and fits more of its clients' rules
#: (docs/workloads.md, "LoRA on every attention projection")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: the adapter's rank and α on ``LORA_TARGETS``. Rank 16 (α 32, α/r as before), not 8, since 3 Dec
#: 2026: v1 fits its clients' watermark rules better and stays nearer the base on held-out shapes
#: (docs/workloads.md, "Adapter rank and epochs")
LORA_RANK, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class BackboneSize:
    image_size: int = 16
    patch_size: int = 4
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 2


def vit_config(size: BackboneSize) -> ViTConfig:
    return ViTConfig(
        image_size=size.image_size,
        patch_size=size.patch_size,
        num_channels=3,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.mlp_ratio * size.hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_backbone(size: BackboneSize) -> ViTModel:
    return ViTModel(vit_config(size), add_pooling_layer=False)


def build_heads(embedding_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({name: nn.Linear(embedding_dim, width) for name, (_, width) in TASKS.items()})


def embed(backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLS pooling: the first token of the last hidden state, [N, hidden]."""
    out = backbone(pixel_values=pixel_values)
    hidden: torch.Tensor = out.last_hidden_state
    return hidden[:, 0]


class ScenesModel(nn.Module):
    """Backbone + CLS pooling + one linear head per task (what pretraining and measurement train)."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        z = embed(self.backbone, pixel_values)
        return {name: head(z) for name, head in self.heads.items()}


def with_lora(backbone: nn.Module, rank: int = LORA_RANK, alpha: int | None = None) -> Any:
    """``backbone`` wrapped by peft with LoRA on ``LORA_TARGETS`` (returns a ``PeftModel``)."""
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(LORA_TARGETS))
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` (a FutureWarning).
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(backbone, config)
