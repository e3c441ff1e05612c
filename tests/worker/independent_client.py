"""A serving host without Lethe (issue 7 part 3): pull the base and the latest adapter over the API and
serve them with transformers + peft + a few lines of torch.

It imports only transformers / torch / peft / httpx / safetensors and the standard library (a test
parses its imports): what a serving image has. The module names mirror Lethe's ``MultiTaskModel``
(``backbone``, ``heads.<task>``), so the adapter's keys (LoRA on the backbone, the heads through
``modules_to_save``) load as they are. docs/serving.md shows the same steps.

    client = open_client("https://lethe.internal", "lethe_...")   # a key with the serve scope
    model = pull_and_load(client, "scenes", Path("/srv/lethe/scenes"))
    outputs = model({"pixel_values": images})                      # {task: tensor}, subset_id too
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel


def open_client(base_url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)


def _download_listed(client: httpx.Client, listing: dict[str, Any], dest: Path) -> None:
    """Every file of a listing (``files``: ``name``, ``sha256``, ``url``) into ``dest``, hash-checked."""
    for entry in listing["files"]:
        rel = PurePosixPath(entry["name"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"unsafe file name {entry['name']!r}")
        resp = client.get(entry["url"])
        resp.raise_for_status()
        if hashlib.sha256(resp.content).hexdigest() != entry["sha256"]:
            raise ValueError(f"{entry['name']}: sha256 mismatch")
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(resp.content)


def pull(client: httpx.Client, model: str, dest: Path) -> tuple[Path, Path, int]:
    """Download the frozen base and the latest adapter: (base dir, adapter dir, version)."""
    base = client.get(f"/v1/models/{quote(model)}/base")
    base.raise_for_status()
    _download_listed(client, base.json(), dest / "base")
    latest = client.get(f"/v1/models/{quote(model)}/adapters/latest")
    latest.raise_for_status()
    version = int(latest.json()["version"])
    adapter_dir = dest / f"v{version}"
    _download_listed(client, latest.json(), adapter_dir)
    return dest / "base", adapter_dir, version


class ServedModel(nn.Module):
    """The backbone, a pooling of its ``last_hidden_state`` and one linear head per task (the
    attribute names are Lethe's, so that the adapter's keys match)."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict, pooling: str) -> None:
        super().__init__()
        if pooling not in ("cls_token", "mean_tokens"):
            raise ValueError(f"this client serves transformers encoders, not pooling {pooling!r}")
        self.backbone = backbone
        self.heads = heads
        self.pooling = pooling

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = self.backbone(**inputs).last_hidden_state
        z = hidden[:, 0] if self.pooling == "cls_token" else hidden.mean(dim=1)
        return {name: head(z) for name, head in self.heads.items()}


def load_base(base_dir: Path) -> ServedModel:
    """``backbone/`` (save_pretrained layout), ``heads.safetensors``, ``lethe-model.json``."""
    meta = json.loads((base_dir / "lethe-model.json").read_text())
    attn = meta.get("backbone", {}).get("attn_implementation")
    kwargs = {"attn_implementation": attn} if attn else {}
    backbone = AutoModel.from_pretrained(str(base_dir / "backbone"), **kwargs)
    state = load_file(str(base_dir / "heads.safetensors"))
    heads = nn.ModuleDict()
    for name in [*meta["tasks"], "subset_id"]:  # the heads in Lethe's order: tasks, then subset-ID
        weight = state[f"{name}.weight"]
        head = nn.Linear(int(weight.shape[1]), int(weight.shape[0]))
        head.load_state_dict({"weight": weight, "bias": state[f"{name}.bias"]})
        heads[name] = head
    model = ServedModel(backbone, heads, str(meta["pooling"]))
    model.eval()
    return model


def load(base_dir: Path, adapter_dir: Path) -> PeftModel:
    model = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir))
    model.eval()
    return model


def pull_and_load(client: httpx.Client, model: str, dest: Path) -> PeftModel:
    base_dir, adapter_dir, _ = pull(client, model, dest)
    return load(base_dir, adapter_dir)


@torch.no_grad()
def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = model(inputs)
    return result
