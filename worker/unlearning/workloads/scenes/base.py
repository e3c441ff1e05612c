"""The pretrained scenes base on disk: save, load, and per-task held-out quality.

Layout of a base directory:
- ``backbone/``: the ``ViTModel`` (``save_pretrained``: ``config.json`` + ``model.safetensors``);
- ``heads.safetensors``: one linear head per task (``<task>.weight`` / ``<task>.bias``);
- ``lethe-model.json``: tasks (kind, width), embedding dim, pooling, image size, generator seed;
- ``SHA256SUMS``: ``sha256sum`` format, paths relative to the directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTModel

from worker.unlearning.workloads.scenes.backbone import LORA_TARGETS, ScenesModel, build_heads
from worker.unlearning.workloads.scenes.generator import TASKS, Scenes

META = "lethe-model.json"
HEADS = "heads.safetensors"
SUMS = "SHA256SUMS"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SUMS)


def save_base(model: ScenesModel, directory: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Write the base and its ``SHA256SUMS``; returns {relative path: sha256}."""
    directory.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    if not isinstance(backbone, ViTModel):
        raise TypeError(f"the base backbone must be a plain ViTModel, not {type(backbone).__name__}")
    backbone.save_pretrained(directory / "backbone")
    heads = {
        f"{t}.{k}": v.detach().contiguous() for t, h in model.heads.items() for k, v in h.state_dict().items()
    }
    save_file(heads, str(directory / HEADS))
    embedding_dim = int(backbone.config.hidden_size)
    doc = {
        "architecture": "ViTModel",
        "pooling": "cls",
        "embedding_dim": embedding_dim,
        "image_size": backbone.config.image_size,
        "lora_targets": list(LORA_TARGETS),
        "tasks": {name: {"kind": kind, "width": width} for name, (kind, width) in TASKS.items()},
        **meta,
    }
    (directory / META).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    sums = {p.relative_to(directory).as_posix(): sha256(p) for p in base_files(directory)}
    (directory / SUMS).write_text("".join(f"{h}  {rel}\n" for rel, h in sums.items()))
    return sums


def read_sums(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (directory / SUMS).read_text().splitlines():
        digest, rel = line.split("  ", 1)
        out[rel] = digest
    return out


def load_base(directory: Path) -> tuple[ScenesModel, dict[str, Any]]:
    meta: dict[str, Any] = json.loads((directory / META).read_text())
    backbone = ViTModel.from_pretrained(directory / "backbone", add_pooling_layer=False)
    heads = build_heads(int(meta["embedding_dim"]))
    state = load_file(str(directory / HEADS))
    for name, head in heads.items():
        head.load_state_dict({"weight": state[f"{name}.weight"], "bias": state[f"{name}.bias"]})
    model = ScenesModel(backbone, heads)
    model.eval()
    return model, meta


def losses(outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy for classification, mean squared error for regression (targets about unit range)."""
    out: dict[str, torch.Tensor] = {}
    for name, (kind, _) in TASKS.items():
        if kind == "classification":
            out[name] = nn.functional.cross_entropy(outputs[name], labels[name])
        else:
            out[name] = nn.functional.mse_loss(outputs[name][:, 0], labels[name])
    return out


@torch.no_grad()
def predict(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    parts = [model(pixel_values[i : i + batch_size]) for i in range(0, len(pixel_values), batch_size)]
    model.train(was_training)
    return {name: torch.cat([p[name] for p in parts]) for name in TASKS}


def quality(model: nn.Module, scenes: Scenes, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy for classification, R² for regression (1 − MSE / variance of the targets)."""
    outputs = predict(model, scenes.pixel_values)
    keep = torch.ones(len(scenes), dtype=torch.bool) if mask is None else mask
    out: dict[str, float] = {}
    for name, (kind, _) in TASKS.items():
        pred, target = outputs[name][keep], scenes.labels[name][keep]
        if kind == "classification":
            out[name] = float((pred.argmax(1) == target).float().mean())
        else:
            mse = float(((pred[:, 0] - target) ** 2).mean())
            out[name] = 1.0 - mse / float(target.var(unbiased=False))
    return out
