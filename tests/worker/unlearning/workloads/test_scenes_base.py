"""The committed scenes base: intact (SHA256SUMS), loadable with transformers alone, good on held-out data."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import ViTModel

from worker.unlearning.workloads.scenes.backbone import LORA_TARGETS, embed, with_lora
from worker.unlearning.workloads.scenes.base import (
    HEADS,
    META,
    base_files,
    load_base,
    quality,
    read_sums,
    sha256,
)
from worker.unlearning.workloads.scenes.generator import TASKS, ScenesConfig, ScenesGenerator
from worker.unlearning.workloads.scenes.measure import BASE_DIR

# Held-out quality of the committed base on 500 samples, measured over 10 generator seeds by
# ``python -m worker.unlearning.workloads.scenes.measure`` (docs/workloads.md): per task (mean, sample
# standard deviation). The floor is mean − 4 stdev: a draw below it is a broken base, not bad luck.
SPREAD = {"shape": (0.8964, 0.0139), "scale": (0.8701, 0.0131), "position_x": (0.9684, 0.0022)}
FLOORS = {task: round(mean - 4 * stdev, 3) for task, (mean, stdev) in SPREAD.items()}


def test_committed_base_matches_its_sha256sums_and_size_budget() -> None:
    sums = read_sums(BASE_DIR)
    files = {p.relative_to(BASE_DIR).as_posix(): p for p in base_files(BASE_DIR)}
    assert set(sums) == set(files) - {"README.md"}
    for rel, digest in sums.items():
        assert sha256(files[rel]) == digest, rel
    assert sum(p.stat().st_size for p in files.values()) <= 20 * 2**20


def test_committed_base_loads_with_transformers_and_safetensors_alone() -> None:
    meta = json.loads((BASE_DIR / META).read_text())
    assert meta["pooling"] == "cls"
    assert meta["tasks"] == {name: {"kind": kind, "width": width} for name, (kind, width) in TASKS.items()}
    backbone = ViTModel.from_pretrained(BASE_DIR / "backbone", add_pooling_layer=False)
    heads = load_file(str(BASE_DIR / HEADS))
    size = meta["image_size"]
    x = ScenesGenerator(ScenesConfig(seed=meta["generator"]["seed"])).heldout(8).pixel_values
    assert x.shape[-1] == size
    with torch.no_grad():
        z = backbone(pixel_values=x).last_hidden_state[:, 0]
        logits = z @ heads["shape.weight"].T + heads["shape.bias"]
    assert z.shape == (8, meta["embedding_dim"])
    model, _ = load_base(BASE_DIR)
    with torch.no_grad():
        assert torch.equal(model(x)["shape"], logits)


def test_lora_targets_the_attention_projections_of_every_layer() -> None:
    model, meta = load_base(BASE_DIR)
    x = ScenesGenerator().heldout(4).pixel_values
    with torch.no_grad():
        before = embed(model.backbone, x)
    peft_model = with_lora(model.backbone, rank=8)
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    layers = int(meta["backbone_size"]["layers"])
    assert len(wrapped) == len(LORA_TARGETS) * layers
    assert set(LORA_TARGETS) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(n.endswith(LORA_TARGETS) for n in wrapped)
    with torch.no_grad():  # B starts at zero: the adapter does not change the base's outputs yet
        assert torch.allclose(embed(peft_model, x), before)


def test_committed_base_is_good_on_held_out_samples() -> None:
    """One seed's 500 held-out samples (not seed 0's pretraining stream) clear the derived floor."""
    model, _ = load_base(BASE_DIR)
    got = quality(model, ScenesGenerator(ScenesConfig(seed=11)).heldout(500))
    for task, floor in FLOORS.items():
        assert got[task] >= floor, (task, got)
