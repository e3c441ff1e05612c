"""The MLP model of the built-in ``digits-clients`` and ``toy`` workloads: a :class:`Trunk` of linear
layers ``fc0 … fcK`` with ReLU as the backbone of a :class:`~worker.unlearning.model.MultiTaskModel`
(pooling ``identity``, input ``{"x": [N, input_dim]}``), LoRA on every ``fc`` layer."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from peft import LoraConfig
from torch import Tensor, nn

from worker.unlearning.model import DEFAULT_RANK, MultiTaskModel, default_lora_config, make_heads
from worker.unlearning.types import SUBSET_HEAD
from worker.unlearning.workload import Workload


@dataclass(frozen=True)
class NetConfig:
    """Shape of an MLP model: the trunk's widths and linear heads on its embedding."""

    input_dim: int
    hidden_dims: tuple[int, ...]
    embed_dim: int
    task_outputs: dict[str, int]
    num_subsets: int
    extra: dict[str, Any] = field(default_factory=dict)


class Trunk(nn.Module):
    """``fc0 … fcK`` linear layers with ReLU; the last one gives the embedding. Called as
    ``trunk(x=…)`` (the model's inputs are ``{"x": …}``)."""

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...] | list[int], embed_dim: int) -> None:
        super().__init__()
        self._init = {"input_dim": input_dim, "hidden_dims": list(hidden_dims), "embed_dim": embed_dim}
        dims = [input_dim, *hidden_dims, embed_dim]
        self.num_layers = len(dims) - 1
        for i in range(self.num_layers):
            self.add_module(f"fc{i}", nn.Linear(dims[i], dims[i + 1]))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(self.num_layers):
            h = self.act(cast(nn.Linear, getattr(self, f"fc{i}"))(h))
        return h

    def linear_names(self) -> list[str]:
        return [f"fc{i}" for i in range(self.num_layers)]

    def init_kwargs(self) -> dict[str, Any]:
        """What :func:`worker.unlearning.model.save_base` stores to rebuild the trunk."""
        return dict(self._init)


def mlp_lora_config(trunk: Trunk, heads: Mapping[str, nn.Module], rank: int = DEFAULT_RANK) -> LoraConfig:
    return default_lora_config([f"backbone.{n}" for n in trunk.linear_names()], heads, rank=rank)


def mlp_model(config: NetConfig) -> MultiTaskModel:
    """An MLP :class:`MultiTaskModel` (trunk first, then the heads: the RNG order of the init)."""
    trunk = Trunk(config.input_dim, config.hidden_dims, config.embed_dim)
    heads = make_heads(config.embed_dim, config.task_outputs, config.num_subsets)
    return MultiTaskModel(trunk, heads, pooling="identity", lora_template=mlp_lora_config(trunk, heads))


class MLPWorkload(Workload):
    """A workload whose model is an MLP described by :meth:`net_config`."""

    @abstractmethod
    def net_config(self) -> NetConfig:
        """Architecture of the trunk and heads."""

    def build_model(self, seed: int) -> MultiTaskModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = mlp_model(self.net_config())
        model.base_name = self.name
        return model

    def lora_config(self) -> LoraConfig:
        cfg = self.net_config()
        targets = [f"backbone.fc{i}" for i in range(len(cfg.hidden_dims) + 1)]
        return default_lora_config(targets, [*cfg.task_outputs, SUBSET_HEAD])
