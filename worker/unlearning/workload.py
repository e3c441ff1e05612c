"""The workload interface: what a model owner provides to use Lethe with their own model and data.

A workload is a class (registered under the entry-point group ``lethe.workloads``) whose instances
give:

- the task specs (head width, per-sample loss, metric) — :meth:`Workload.tasks`;
- the clients (data subjects), in the order of the subset-ID head — :meth:`Workload.clients`;
- the network config of a frozen base (:class:`~worker.unlearning.model.NetConfig`) and the
  pretraining data that belongs to no client — :meth:`Workload.net_config`,
  :meth:`Workload.pretraining_data` (pretraining itself has a default, :meth:`Workload.pretrain`);
- the client dataset with stable sample ids, client ids and per-task labels —
  :meth:`Workload.client_data`;
- a held-out split (no client) — :meth:`Workload.heldout_data`;
- default settings (training recipe, LoRA rank, method and audit settings) —
  :meth:`Workload.default_settings`.

See ``docs/workloads.md`` for a worked example.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import Tensor

from worker.unlearning.model import MultiHeadNet, NetConfig
from worker.unlearning.types import IGNORE, Batch, TaskSpec, main_task_loss

ENTRY_POINT_GROUP = "lethe.workloads"


@dataclass
class SampleSet:
    """Samples with stable ids: inputs, per-task labels (``IGNORE`` = unlabelled) and client ids.

    ``client_ids[i]`` is ``None`` for samples that belong to no client (held-out, pretraining).
    """

    x: Tensor
    sample_ids: list[str]
    client_ids: list[str | None]
    labels: dict[str, Tensor]

    def __post_init__(self) -> None:
        n = int(self.x.shape[0])
        if len(self.sample_ids) != n or len(self.client_ids) != n:
            raise ValueError("sample_ids and client_ids must have one entry per row of x")
        if len(set(self.sample_ids)) != n:
            raise ValueError("sample ids must be unique")
        for name, y in self.labels.items():
            if int(y.shape[0]) != n:
                raise ValueError(f"labels of task {name!r} must have one entry per row of x")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to_batch(self, client_index: Mapping[str, int]) -> Batch:
        """As a :class:`Batch`: ``subset`` is the client's index in the subset-ID head."""
        subset = torch.tensor(
            [client_index[c] if c is not None else IGNORE for c in self.client_ids], dtype=torch.long
        )
        return Batch(
            x=self.x,
            labels={k: v.clone() for k, v in self.labels.items()},
            subset=subset,
            sample_ids=list(self.sample_ids),
        )


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``override`` (new dicts; inputs untouched)."""
    out: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Workload(ABC):
    """What a model owner implements. Everything must be deterministic given the constructor."""

    #: the name under which the workload is registered (``lethe.workloads`` entry point)
    name: str = "workload"

    @abstractmethod
    def tasks(self) -> list[TaskSpec]:
        """The main tasks (their names key the heads and the labels)."""

    @abstractmethod
    def clients(self) -> list[str]:
        """Client ids, in the order of the subset-ID head's outputs."""

    @abstractmethod
    def net_config(self) -> NetConfig:
        """Architecture of the base network and heads."""

    @abstractmethod
    def pretraining_data(self) -> Batch:
        """Data that belongs to no client, used only to pretrain the frozen base (``subset`` unused)."""

    @abstractmethod
    def client_data(self) -> SampleSet:
        """Every client sample: stable ids, client ids and per-task labels."""

    @abstractmethod
    def heldout_data(self) -> SampleSet:
        """The held-out split (never trained on; the ``Val`` split and the MIA's non-members)."""

    def default_settings(self) -> dict[str, Any]:
        """Defaults of the per-model settings; the service's settings are merged over them."""
        return {}

    def settings(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return deep_merge(self.default_settings(), overrides or {})

    def client_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.clients())}

    def build_network(self, seed: int) -> MultiHeadNet:
        """An untrained network (seeded init)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MultiHeadNet(self.net_config())

    def pretrain(self, seed: int, settings: Mapping[str, Any] | None = None) -> MultiHeadNet:
        """The frozen base: trunk + task heads trained on :meth:`pretraining_data` (no client data).

        The default trains everything with AdamW on the main-task loss; override for a real model
        (e.g. load published weights). The subset-ID head keeps its seeded random init.
        """
        cfg = dict(self.settings(settings).get("pretrain", {}))
        epochs = int(cfg.get("epochs", 20))
        batch_size = int(cfg.get("batch_size", 128))
        lr = float(cfg.get("lr", 2e-3))
        net = self.build_network(seed)
        data = self.pretraining_data()
        tasks = self.tasks()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(
            [p for n, p in net.named_parameters() if not n.startswith("heads.subset")],
            lr=lr,
            weight_decay=float(cfg.get("weight_decay", 1e-4)),
        )
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=gen)
            for start in range(0, len(data), batch_size):
                batch = data.select(order[start : start + batch_size])
                loss = main_task_loss(net(batch.x), batch.labels, tasks)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net


def available_workloads() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_workload(name: str, **kwargs: Any) -> Workload:
    """Instantiate the workload registered as ``name`` in the ``lethe.workloads`` entry points."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise KeyError(f"unknown workload {name!r}; available: {', '.join(available_workloads()) or 'none'}")
    factory = matches[0].load()
    workload = factory(**kwargs)
    if not isinstance(workload, Workload):
        raise TypeError(f"entry point {name!r} did not produce a Workload")
    return workload
