"""The engine the worker pipeline calls: ``prepare`` (v1) and ``run_round`` (one unlearning round).

Contracts: docs/architecture.md ("The ML core"). ``run_round`` processes the requests in order, each
request one stage of the sequential setting: resolve X_f/T_f against the store, build the four
partitions, run the method (by name, from the methods registry), suppress a forgotten client's
subset-ID output for good, update the RoundState, audit (with a retrain reference when
``settings["audit"]["retrain_reference"]``). It never touches the database or the store's files
(the pipeline purges after publishing).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from worker.unlearning.adapter_io import ADAPTER_WEIGHTS, load_adapter, save_adapter
from worker.unlearning.audit import AuditConfig, ModelMetrics, audit, evaluate_model, unl_split
from worker.unlearning.datastore import DataStore, ResolvedSpec
from worker.unlearning.model import MultiHeadNet, load_base, save_base
from worker.unlearning.partitions import (
    DEFAULT_ANCHOR_FRACTION,
    ForgetSelection,
    anchor_seed,
    build_partitions,
    id_mask,
    retain_set,
)
from worker.unlearning.pruning import reapply_pruning
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig, retrain, train_v1
from worker.unlearning.types import SUBSET_HEAD, Batch, ForgetSpec, Partitions, TaskSpec, concat_batches
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
    save_adapter(model, Path(adapter_dir))
    state.importance_cache_key = adapter_digest(Path(adapter_dir))
    state.save(Path(adapter_dir))
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
    """Everything the engine knows about one request before its method runs."""

    spec: ForgetSpec
    resolved: ResolvedSpec
    selection: ForgetSelection
    partitions: Partitions
    retain: Batch  # the full retain set (what a retrain learns from): X × T minus D_f and earlier forgets
    ret: Batch  # the Ret split of the audit: retained instances X_r (the retain set without X_f rows)
    unl: Batch  # the Unl split: X_f with every label it has (D_f ∪ D_r^task)
    heldout: Batch
    tasks: list[TaskSpec]
    client_index: dict[str, int]
    settings: dict[str, Any]
    seed: int
    device: str
    base: MultiHeadNet
    state: RoundState  # the state *before* this request
    cache_dir: Path | None
    cache_key: str | None
    stage: int

    @property
    def prune_outputs(self) -> list[int]:
        """The subset-ID outputs this request suppresses (a whole-client request: the client's)."""
        if self.resolved.whole_client and self.resolved.client_id is not None:
            return [self.client_index[self.resolved.client_id]]
        return []


def _selection(resolved: ResolvedSpec, state: RoundState) -> ForgetSelection:
    gone = set(state.forgotten_samples)
    ids = [s for s in resolved.sample_ids if s not in gone]
    return ForgetSelection(sample_ids=ids, forget_tasks=list(resolved.forget_tasks))


def advance_state(state: RoundState, ctx: RequestContext, pruned: Sequence[int]) -> None:
    """Record the request in ``state`` (in place): what is forgotten, what is pruned."""
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
        return bool(dict(self.settings.get("audit", {}) or {}).get("retrain_reference", True))

    def full_train_set(self) -> Batch:
        """The v1 training data: every client sample with all its labels."""
        return retain_set(
            self.data, None, tasks=self.task_names, client_index=self.client_index, state=RoundState()
        )


def request_context(
    inputs: EngineInputs, spec: ForgetSpec, state: RoundState, *, stage: int, cache_key: str | None
) -> RequestContext:
    """Resolve a request against the store and build its partitions, retain set and audit splits."""
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
    forget_ids = set(selection.sample_ids)
    ret = retain.select(~id_mask(retain.sample_ids, forget_ids))
    return RequestContext(
        spec=spec,
        resolved=resolved,
        selection=selection,
        partitions=partitions,
        retain=retain,
        ret=ret,
        unl=unl_split(partitions),
        heldout=inputs.heldout,
        tasks=inputs.tasks,
        client_index=inputs.client_index,
        settings=inputs.settings,
        seed=inputs.seed,
        device=inputs.device,
        base=inputs.base,
        state=state.copy(),
        cache_dir=inputs.cache_dir,
        cache_key=cache_key,
        stage=stage,
    )


def evaluate(model: torch.nn.Module, ctx: RequestContext) -> ModelMetrics:
    """Task metrics and loss-MIA of ``model`` on this request's Ret / Unl / Val splits."""
    cfg = AuditConfig.from_settings(ctx.settings)
    return evaluate_model(
        model,
        ctx.tasks,
        ret=ctx.ret,
        unl=ctx.unl,
        val=ctx.heldout,
        device=ctx.device,
        batch_size=cfg.batch_size,
    )


@dataclass
class Reference:
    """The exact reference of one request: a retrain on its retain set, and its metrics."""

    model: PeftModel
    metrics: ModelMetrics
    wall_s: float

    def mia_target(self, ctx: RequestContext) -> dict[str, float]:
        return self.metrics.mia_target(ctx.partitions.forget_tasks)


def reference_retrain(
    base: MultiHeadNet,
    retain: Batch,
    tasks: Sequence[TaskSpec],
    settings: Mapping[str, Any],
    *,
    seed: int,
    pruned: Sequence[int],
    device: str = "cpu",
) -> PeftModel:
    """The exact reference: a fresh adapter trained on the retain set (v1 recipe), pruning applied."""
    cfg = TrainConfig.from_settings(settings)
    model = retrain(base, retain, tasks, cfg, seed=seed, device=device)
    reapply_pruning(model, pruned)
    return model


def compute_reference(ctx: RequestContext) -> Reference:
    t0 = time.perf_counter()
    pruned = sorted(set(ctx.state.pruned_subset_outputs) | set(ctx.prune_outputs))
    model = reference_retrain(
        ctx.base, ctx.retain, ctx.tasks, ctx.settings, seed=ctx.seed, pruned=pruned, device=ctx.device
    )
    wall = time.perf_counter() - t0
    return Reference(model=model, metrics=evaluate(model, ctx), wall_s=wall)


def apply_method(
    method: str,
    model: PeftModel,
    ctx: RequestContext,
    *,
    mia_target: Mapping[str, float] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[PeftModel, dict[str, Any], list[int], float]:
    """Run ``method`` (from the methods registry) for one request, then re-apply the persistent
    pruning. Returns the model, the method's info, the outputs the method pruned, and the wall time."""
    from worker.unlearning.methods import MethodContext, get_method

    fn = get_method(method)
    t0 = time.perf_counter()
    parts = [b for b in (ctx.retain, ctx.partitions.forget) if len(b)]
    mctx = MethodContext(
        model=model,
        tasks=ctx.tasks,
        partitions=ctx.partitions,
        full=concat_batches(parts) if parts else ctx.retain,
        heldout=ctx.heldout,
        settings=ctx.settings,
        seed=ctx.seed,
        device=ctx.device,
        prune_outputs=ctx.prune_outputs,
        pruned_outputs=list(ctx.state.pruned_subset_outputs),
        mia_target=dict(mia_target) if mia_target else None,
        cache_dir=ctx.cache_dir,
        cache_key=ctx.cache_key,
        retain=ctx.retain,
        base=ctx.base,
        on_progress=on_progress,
    )
    result = fn(mctx)
    out = result.model
    if not isinstance(out, PeftModel):
        raise TypeError(f"method {method!r} returned a {type(out).__name__}, not a peft model")
    pruned = sorted({int(o) for o in result.pruned_outputs})
    reapply_pruning(out, sorted(set(ctx.state.pruned_subset_outputs) | set(pruned)))
    return out, dict(result.info), pruned, time.perf_counter() - t0


def request_evidence(
    model: torch.nn.Module,
    ctx: RequestContext,
    *,
    method: str,
    method_info: Mapping[str, Any],
    reference: Reference | None,
    original: ModelMetrics | None,
    timings: Mapping[str, float],
    pruned: Sequence[int] = (),
) -> dict[str, Any]:
    """The evidence of one request (JSON): the audit plus what was run on which data.

    ``pruned``: the subset-ID outputs this request's method suppressed."""
    evidence = audit(
        model,
        ctx.tasks,
        ret=ctx.ret,
        unl=ctx.unl,
        val=ctx.heldout,
        forget_tasks=ctx.partitions.forget_tasks,
        reference=None if reference is None else reference.metrics,
        original=original,
        reference_name="retrain",
        settings=ctx.settings,
        seed=ctx.seed,
        device=ctx.device,
    ).to_json()
    if len(ctx.partitions.forget) == 0:
        evidence["uis"]["reason"] = "nothing left to forget: the request's data is already forgotten"
    elif reference is None and evidence["uis"].get("reason") is not None:
        evidence["uis"]["reason"] = (
            "no retrain reference (settings.audit.retrain_reference is false): UIS is only reported "
            "against a real retrain on the same retain set"
        )
    evidence.update(
        {
            "request_id": ctx.spec.request_id,
            "kind": ctx.spec.kind,
            "client_id": ctx.resolved.client_id,
            "stage": ctx.stage,
            "method": method,
            "method_info": dict(method_info),
            "settings": ctx.settings,
            "seed": ctx.seed,
            "forget_samples": len(ctx.selection.sample_ids),
            "full_task": ctx.resolved.full_task,
            "anchor": {
                "fraction": float(ctx.settings.get("anchor_fraction", DEFAULT_ANCHOR_FRACTION)),
                "seed": anchor_seed(ctx.seed, ctx.spec.request_id),
                "size": len(ctx.partitions.anchor_sample_ids),
                "sample_ids": list(ctx.partitions.anchor_sample_ids),
            },
            "partition_sizes": {
                "forget": len(ctx.partitions.forget),
                "retain_task": len(ctx.partitions.retain_task),
                "retain_inst": len(ctx.partitions.retain_inst),
                "retain_clean": len(ctx.partitions.retain_clean),
                "retain_set": len(ctx.retain),
            },
            "pruned_subset_outputs": sorted({int(o) for o in pruned}),
            "timings_s": dict(timings),
        }
    )
    return evidence


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
    from worker.unlearning.methods import get_method

    get_method(method)  # unknown method: fail before any work
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
    # the cached full-data importance belongs to adapter_in's weights (the state records the key;
    # the digest is recomputed so that a mismatch can never reuse a stale cache)
    cache_key: str | None = adapter_digest(Path(adapter_in))
    evidence: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    n = len(requests)

    for stage, spec in enumerate(requests, start=1):

        def progress(message: str, _stage: int = stage, _id: str = spec.request_id) -> None:
            if on_progress is not None:
                on_progress(_stage - 1, n, f"request {_id}: {message}")

        t0 = time.perf_counter()
        ctx = request_context(inputs, spec, state, stage=stage, cache_key=cache_key)
        t_ctx = time.perf_counter() - t0
        reference: Reference | None = None
        info: dict[str, Any]
        nothing_left = len(ctx.partitions.forget) == 0
        if inputs.wants_reference and not nothing_left:
            progress("retrain reference")
            reference = compute_reference(ctx)
        original = evaluate(model, ctx)
        progress(method)
        if nothing_left:
            # everything the request names is already forgotten (a repeated request, or a retry
            # after a purge): nothing to unlearn; pruning of a whole client is still (re)applied
            pruned = ctx.prune_outputs
            reapply_pruning(model, sorted(set(state.pruned_subset_outputs) | set(pruned)))
            info, wall = {"method": method, "skipped": "nothing left to forget"}, 0.0
        elif method == "retrain" and reference is not None:
            # the reference *is* the retrain (same retain set, recipe and seed): do not train twice
            model, info, pruned, wall = (
                reference.model,
                {"method": "retrain", "reused_reference": True},
                ctx.prune_outputs,
                reference.wall_s,
            )
        else:
            model, info, pruned, wall = apply_method(
                method,
                model,
                ctx,
                mia_target=None if reference is None else reference.mia_target(ctx),
                on_progress=progress,
            )
        advance_state(state, ctx, pruned)
        cache_key = None  # the adapter changed: a cached full-data importance no longer applies
        progress("audit")
        evidence[spec.request_id] = request_evidence(
            model,
            ctx,
            method=method,
            method_info=info,
            reference=reference,
            original=original,
            pruned=pruned,
            timings={
                "partitions_s": t_ctx,
                "method_s": wall,
                "reference_s": 0.0 if reference is None else reference.wall_s,
            },
        )
        timings[spec.request_id] = wall
        if on_progress is not None:
            on_progress(stage, n, f"request {spec.request_id}: done")
    state.version += 1
    save_adapter(model, Path(adapter_out))
    # the key the next round's full-data importance is cached under: this version's weights digest
    state.importance_cache_key = adapter_digest(Path(adapter_out))
    state.save(Path(adapter_out))
    return RoundOutcome(evidence=evidence, state=state, timings=timings)
