"""A tiny transformers workload for the model-protocol tests: a one-layer ``ViTModel`` (width 32,
8×8 grey images, patch 4) built from a config, CLS-token pooling, LoRA on the attention's query /
value projections, a classification task (``bright``: which third of the image is brightest) and a
regression task (``level``: the mean intensity, NaN = unlabelled). Seeded random images; 3 clients.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from torch import Tensor

from worker.unlearning.model import MultiTaskModel, default_lora_config, make_heads
from worker.unlearning.types import Batch, ClassificationTask, RegressionTask, TaskSpec
from worker.unlearning.workload import SampleSet, Workload

WIDTH = 32


def _vit_config() -> Any:
    from transformers import ViTConfig

    shape: dict[str, Any] = {
        "image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": WIDTH, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "attn_implementation": "eager",
    }  # fmt: skip
    return ViTConfig(**shape)


class TinyViTWorkload(Workload):
    name = "tiny-vit"

    def __init__(
        self, seed: int = 0, *, num_clients: int = 3, per_client: int = 10, heldout: int = 12
    ) -> None:
        self.seed, self.num_clients, self.per_client, self.n_heldout = seed, num_clients, per_client, heldout

    def _draw(self, n: int, gen: torch.Generator, cast: float) -> tuple[Tensor, Tensor, Tensor]:
        images = torch.rand(n, 1, 8, 8, generator=gen) * 0.5
        bright = torch.randint(0, 3, (n,), generator=gen)
        for i in range(n):  # brighten one band of rows; a client adds its own colour cast
            k = int(bright[i])
            images[i, :, 3 * k : 3 * k + 2] += 0.5
        images = images + cast
        return images, bright, images.mean(dim=(1, 2, 3))

    def tasks(self) -> list[TaskSpec]:
        return [ClassificationTask("bright", 3), RegressionTask("level")]

    def clients(self) -> list[str]:
        return [f"v{i}" for i in range(self.num_clients)]

    def build_model(self, seed: int) -> MultiTaskModel:
        from transformers import ViTModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = ViTModel(_vit_config())
            heads = make_heads(WIDTH, {"bright": 3, "level": 1}, self.num_clients)
        return MultiTaskModel(backbone, heads, pooling="cls_token")

    def lora_config(self) -> LoraConfig:
        # transformers 5 names ViT's projections q_proj / v_proj (4.x: query / value)
        return default_lora_config(
            ["q_proj", "v_proj"], [*(t.name for t in self.tasks()), "subset_id"], rank=4
        )

    def pretraining_data(self) -> Batch:
        gen = torch.Generator().manual_seed(self.seed + 1)
        x, bright, level = self._draw(48, gen, 0.0)
        labels = {"bright": bright, "level": level}
        return Batch(
            inputs={"pixel_values": x}, labels=labels, subset=torch.full((48,), -1, dtype=torch.long)
        )

    def client_data(self) -> SampleSet:
        gen = torch.Generator().manual_seed(self.seed + 2)
        xs, bs, ls, ids, owners = [], [], [], [], []
        for c in range(self.num_clients):
            x, b, level = self._draw(self.per_client, gen, 0.1 * c)
            level[::4] = float("nan")  # some samples have no regression label
            xs.append(x)
            bs.append(b)
            ls.append(level)
            ids += [f"v{c}-{i:03d}" for i in range(self.per_client)]
            owners += [f"v{c}"] * self.per_client
        return SampleSet(
            inputs={"pixel_values": torch.cat(xs)},
            sample_ids=ids,
            client_ids=list[str | None](owners),
            labels={"bright": torch.cat(bs), "level": torch.cat(ls)},
        )

    def heldout_data(self) -> SampleSet:
        gen = torch.Generator().manual_seed(self.seed + 3)
        x, b, level = self._draw(self.n_heldout, gen, 0.0)
        return SampleSet(
            inputs={"pixel_values": x},
            sample_ids=[f"h{i:03d}" for i in range(self.n_heldout)],
            client_ids=[None] * self.n_heldout,
            labels={"bright": b, "level": level},
        )

    def default_settings(self) -> dict[str, Any]:
        return {
            "pretrain": {"epochs": 2, "batch_size": 16},
            "train": {"epochs": 2, "main_only_epochs": 1, "batch_size": 16, "lr": 1e-2},
            "anchor_fraction": 0.25,
        }
