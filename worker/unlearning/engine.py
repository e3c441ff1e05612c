"""The engine the worker pipeline calls: ``prepare`` (v1) and ``run_round`` (one unlearning round).

Contracts: docs/architecture.md ("The ML core"). ``run_round`` processes the requests in order, each
request one stage of the sequential setting: resolve X_f/T_f against the store, build the four
partitions, run the method (by name, from the methods registry), suppress a forgotten client's
subset-ID output for good, update the RoundState, audit (with a retrain reference when
``settings["audit"]["retrain_reference"]``). It never touches the database or the store's files
(the pipeline purges after publishing).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from worker.unlearning.adapter_io import ADAPTER_WEIGHTS, load_adapter, save_adapter
from worker.unlearning.datastore import DataStore, ResolvedSpec
from worker.unlearning.model import MultiHeadNet, load_base, save_base, unwrap
from worker.unlearning.partitions import (
    DEFAULT_ANCHOR_FRACTION,
    ForgetSelection,
    anchor_seed,
    build_partitions,
    retain_set,
)
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig, retrain, train_v1
from worker.unlearning.types import SUBSET_HEAD, Batch, ForgetSpec, Partitions, TaskSpec
from worker.unlearning.workload import SampleSet, Workload

__all__ = [
    "ForgetSpec",
    "PreparedModel",
    "RoundOutcome",
    "RoundState",
    "prepare",
    "run_round",
]

ProgressCallback = Callable[[int, int, str], None]
PRUNED_LOGIT = -1.0e4  # a pruned subset-ID output: weight row 0, bias very negative


@dataclass
class PreparedModel:
    subjects: dict[str, list[str]]
    tasks: list[str]
    state: RoundState
    evidence: dict[str, Any]


@dataclass
class RoundOutcome:
    evidence: dict[str, dict[str, Any]]
    state: RoundState
    timings: dict[str, float] = field(default_factory=dict)


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 of the adapter weights (the key of caches tied to an adapter version)."""
    h = hashlib.sha256()
    with open(adapter_dir / ADAPTER_WEIGHTS, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def _task_metrics(model: torch.nn.Module, batch: Batch, tasks: Sequence[TaskSpec]) -> dict[str, float]:
    if len(batch) == 0:
        return {t.name: float("nan") for t in tasks}
    with torch.no_grad():
        out = model(batch.x)
    return {t.name: t.metric(out[t.name], batch.labels[t.name]) for t in tasks}


def _subset_accuracy(model: torch.nn.Module, batch: Batch) -> float:
    if len(batch) == 0:
        return float("nan")
    with torch.no_grad():
        pred = model(batch.x)[SUBSET_HEAD].argmax(-1)
    valid = batch.subset >= 0
    return float((pred[valid] == batch.subset[valid]).float().mean()) if bool(valid.any()) else float("nan")


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------


def ensure_base(workload: Workload, base_dir: Path, settings: Mapping[str, Any], seed: int) -> MultiHeadNet:
    """Load the frozen base from ``base_dir``, pretraining and saving it first if it is not there."""
    if (base_dir / "config.json").exists() and (base_dir / "model.safetensors").exists():
        return load_base(base_dir)
    net = workload.pretrain(seed, settings)
    save_base(net, base_dir)
    return load_base(base_dir)


def prepare(
    workload: Workload,
    *,
    data_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    settings: Mapping[str, Any],
    seed: int,
) -> PreparedModel:
    """Materialise the store, pretrain the frozen base (if absent), train v1 into ``adapter_dir``."""
    t0 = time.perf_counter()
    merged = workload.settings(settings)
    store = DataStore.materialise(Path(data_dir), workload)
    base = ensure_base(workload, Path(base_dir), merged, seed)
    t_base = time.perf_counter()
    tasks = workload.tasks()
    task_names = [t.name for t in tasks]
    state = RoundState(version=1)
    data = store.client_data()
    train = retain_set(data, None, tasks=task_names, client_index=store.client_index(), state=state)
    cfg = TrainConfig.from_settings(merged)
    _seed_all(seed)
    model = train_v1(base, train, tasks, cfg, seed=seed)
    t_train = time.perf_counter()
    save_adapter(model, Path(adapter_dir), state)
    heldout = store.heldout().to_batch(store.client_index())
    evidence: dict[str, Any] = {
        "kind": "prepare",
        "workload": workload.name,
        "seed": seed,
        "train_config": cfg.to_json(),
        "samples": len(train),
        "clients": len(store.active_clients),
        "metrics": {
            "train": _task_metrics(model, train, tasks),
            "val": _task_metrics(model, heldout, tasks),
            "subset_id_train_accuracy": _subset_accuracy(model, train),
        },
        "timings_s": {"base": t_base - t0, "train": t_train - t_base},
    }
    subjects = {c: store.sample_ids_of(c) for c in store.active_clients}
    return PreparedModel(subjects=subjects, tasks=task_names, state=state, evidence=evidence)


# ----------------------------------------------------------------------------------------------
# run_round
# ----------------------------------------------------------------------------------------------


@dataclass
class RequestContext:
    """Everything one request's method, pruning and audit need (built by the engine)."""

    spec: ForgetSpec
    resolved: ResolvedSpec
    selection: ForgetSelection
    partitions: Partitions
    retain: Batch  # the full retain set (what a retrain learns from)
    heldout: Batch
    tasks: list[TaskSpec]
    client_index: dict[str, int]
    settings: dict[str, Any]
    seed: int
    device: str
    base: MultiHeadNet
    state: RoundState  # the state *before* this request
    cache_dir: Path | None
    importance_cache_key: str | None
    stage: int


def _selection(resolved: ResolvedSpec, state: RoundState) -> ForgetSelection:
    ids = [s for s in resolved.sample_ids if s not in set(state.forgotten_samples)]
    return ForgetSelection(sample_ids=ids, forget_tasks=list(resolved.forget_tasks))


def advance_state(state: RoundState, ctx: RequestContext, pruned: Sequence[int]) -> None:
    resolved = ctx.resolved
    if resolved.whole_client and resolved.client_id is not None:
        state.add_clients([resolved.client_id])
        state.add_samples(ctx.selection.sample_ids)
    elif resolved.full_task:
        state.add_samples(ctx.selection.sample_ids)
    else:
        state.add_pairs((s, t) for s in ctx.selection.sample_ids for t in ctx.selection.forget_tasks)
    state.add_pruned(pruned)
    state.requests.append(ctx.spec.request_id)


@dataclass
class EngineInputs:
    """What every request of a round (or of a benchmark stage) works on, loaded once."""

    workload: Workload
    store: DataStore
    base: MultiHeadNet
    tasks: list[TaskSpec]
    client_index: dict[str, int]
    data: SampleSet
    heldout: Batch
    settings: dict[str, Any]
    seed: int
    device: str = "cpu"
    cache_dir: Path | None = None

    @classmethod
    def load(
        cls,
        workload: Workload,
        *,
        data_dir: Path,
        base_dir: Path,
        settings: Mapping[str, Any],
        seed: int,
        device: str = "cpu",
        cache_dir: Path | None = None,
    ) -> EngineInputs:
        store = DataStore(Path(data_dir))
        client_index = store.client_index()
        return cls(
            workload=workload,
            store=store,
            base=load_base(Path(base_dir)),
            tasks=workload.tasks(),
            client_index=client_index,
            data=store.client_data(),
            heldout=store.heldout().to_batch(client_index),
            settings=workload.settings(settings),
            seed=seed,
            device=device,
            cache_dir=cache_dir,
        )

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def wants_reference(self) -> bool:
        return bool(dict(self.settings.get("audit", {})).get("retrain_reference", True))


def request_context(
    inputs: EngineInputs, spec: ForgetSpec, state: RoundState, *, stage: int, cache_key: str | None
) -> RequestContext:
    """Resolve a request against the store and build its partitions and retain set."""
    resolved = inputs.store.resolve(spec)
    selection = _selection(resolved, state)
    partitions = build_partitions(
        inputs.data,
        selection,
        tasks=inputs.task_names,
        client_index=inputs.client_index,
        state=state,
        anchor_fraction=float(inputs.settings.get("anchor_fraction", DEFAULT_ANCHOR_FRACTION)),
        seed=anchor_seed(inputs.seed, spec.request_id),
    )
    retain = retain_set(
        inputs.data, selection, tasks=inputs.task_names, client_index=inputs.client_index, state=state
    )
    return RequestContext(
        spec=spec,
        resolved=resolved,
        selection=selection,
        partitions=partitions,
        retain=retain,
        heldout=inputs.heldout,
        tasks=inputs.tasks,
        client_index=inputs.client_index,
        settings=inputs.settings,
        seed=inputs.seed,
        device=inputs.device,
        base=inputs.base,
        state=state.copy(),
        cache_dir=inputs.cache_dir,
        importance_cache_key=cache_key,
        stage=stage,
    )


def pruned_outputs(ctx: RequestContext) -> list[int]:
    """The subset-ID outputs this request suppresses (a whole-client request: the client's)."""
    if ctx.resolved.whole_client and ctx.resolved.client_id is not None:
        return [ctx.client_index[ctx.resolved.client_id]]
    return []


def apply_method(
    method: str, model: PeftModel, ctx: RequestContext
) -> tuple[PeftModel, dict[str, Any], list[int], float]:
    """Run ``method`` for one request, then (re-)apply persistent pruning. Returns the model, the
    method's info, the outputs newly pruned, and the wall time in seconds."""
    t0 = time.perf_counter()
    model, info = run_method(method, model, ctx)
    pruned = pruned_outputs(ctx)
    reapply_pruning(model, sorted(set(ctx.state.pruned_subset_outputs) | set(pruned)))
    return model, info, pruned, time.perf_counter() - t0


def run_round(
    workload: Workload,
    *,
    data_dir: Path,
    base_dir: Path,
    adapter_in: Path,
    adapter_out: Path,
    requests: list[ForgetSpec],
    method: str,
    settings: Mapping[str, Any],
    seed: int,
    device: str = "cpu",
    cache_dir: Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> RoundOutcome:
    """One unlearning round: the requests in order (one stage each); writes ``adapter_out``."""
    inputs = EngineInputs.load(
        workload,
        data_dir=data_dir,
        base_dir=base_dir,
        settings=settings,
        seed=seed,
        device=device,
        cache_dir=cache_dir,
    )
    state = RoundState.load(Path(adapter_in))
    model = load_adapter(inputs.base, Path(adapter_in), trainable=True, device=device)
    reapply_pruning(model, state.pruned_subset_outputs)
    cache_key: str | None = adapter_digest(Path(adapter_in))
    evidence: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    n = len(requests)
    for stage, spec in enumerate(requests, start=1):
        if on_progress is not None:
            on_progress(stage - 1, n, f"request {spec.request_id}: {method}")
        t0 = time.perf_counter()
        ctx = request_context(inputs, spec, state, stage=stage, cache_key=cache_key)
        before = copy.deepcopy(model)
        t1 = time.perf_counter()
        model, info, pruned, wall = apply_method(method, model, ctx)
        advance_state(state, ctx, pruned)
        cache_key = None  # the adapter changed: cached full-data importance no longer applies
        reference: PeftModel | None = None
        t_ref = 0.0
        if inputs.wants_reference:
            if on_progress is not None:
                on_progress(stage - 1, n, f"request {spec.request_id}: retrain reference")
            tr = time.perf_counter()
            reference = reference_retrain(
                inputs.base,
                ctx.retain,
                inputs.tasks,
                inputs.settings,
                seed=seed,
                pruned=state.pruned_subset_outputs,
            )
            t_ref = time.perf_counter() - tr
        evidence[spec.request_id] = audit_request(
            model,
            ctx,
            reference=reference,
            original=before,
            method=method,
            method_info=info,
            timings={"partitions_s": t1 - t0, "method_s": wall, "reference_s": t_ref},
        )
        timings[spec.request_id] = wall
        if on_progress is not None:
            on_progress(stage, n, f"request {spec.request_id}: done")
    state.version += 1
    state.importance_cache_key = None
    save_adapter(model, Path(adapter_out), state)
    return RoundOutcome(evidence=evidence, state=state, timings=timings)


def reference_retrain(
    base: MultiHeadNet,
    retain: Batch,
    tasks: Sequence[TaskSpec],
    settings: Mapping[str, Any],
    *,
    seed: int,
    pruned: Sequence[int],
) -> PeftModel:
    """The exact reference: a fresh adapter trained on the retain set (v1 recipe), pruning applied."""
    cfg = TrainConfig.from_settings(settings)
    model = retrain(base, retain, tasks, cfg, seed=seed)
    reapply_pruning(model, pruned)
    return model


# ----------------------------------------------------------------------------------------------
# glue to the methods registry, pruning and audit (worker/unlearning/methods, pruning.py, audit.py)
# ----------------------------------------------------------------------------------------------


def snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters (adapter + heads) before a method runs."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reapply_pruning(model: PeftModel, outputs: Sequence[int]) -> None:
    """Suppress the subset-ID head's ``outputs`` (persistent pruning, re-applied every round)."""
    if not outputs:
        return
    head = unwrap(model).heads[SUBSET_HEAD]
    active = getattr(head, "modules_to_save", None)
    targets = list(active.values()) if isinstance(active, torch.nn.ModuleDict) else [head]
    with torch.no_grad():
        for linear in targets:
            assert isinstance(linear, torch.nn.Linear)
            idx = torch.tensor(sorted(set(outputs)), dtype=torch.long)
            linear.weight[idx] = 0.0
            if linear.bias is not None:
                linear.bias[idx] = PRUNED_LOGIT


def run_method(name: str, model: PeftModel, ctx: RequestContext) -> tuple[PeftModel, dict[str, Any]]:
    """Run the unlearning method ``name`` on ``model`` for one request; returns the model and info."""
    if name == "original":
        return model, {"method": "original"}
    if name == "retrain":
        cfg = TrainConfig.from_settings(ctx.settings)
        fresh = retrain(ctx.base, ctx.retain, ctx.tasks, cfg, seed=ctx.seed)
        for p in fresh.parameters():
            if p.requires_grad:
                p.requires_grad_(True)
        return fresh, {"method": "retrain", "train_config": cfg.to_json()}
    raise KeyError(f"unknown unlearning method {name!r}")


def audit_request(
    model: PeftModel,
    ctx: RequestContext,
    *,
    reference: PeftModel | None,
    original: PeftModel,
    method: str,
    method_info: Mapping[str, Any],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The evidence of one request (JSON)."""
    forget_ids = set(ctx.selection.sample_ids)
    unl = ctx.partitions.forget
    retained = ctx.retain
    per_task: dict[str, Any] = {}
    for t in ctx.tasks:
        per_task[t.name] = {
            "ret": _task_metrics(model, retained, [t])[t.name],
            "unl": _task_metrics(model, unl, [t])[t.name] if t.name in ctx.partitions.forget_tasks else None,
            "val": _task_metrics(model, ctx.heldout, [t])[t.name],
        }
    return {
        "request_id": ctx.spec.request_id,
        "stage": ctx.stage,
        "method": method,
        "method_info": dict(method_info),
        "seed": ctx.seed,
        "forget_samples": len(forget_ids),
        "forget_tasks": list(ctx.partitions.forget_tasks),
        "anchor": {
            "fraction": float(ctx.settings.get("anchor_fraction", DEFAULT_ANCHOR_FRACTION)),
            "size": len(ctx.partitions.anchor_sample_ids),
            "sample_ids": list(ctx.partitions.anchor_sample_ids),
        },
        "tasks": per_task,
        "uis": None,
        "uis_reference": None,
        "uis_reason": "no retrain reference" if reference is None else "audit module not available",
        "timings_s": dict(timings),
    }
