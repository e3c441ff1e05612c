"""A tiny synthetic workload (Gaussian blobs, two tasks): for tests and as a template of a workload.

Not registered as an entry point; ``docs/workloads.md`` walks through a workload built the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.unlearning.types import Batch, ClassificationTask, TaskSpec
from worker.unlearning.workload import SampleSet
from worker.unlearning.workloads.mlp import MLPWorkload, NetConfig


class ToyWorkload(MLPWorkload):
    name = "toy"

    def __init__(
        self, seed: int = 0, *, num_clients: int = 3, per_client: int = 12, heldout: int = 16, dim: int = 8
    ) -> None:
        self.seed = seed
        self.num_clients = num_clients
        self.per_client = per_client
        self.n_heldout = heldout
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)
        self._centres = torch.randn(4, dim, generator=gen) * 2.0
        self._client_shift = torch.randn(num_clients, dim, generator=gen) * 0.5

    def _draw(self, n: int, gen: torch.Generator, shift: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        a = torch.randint(0, 4, (n,), generator=gen)
        x = self._centres[a] + torch.randn(n, self.dim, generator=gen) * 0.7
        if shift is not None:
            x = x + shift
        b = (x[:, 0] > 0).long()
        return x, a, b

    def tasks(self) -> list[TaskSpec]:
        return [ClassificationTask("kind", 4), ClassificationTask("side", 2)]

    def clients(self) -> list[str]:
        return [f"u{i}" for i in range(self.num_clients)]

    def net_config(self) -> NetConfig:
        return NetConfig(
            input_dim=self.dim,
            hidden_dims=(16,),
            embed_dim=16,
            task_outputs={"kind": 4, "side": 2},
            num_subsets=self.num_clients,
        )

    def pretraining_data(self) -> Batch:
        gen = torch.Generator().manual_seed(self.seed + 1)
        x, a, b = self._draw(64, gen, None)
        return Batch(
            inputs={"x": x}, labels={"kind": a, "side": b}, subset=torch.full((64,), -1, dtype=torch.long)
        )

    def client_data(self) -> SampleSet:
        gen = torch.Generator().manual_seed(self.seed + 2)
        xs, As, Bs, ids, owners = [], [], [], [], []
        for c in range(self.num_clients):
            x, a, b = self._draw(self.per_client, gen, self._client_shift[c])
            xs.append(x)
            As.append(a)
            Bs.append(b)
            ids += [f"t{c:02d}{i:03d}" for i in range(self.per_client)]
            owners += [f"u{c}"] * self.per_client
        return SampleSet(
            inputs={"x": torch.cat(xs)},
            sample_ids=ids,
            client_ids=list[str | None](owners),
            labels={"kind": torch.cat(As), "side": torch.cat(Bs)},
        )

    def heldout_data(self) -> SampleSet:
        gen = torch.Generator().manual_seed(self.seed + 3)
        x, a, b = self._draw(self.n_heldout, gen, None)
        return SampleSet(
            inputs={"x": x},
            sample_ids=[f"h{i:03d}" for i in range(self.n_heldout)],
            client_ids=[None] * self.n_heldout,
            labels={"kind": a, "side": b},
        )

    def default_settings(self) -> dict[str, Any]:
        return {
            "lora": {"rank": 4, "alpha": 4},
            "pretrain": {"epochs": 5, "batch_size": 32},
            "train": {"epochs": 4, "main_only_epochs": 2, "batch_size": 16, "lr": 1e-2},
            "anchor_fraction": 0.25,
        }
