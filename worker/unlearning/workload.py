"""The workload interface: what a model owner provides to use Lethe with their own model and data.

A workload is a class (registered under the entry-point group ``lethe.workloads``) whose instances
give:

- the task specs (head width, per-sample loss, metric) — :meth:`Workload.tasks`;
- the clients (data subjects), in the order of the subset-ID head — :meth:`Workload.clients`;
- the model: an untrained :class:`~worker.unlearning.model.MultiTaskModel` (any frozen
  ``nn.Module`` backbone, a pooling, linear heads) — :meth:`Workload.build_model`; its peft
  ``LoraConfig`` (target modules, rank, alpha) — :meth:`Workload.lora_config`; the pretraining data
  that belongs to no client — :meth:`Workload.pretraining_data` (pretraining itself has a default,
  :meth:`Workload.pretrain`; a real model overrides it, e.g. to load published weights);
- a collate from stored samples to the model's inputs — :meth:`Workload.collate` (identity by
  default: the stored arrays are the inputs);
- how the base is stored — :meth:`Workload.save_base` / :meth:`Workload.load_base` (default: the
  backbone in its library's own format, see :mod:`worker.unlearning.model`);
- the client dataset with stable sample ids, client ids and per-task labels —
  :meth:`Workload.client_data`;
- a held-out split (no client) — :meth:`Workload.heldout_data`;
- default settings (training recipe, LoRA rank, method and audit settings) —
  :meth:`Workload.default_settings`;
- optionally, its own protocol for a ``lethe bench`` preset — :attr:`Workload.bench_protocols`
  (:class:`BenchProtocol`: e.g. a quick preset that fits a CPU for a large model).

See ``docs/workloads.md`` for a worked example.
"""

from __future__ import annotations

import copy
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from pydantic import dataclasses as pydantic_dataclasses
from torch import Tensor

from worker.unlearning import model as model_io
from worker.unlearning.config import SETTINGS, BatchSize, Epochs, LearningRate, NonNegative, parse_settings
from worker.unlearning.model import MultiTaskModel
from worker.unlearning.types import IGNORE, Batch, TaskSpec, main_task_loss

ENTRY_POINT_GROUP = "lethe.workloads"


