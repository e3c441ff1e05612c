"""What an unlearning method receives (:class:`MethodContext`) and returns (:class:`MethodResult`).

A method is a function ``(MethodContext) -> MethodResult`` registered by name with its settings
class and what it needs (:class:`MethodSpec`, :func:`worker.unlearning.methods.register`). It may
update ``ctx.model`` in place (adapter and heads only: the base stays frozen) or return another
model (``retrain``). Settings are read from ``ctx.settings`` under the method's own key (``"ssd"``,
``"ia"``, ``"default"``, …); unknown keys are errors. ``info`` is JSON (the evidence records it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from worker.unlearning.progress import StageCallback
from worker.unlearning.reference_adapters import LoadedReferences
from worker.unlearning.types import Batch, Partitions, TaskSpec

MiaTarget = float | Mapping[str, float]


@dataclass
class MethodContext:
    """Everything one request's method needs (built by the engine or the benchmark).

    - ``model``: the peft-wrapped model to unlearn (trainable adapter + heads);
    - ``tasks``: the workload's main tasks;
    - ``partitions``: D_f, D_r^task, D_r^inst, D_r^clean of this request (anchor subsets);
    - ``full``: the data D of the full-data importance F_D: the current training data *including*
      the forget set (SSD reference semantics), e.g. ``concat_batches([retain, partitions.forget])``;
    - ``heldout``: the held-out split (early stopping: forget-vs-held-out MIA);
    - ``settings``: the per-model settings (each method reads its own key);
    - ``seed``, ``device``;
    - ``prune_outputs``: subset-ID outputs this request suppresses (the forgotten client's index for a
      client request; empty otherwise); ``pruned_outputs``: those suppressed by earlier requests;
    - ``mia_target``: an explicit early-stopping target for the unl-vs-val loss-MIA AUC (a float,
      or per forgotten task); ``None`` = the configured default (0.5). The engine and the benchmark
      never set it: no retrain of the request may steer its method (no oracle);
    - ``cache_dir`` / ``cache_key``: where the full-data importance is cached and the digest of the
      adapter version ``model`` was loaded from (``None``: do not cache — the model already changed);
    - ``retain`` / ``base``: the full retain set and the frozen base network (``retrain`` needs them);
    - ``on_progress``: an optional callback taking a short message;
    - ``on_stage``: an optional :data:`~worker.unlearning.progress.StageCallback` (stage, step, of);
    - ``references`` / ``client_index``: the model's reference adapters (trained off the request
      path on halves of the clients; ``None``: none) and the client → subset index map, from which
      ``ia.target: "references"`` reads a per-client early-stopping target (never a retrain);
    - ``heldout_clients``: held-out sample id → the unseen client it was drawn from (clients the
      model never trained on; ``ia.target_offset`` measures the references' offset on them).
    """

    model: nn.Module
    tasks: Sequence[TaskSpec]
    partitions: Partitions
    full: Batch
    heldout: Batch
    settings: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    prune_outputs: Sequence[int] = ()
    pruned_outputs: Sequence[int] = ()
    mia_target: MiaTarget | None = None
    cache_dir: Path | None = None
    cache_key: str | None = None
    retain: Batch | None = None
    base: nn.Module | None = None
    on_progress: Callable[[str], None] | None = None
    on_stage: StageCallback | None = None
    references: LoadedReferences | None = None
    client_index: Mapping[str, int] | None = None
    heldout_clients: Mapping[str, str] = field(default_factory=dict)

    def method_settings(self, key: str) -> dict[str, Any]:
        """``settings[key]`` as a dict (empty when absent)."""
        value = self.settings.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError(f"settings[{key!r}] must be a mapping, not {type(value).__name__}")
        return dict(value)

    def common_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every update rule of the core takes from the context:
        ``tasks``, ``seed`` and the ``progress`` callback."""
        return {"tasks": self.tasks, "seed": self.seed, "progress": self.on_progress}

    def progress(self, message: str) -> None:
        if self.on_progress is not None:
            self.on_progress(message)

    def stage(self, name: str, step: int = 0, of: int = 0) -> None:
        """Report the stage (``worker.unlearning.progress.STAGES``) and step k of n within it."""
        if self.on_stage is not None:
            self.on_stage(name, step, of)


@dataclass
class MethodResult:
    """The unlearned model, JSON info about the run, and the subset-ID outputs the method pruned."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    pruned_outputs: list[int] = field(default_factory=list)


Method = Callable[[MethodContext], MethodResult]


#: ``settings`` (the per-model settings) → the SSD settings with which a method reads the
#: full-data importance ``I_D``, or ``None`` when these settings do not read it.
ImportanceSettings = Callable[[Mapping[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class Needs:
    """What a method needs beyond the request's partitions, declared in its spec so that the engine
    and the benchmark never name a method.

    - ``full_importance``: the SSD settings with which it reads the full-data importance (the engine
      computes ``I_D`` ahead with them: for v1 when a model is prepared, and for the next request
      after each one);
    - ``retain`` / ``base``: the full retain set / the frozen base network in its context
      (``retrain`` trains a fresh adapter on them); refused before it runs when missing."""

    full_importance: ImportanceSettings | None = None
    retain: bool = False
    base: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its name, its run function, the pydantic class of its own settings
    block ``settings[name]`` (and ``method_config``; ``None``: it has none) and its :class:`Needs`."""

    name: str
    run: Method
    config: type | None = None
    needs: Needs = field(default_factory=Needs)

    def check(self, ctx: MethodContext) -> None:
        """``ValueError`` naming what ``ctx`` lacks of what the method needs."""
        missing = []
        if self.needs.retain and ctx.retain is None:
            missing.append("the retain set")
        if self.needs.base and ctx.base is None:
            missing.append("the frozen base network")
        if missing:
            raise ValueError(f"{self.name} needs {' and '.join(missing)} in its context")
