"""The network convention of the ML core: a frozen base trunk, one head per task, a subset-ID head.

``MultiHeadNet.forward(x)`` returns ``dict[str, Tensor]`` keyed by task name plus
``types.SUBSET_HEAD``; the heads live in ``self.heads`` (an ``nn.ModuleDict`` of ``nn.Linear``).
The trunk's linear layers are the LoRA targets (rank 16 by default, peft ``LoraConfig``); the heads
are trained and saved with the adapter through ``modules_to_save``, so that after wrapping
``model.heads[name]`` is a peft ``ModulesToSaveWrapper``.

The base is stored as ``config.json`` + ``model.safetensors`` (trunk and initial heads) and rebuilt
from them (:func:`save_base` / :func:`load_base`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.unlearning.types import SUBSET_HEAD

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_RANK = 16


@dataclass(frozen=True)
class NetConfig:
    """Shape of a :class:`MultiHeadNet`: an MLP trunk and linear heads on its embedding."""

    input_dim: int
    hidden_dims: tuple[int, ...]
    embed_dim: int
    task_outputs: dict[str, int]
    num_subsets: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "input_dim": self.input_dim,
            "hidden_dims": list(self.hidden_dims),
            "embed_dim": self.embed_dim,
            "task_outputs": dict(self.task_outputs),
            "num_subsets": self.num_subsets,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetConfig:
        return cls(
            input_dim=int(data["input_dim"]),
            hidden_dims=tuple(int(h) for h in data["hidden_dims"]),
            embed_dim=int(data["embed_dim"]),
            task_outputs={str(k): int(v) for k, v in dict(data["task_outputs"]).items()},
            num_subsets=int(data["num_subsets"]),
            extra=dict(data.get("extra", {})),
        )


class Trunk(nn.Module):
    """The base network: ``fc0 … fcK`` linear layers with ReLU; the last one gives the embedding."""

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
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


class MultiHeadNet(nn.Module):
    """Trunk + one linear head per task + the subset-ID head (the two-head design)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.base = Trunk(config.input_dim, config.hidden_dims, config.embed_dim)
        heads: dict[str, nn.Module] = {
            name: nn.Linear(config.embed_dim, n) for name, n in config.task_outputs.items()
        }
        heads[SUBSET_HEAD] = nn.Linear(config.embed_dim, config.num_subsets)
        self.heads = nn.ModuleDict(heads)

    @property
    def task_names(self) -> list[str]:
        return list(self.config.task_outputs)

    def embed(self, x: Tensor) -> Tensor:
        """The trunk's embedding ``z`` (what the disentanglement loss acts on)."""
        out: Tensor = self.base(x)
        return out

    def forward_with_embedding(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        z = self.embed(x)
        return {name: head(z) for name, head in self.heads.items()}, z

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_with_embedding(x)[0]

    def lora_target_modules(self) -> list[str]:
        """Names (relative to this module) of the base's linear layers: the LoRA targets."""
        return [f"base.{name}" for name in self.base.linear_names()]

    def head_module_names(self) -> list[str]:
        return [f"heads.{name}" for name in self.heads]


def unwrap(model: nn.Module) -> MultiHeadNet:
    """The :class:`MultiHeadNet` inside a peft wrapper (or the module itself)."""
    inner: nn.Module = model
    for _ in range(4):
        if isinstance(inner, MultiHeadNet):
            return inner
        if isinstance(inner, PeftModel):
            inner = inner.get_base_model()
            continue
        nested = getattr(inner, "model", None)
        if isinstance(nested, nn.Module):
            inner = nested
            continue
        break
    raise TypeError(f"not a MultiHeadNet (or a peft wrapper of one): {type(model).__name__}")


def forward_with_embedding(model: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs and trunk embedding of ``model`` (plain or peft-wrapped); adapters stay active."""
    return unwrap(model).forward_with_embedding(x)


def lora_config(net: MultiHeadNet, rank: int = DEFAULT_RANK, alpha: int | None = None) -> LoraConfig:
    """LoRA on the trunk's linear layers; heads trained and saved through ``modules_to_save``."""
    return LoraConfig(
        r=rank,
        lora_alpha=int(alpha if alpha is not None else rank),
        lora_dropout=0.0,
        target_modules=net.lora_target_modules(),
        modules_to_save=net.head_module_names(),
        bias="none",
    )


def wrap_lora(
    net: MultiHeadNet, *, rank: int = DEFAULT_RANK, alpha: int | None = None, seed: int = 0
) -> PeftModel:
    """A fresh adapter (seeded LoRA A init, B = 0) on a copy of ``net`` (``net`` is left untouched).

    Only the adapter and the heads are trainable; the trunk stays frozen.
    """
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(net, lora_config(net, rank, alpha))
    return cast(PeftModel, model)


def save_base(net: MultiHeadNet, base_dir: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (atomic per file)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    cfg_tmp = base_dir / (CONFIG_FILE + ".tmp")
    cfg_tmp.write_text(json.dumps({"architecture": "MultiHeadNet", **net.config.to_json()}, indent=2))
    cfg_tmp.replace(base_dir / CONFIG_FILE)
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    if any("lora_" in k or "modules_to_save" in k for k in state):
        raise ValueError("save_base needs the plain base network, not a peft-wrapped one")
    w_tmp = base_dir / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(w_tmp))
    w_tmp.replace(base_dir / WEIGHTS_FILE)


def load_base(base_dir: Path) -> MultiHeadNet:
    """Rebuild the frozen base network from ``config.json`` + ``model.safetensors``."""
    data = json.loads((base_dir / CONFIG_FILE).read_text())
    if data.get("architecture", "MultiHeadNet") != "MultiHeadNet":
        raise ValueError(f"unknown architecture {data.get('architecture')!r} in {base_dir}")
    net = MultiHeadNet(NetConfig.from_json(data))
    state = load_file(str(base_dir / WEIGHTS_FILE))
    net.load_state_dict(state, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