@dataclass
class SampleSet:
    """Samples with stable ids: inputs (the model's input dict, one row per sample in every leaf),
    per-task labels (``IGNORE`` / NaN = unlabelled) and client ids.

    ``client_ids[i]`` is ``None`` for samples that belong to no client (held-out, pretraining).
    """

    inputs: dict[str, Tensor]
    sample_ids: list[str]
    client_ids: list[str | None]
    labels: dict[str, Tensor]

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        if not self.inputs:
            raise ValueError("a sample set needs at least one input tensor")
        for key, leaf in self.inputs.items():
            if int(leaf.shape[0]) != n:
                raise ValueError(f"input {key!r} must have one row per sample id")
        if len(self.client_ids) != n:
            raise ValueError("sample_ids and client_ids must have one entry per sample")
        if len(set(self.sample_ids)) != n:
            raise ValueError("sample ids must be unique")
        for name, y in self.labels.items():
            if int(y.shape[0]) != n:
                raise ValueError(f"labels of task {name!r} must have one entry per sample")

    def __len__(self) -> int:
        return len(self.sample_ids)

    def to_batch(self, client_index: Mapping[str, int]) -> Batch:
        """As a :class:`Batch`: ``subset`` is the client's index in the subset-ID head."""
        subset = torch.tensor(
            [client_index[c] if c is not None else IGNORE for c in self.client_ids], dtype=torch.long
        )
        return Batch(
            inputs=dict(self.inputs),
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


@dataclass(frozen=True)
class BenchProtocol:
    """What ``lethe bench --preset <name>`` runs on a workload in place of the preset's own choices;
    a field left ``None`` keeps the preset's. Declared on the workload *class*
    (:attr:`Workload.bench_protocols`), so the bench reads it before it builds the workload.

    ``settings``: ``"FU"`` and ``"PU:<task>"`` entries. ``workload_options``: constructor options for
    the benchmark only (e.g. a smaller client pool), merged under the user's ``--workload-option``s.
    ``tuned``: method → value of its tuning knob; ``{}`` runs every method with the workload's own
    settings (reported as untuned). ``note``: why the protocol differs from the preset (in the JSON)."""

    seeds: tuple[int, ...] | None = None
    stages: int | None = None
    settings: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    workload_options: Mapping[str, Any] = field(default_factory=dict)
    tuned: Mapping[str, float] | None = None
    note: str = ""


class Workload(ABC):
    """What a model owner implements. Everything must be deterministic given the constructor."""

    #: the name under which the workload is registered (``lethe.workloads`` entry point)
    name: str = "workload"
    #: preset name → this workload's protocol for it (``lethe bench --preset quick``); a preset
    #: not listed runs as the bench defines it
    bench_protocols: ClassVar[Mapping[str, BenchProtocol]] = {}

    @abstractmethod
    def tasks(self) -> list[TaskSpec]:
        """The main tasks (their names key the heads and the labels)."""

    @abstractmethod
    def clients(self) -> list[str]:
        """Client ids, in the order of the subset-ID head's outputs."""

    @abstractmethod
    def build_model(self, seed: int) -> MultiTaskModel:
        """An untrained model (seeded init): backbone, pooling, one head per task + the subset-ID
        head (:func:`worker.unlearning.model.make_heads`)."""

    @abstractmethod
    def lora_config(self) -> LoraConfig:
        """The adapter: peft ``LoraConfig`` with the backbone's target modules (names as peft
        matches them: ``q_proj``/``v_proj``, ``query``/``value``, ``backbone.fc0``, …), rank and
        alpha (``settings["lora"]`` ``rank`` / ``alpha`` override them), ``modules_to_save`` the
        heads (``heads.<name>``; filled in when empty)."""

    def collate(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's inputs from stored sample arrays (rows = samples); identity by default."""
        return inputs

    def save_base(self, model: MultiTaskModel, base_dir: Path) -> None:
        """Store the frozen base (default layout: :func:`worker.unlearning.model.save_base`)."""
        model_io.save_base(model, base_dir)

    def load_base(self, base_dir: Path) -> MultiTaskModel:
        return model_io.load_base(base_dir)

    @abstractmethod
    def pretraining_data(self) -> Batch:
        """Data that belongs to no client, used only to pretrain the frozen base (``subset`` unused)."""

    @abstractmethod
    def client_data(self) -> SampleSet:
        """Every client sample: stable ids, client ids and per-task labels."""

    @abstractmethod
    def heldout_data(self) -> SampleSet:
        """The held-out split (never trained on; the ``Val`` split and the MIA's non-members)."""

    def heldout_clients(self) -> dict[str, str]:
        """Held-out sample id → the client it was drawn from, for held-out rows of clients that are
        never trained on (unseen clients; ``ia.target_offset`` measures on them). Empty: none."""
        return {}

    def default_settings(self) -> dict[str, Any]:
        """Defaults of the per-model settings; the service's settings are merged over them."""
        return {}

    def settings(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return deep_merge(self.default_settings(), overrides or {})

    def client_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.clients())}

    def untrained_model(self, seed: int) -> MultiTaskModel:
        """:meth:`build_model` with the workload's LoRA template and name attached."""
        net = self.build_model(seed)
        net.lora_template = self.lora_config()
        net.base_name = net.base_name or self.name
        return net

    def pretrain(self, seed: int, settings: Mapping[str, Any] | None = None) -> MultiTaskModel:
        """The frozen base: backbone + task heads trained on :meth:`pretraining_data` (no client data).

        The default trains everything with AdamW on the main-task loss; override for a real model
        (e.g. load published weights). The subset-ID head keeps its seeded random init.
        """
        cfg = PretrainConfig.from_settings(self.settings(settings))
        net = self.untrained_model(seed)
        data = self.pretraining_data()
        tasks = self.tasks()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(
            [p for n, p in net.named_parameters() if not n.startswith("heads.subset")],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        net.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(data), generator=gen)
            for start in range(0, len(data), cfg.batch_size):
                batch = data.select(order[start : start + cfg.batch_size])
                loss = main_task_loss(net(batch.inputs), batch.labels, tasks)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class PretrainConfig:
    """``settings["pretrain"]``: the default :meth:`Workload.pretrain` of the frozen base (AdamW on
    the main-task loss over the pretraining data)."""

    epochs: Epochs = 20
    batch_size: BatchSize = 128
    lr: LearningRate = 2e-3
    weight_decay: NonNegative = 1e-4

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> PretrainConfig:
        return parse_settings(cls, settings.get("pretrain"), "pretraining")


def available_workloads() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


class WorkloadOptionsError(ValueError):
    """A workload's constructor refused the options it was given."""


def workload_factory(name: str) -> Any:
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise KeyError(f"unknown workload {name!r}; available: {', '.join(available_workloads()) or 'none'}")
    return matches[0].load()


def takes_seed(factory: Any) -> bool:
    """Whether ``factory`` (a workload class) accepts a ``seed`` keyword (or any keyword)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == "seed" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or p.kind is p.VAR_KEYWORD
        for p in params
    )


def load_workload(name: str, **kwargs: Any) -> Workload:
    """Instantiate the workload registered as ``name`` in the ``lethe.workloads`` entry points."""
    workload = workload_factory(name)(**kwargs)
    if not isinstance(workload, Workload):
        raise TypeError(f"entry point {name!r} did not produce a Workload")
    return workload


def build_workload(
    name: str, options: Mapping[str, Any] | None = None, *, seed: int | None = None, factory: Any = None
) -> Workload:
    """The workload ``name`` built with ``options`` as keyword arguments (a registered model's
    ``workload_options``, a bench's ``--workload-option``).

    ``seed``: the data seed of a benchmark; passed as ``seed=`` when the constructor takes one and
    ``options`` do not set it (an explicit ``seed`` option pins the data). A constructor that
    refuses the options raises :class:`WorkloadOptionsError` naming the workload and the options.
    ``factory``: the class ``name`` resolved to already (a bench's worker process, which does not
    see entry points registered at run time, is handed it).
    """
    kwargs = dict(options or {})
    factory = factory if factory is not None else workload_factory(name)
    if seed is not None and "seed" not in kwargs and takes_seed(factory):
        kwargs["seed"] = seed
    try:
        workload = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise WorkloadOptionsError(
            f"workload {name!r} refused the options {json.dumps(kwargs)}: {exc}"
        ) from exc
    if not isinstance(workload, Workload):
        raise TypeError(f"entry point {name!r} did not produce a Workload")
    return workload
