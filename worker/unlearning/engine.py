"""The engine the worker pipeline calls: ``prepare`` (v1) and ``run_round`` (one unlearning round).

Contracts: docs/architecture.md ("The ML core"). ``run_round`` processes the requests in order, each
request one stage of the sequential setting: resolve X_f/T_f against the store, build the four
partitions, run the method (by name, from the methods registry), suppress a forgotten client's
subset-ID output for good, update the RoundState; then the acceptance check of the published model
(``acceptance.py``; on failure the exact path, ``retrain``, replaces the method's update) and the audit.
It never touches the database or the store's files (the pipeline purges after publishing).

No oracle: nothing ``run_round`` runs trains, loads or reads a retrain of the request it serves as a
target or a reference (UNLEARNING.md). Early stopping and the acceptance check use the version's
retain anchor, the forget set and unseen-population data (the held-out split) only; UIS against a
real retrain is certification's job, off the request path. A ``retrain`` that *replaces* a failed
update is not a reference: it is the exact unlearning, and it is what the round publishes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from worker.unlearning import acceptance
from worker.unlearning.adapter_io import load_adapter, save_adapter
from worker.unlearning.audit import (
    AuditConfig,
    ModelMetrics,
    SplitOutputs,
    audit,
    merge_rows_in_id_order,
    metrics_from_outputs,
    ret_subset,
    split_outputs,
    unl_split,
)
from worker.unlearning.continuation import CONTINUATION_METHOD, continuation_settings
from worker.unlearning.datastore import DataStore, ResolvedSpec
from worker.unlearning.likelihood_ratio import (
    forget_bound_allowance,
    likelihood_ratio_audit,
    out_reference_targets,
)
from worker.unlearning.model import MultiTaskModel, has_base, load_base
from worker.unlearning.partitions import (
    DEFAULT_ANCHOR_FRACTION,
    ForgetSelection,
    anchor_key,
    anchor_seed,
    build_partitions,
    id_mask,
    retain_set,
)
from worker.unlearning.progress import ACCEPTANCE, AUDIT, PARTITIONS, StageCallback
from worker.unlearning.pruning import reapply_pruning
from worker.unlearning.reference_adapters import LoadedReferences, load_references, train_references
from worker.unlearning.runtime import settle
from worker.unlearning.ssd import precompute_full_importance, weights_digest
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig, retrain, train_v1
from worker.unlearning.types import SUBSET_HEAD, Batch, ForgetSpec, Partitions, TaskSpec, device_of
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
    #: with ``defer_next_importance``: computes the next request's I_D of the published model into
    #: the cache (returns the seconds spent); the worker calls it once the version is published, so
    #: no request waits for it. ``None``: nothing to compute (or it was computed in the round).
    next_importance: Callable[[], float] | None = None


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def metrics_on(model: torch.nn.Module, batch: Batch, tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """``model``'s metric per task on ``batch`` (one forward; NaN for every task of an empty batch)."""
    if len(batch) == 0:
        return {t.name: float("nan") for t in tasks}
    with torch.no_grad():
        out = model(batch.to(device_of(model)).inputs)
    return {t.name: t.metric(out[t.name].cpu(), batch.labels[t.name]) for t in tasks}


def _subset_accuracy(model: torch.nn.Module, batch: Batch) -> float:
    if len(batch) == 0:
        return float("nan")
    with torch.no_grad():
        pred = model(batch.to(device_of(model)).inputs)[SUBSET_HEAD].argmax(-1).cpu()
    valid = batch.subset >= 0
    return float((pred[valid] == batch.subset[valid]).float().mean()) if bool(valid.any()) else float("nan")


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------


def original_val(val: Mapping[str, float]) -> dict[str, float]:
    """``RoundState.original_val`` from the original version's held-out metric per task: a task
    without held-out labels (NaN) is left out, unknown."""
    return {t: v for t, v in val.items() if v == v}


def ensure_base(workload: Workload, base_dir: Path, settings: Mapping[str, Any], seed: int) -> MultiTaskModel:
    """Load the frozen base from ``base_dir``, pretraining and saving it first if it is not there."""
    if has_base(base_dir):
        return workload.load_base(base_dir)
    net = workload.pretrain(seed, settings)
    workload.save_base(net, base_dir)
    return workload.load_base(base_dir)


def prepare(
    workload: Workload,
    *,
    data_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    settings: Mapping[str, Any],
    seed: int,
    cache_dir: Path | None = None,
    references_dir: Path | None = None,
) -> PreparedModel:
    """Materialise the store, pretrain the frozen base (if absent), train v1 into ``adapter_dir``.

    With ``cache_dir``, v1's full-data importance (SSD's ``I_D``) is computed into the cache too,
    so the first request on v1 does not wait for it (``timings_s.importance``). With
    ``references_dir`` and ``settings.audit.reference_adapters`` > 0, the likelihood-ratio audit's
    reference adapters are trained there too (``timings_s.references``), off the request path."""
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
    heldout = store.heldout().to_batch(store.client_index())
    val = metrics_on(model, heldout, tasks)
    save_adapter(model, Path(adapter_dir))
    state.importance_cache_key = weights_digest(model)
    state.original_val = original_val(val)
    state.save(Path(adapter_dir))
    t_importance = 0.0
    for ssd_settings in importance_settings_of_methods(merged):  # the method is chosen per round
        t_importance += precompute_full_importance(
            model, train, tasks, ssd_settings, seed=seed, cache_dir=cache_dir
        )[1]
    audit_cfg = AuditConfig.from_settings(merged)
    k = audit_cfg.reference_adapters
    references: dict[str, Any] | None = None
    if k and references_dir is not None:
        refs = train_references(
            base, train, tasks, cfg, client_index=store.client_index(), k=k, seed=seed,
            directory=Path(references_dir), workload=workload.name,
            withhold_tasks=audit_cfg.reference_withheld_tasks(tasks),
            heldout=heldout, in_fraction=audit_cfg.reference_in_fraction,
        )  # fmt: skip
        references = {"k": refs.k, "recipe_digest": refs.recipe_digest, "train_s": refs.train_s,
                      "clients": {str(i): m for i, m in refs.members.items()}}  # fmt: skip
        if refs.withheld:
            references["withheld"] = {str(i): w for i, w in refs.withheld.items()}
    evidence: dict[str, Any] = {
        "kind": "prepare",
        "workload": workload.name,
        "seed": seed,
        "train_config": cfg.to_json(),
        "samples": len(train),
        "clients": len(store.active_clients),
        "metrics": {
            "train": metrics_on(model, train, tasks),
            "val": val,
            "subset_id_train_accuracy": _subset_accuracy(model, train),
        },
        "timings_s": {"base": t_base - t0, "train": t_train - t_base, "importance": t_importance},
    }
    if references is not None:
        evidence["references"] = references
        evidence["timings_s"]["references"] = references["train_s"]
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
    base: MultiTaskModel
    state: RoundState  # the state *before* this request
    cache_dir: Path | None
    cache_key: str | None
    stage: int
    anchor_fraction: float = DEFAULT_ANCHOR_FRACTION  # of the retain instances in the anchor
    references: LoadedReferences | None = None  # the model's reference adapters (read only)
    heldout_clients: dict[str, str] = field(default_factory=dict)  # held-out id -> unseen client

    @property
    def prune_outputs(self) -> list[int]:
        """The subset-ID outputs this request suppresses (a whole-client request: the client's)."""
        if self.resolved.whole_client and self.resolved.client_id is not None:
            return [self.client_index[self.resolved.client_id]]
        return []

    @property
    def pruned_after(self) -> list[int]:
        """Every subset-ID output suppressed once this request is done: the earlier requests' and
        its own (what a retrain of its retain set applies)."""
        return sorted(set(self.state.pruned_subset_outputs) | set(self.prune_outputs))


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
        state.add_pairs(
            ((s, t) for s in ctx.selection.sample_ids for t in ctx.selection.forget_tasks),
            all_tasks=[t.name for t in ctx.tasks],
        )
    state.add_pruned(pruned)
    state.requests.append(ctx.spec.request_id)


@dataclass
class EngineInputs:
    """What every request of a round (or of a benchmark stage) works on, loaded once."""

    workload: Workload
    store: DataStore
    base: MultiTaskModel
    tasks: list[TaskSpec]
    client_index: dict[str, int]
    data: SampleSet
    heldout: Batch
    settings: dict[str, Any]
    seed: int
    device: str = "cpu"
    cache_dir: Path | None = None
    # the likelihood-ratio audit's reference adapters (None: none trained, the audit is omitted)
    references: LoadedReferences | None = None
    # held-out sample id -> the unseen client it was drawn from (DataStore.heldout_clients)
    heldout_clients: dict[str, str] = field(default_factory=dict)

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
        references_dir: Path | None = None,
    ) -> EngineInputs:
        store = DataStore(Path(data_dir), workload.collate)
        client_index = store.client_index()
        base = load_base(Path(base_dir))
        heldout = store.heldout().to_batch(client_index)
        return cls(
            workload=workload,
            store=store,
            base=base,
            tasks=workload.tasks(),
            client_index=client_index,
            data=store.client_data(),
            heldout=heldout,
            settings=workload.settings(settings),
            seed=seed,
            device=device,
            cache_dir=cache_dir,
            references=load_references(
                base, references_dir, device=device, heldout=heldout, client_index=client_index
            ),
            heldout_clients=store.heldout_clients(),
        )

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __post_init__(self) -> None:
        if dict(self.settings.get("audit", {}) or {}).get("retrain_reference"):
            raise ValueError(
                "settings.audit.retrain_reference is no longer supported: a round never trains a retrain "
                "of the request it serves (no oracle); certification compares a published version with a "
                "retrain off the request path"
            )

    def full_train_set(self) -> Batch:
        """The v1 training data: every client sample with all its labels."""
        return retain_set(
            self.data, None, tasks=self.task_names, client_index=self.client_index, state=RoundState()
        )


def anchor_fraction(settings: Mapping[str, Any], method: str | None = None) -> float:
    """The anchor fraction of ``method``'s partitions: ``settings["anchor_fractions"][method]`` when
    set (the anchor is what a method's retain term sees: methods may need different amounts), else
    ``settings["anchor_fraction"]`` (default 0.1)."""
    per_method = dict(settings.get("anchor_fractions") or {})
    if method is not None and method in per_method:
        return float(per_method[method])
    return float(settings.get("anchor_fraction", DEFAULT_ANCHOR_FRACTION))


def request_anchor_key(spec: ForgetSpec, settings: Mapping[str, Any]) -> str:
    """The anchor key of ``spec`` (:func:`worker.unlearning.partitions.anchor_key`): its content and
    ``settings["anchor_draw"]``."""
    draw = settings.get("anchor_draw", 0)
    if isinstance(draw, bool) or not isinstance(draw, int):
        raise ValueError("settings['anchor_draw'] must be an integer")
    return anchor_key(spec.kind, spec.client_id, spec.sample_ids, spec.tasks, draw)


def request_context(
    inputs: EngineInputs,
    spec: ForgetSpec,
    state: RoundState,
    *,
    stage: int,
    cache_key: str | None,
    method: str | None = None,
) -> RequestContext:
    """Resolve a request against the store and build its partitions (with ``method``'s anchor
    fraction), retain set and audit splits."""
    resolved = inputs.store.resolve(spec)
    selection = _selection(resolved, state)
    fraction = anchor_fraction(inputs.settings, method)
    partitions = build_partitions(
        inputs.data,
        selection,
        tasks=inputs.task_names,
        client_index=inputs.client_index,
        state=state,
        anchor_fraction=fraction,
        seed=anchor_seed(inputs.seed, request_anchor_key(spec, inputs.settings)),
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
        anchor_fraction=fraction,
        references=inputs.references,
        heldout_clients=inputs.heldout_clients,
    )


def audit_ret(ctx: RequestContext) -> Batch:
    """The Ret rows the evidence measures: a seeded subset of at most ``audit.ret_rows``
    (:func:`worker.unlearning.audit.ret_subset`), the same rows before and after the request."""
    return ret_subset(ctx.ret, AuditConfig.from_settings(ctx.settings).ret_rows, ctx.seed)


def ret_rows_evidence(ctx: RequestContext, ret: Batch, tasks: Mapping[str, Any]) -> dict[str, Any]:
    """What the evidence's Ret metrics were measured on (``audit.ret_rows``) and, per task, the
    standard error the subset adds: of the Ret accuracy (binomial, finite-population corrected;
    ``None`` for a metric outside [0, 1]) and of ``mia_auc_ret`` (its value near 0.5,
    √((1/n_ret + 1/n_val) / 12)). With every row measured both are 0 / the AUC's own."""
    se: dict[str, dict[str, float | None]] = {}
    for t in ctx.tasks:
        m = tasks.get(t.name) or {}
        n, n_val, p = int(m.get("n_ret") or 0), int(m.get("n_val") or 0), m.get("ret")
        y = ctx.ret.labels.get(t.name)
        total = int(t.supervised(y).sum()) if y is not None else 0
        acc_se: float | None = None
        if n and p is not None and 0.0 <= float(p) <= 1.0 and total > 1:
            fpc = max(total - n, 0) / (total - 1)
            acc_se = round(math.sqrt(float(p) * (1 - float(p)) / n * fpc), 6)
        auc_se = round(math.sqrt((1 / n + 1 / n_val) / 12), 6) if n and n_val else None
        se[t.name] = {"n_ret": n, "of": total, "ret_se": acc_se, "mia_auc_ret_se": auc_se}
    return {
        "setting": "audit.ret_rows",
        "rows": AuditConfig.from_settings(ctx.settings).ret_rows,
        "measured": len(ret),
        "of": len(ctx.ret),
        "seed": ctx.seed,
        "tasks": se,
    }


def evaluate(model: torch.nn.Module, ctx: RequestContext) -> ModelMetrics:
    """Task metrics and loss-MIA of ``model`` on this request's Ret (:func:`audit_ret`) / Unl / Val
    splits."""
    return evaluate_outputs(model, ctx)[0]


def evaluate_outputs(model: torch.nn.Module, ctx: RequestContext) -> tuple[ModelMetrics, SplitOutputs]:
    """:func:`evaluate`, and ``model``'s outputs on the splits (the acceptance check reuses the
    pre-request model's Unl / Val outputs instead of forwarding them again)."""
    cfg = AuditConfig.from_settings(ctx.settings)
    ret = audit_ret(ctx)
    outs = split_outputs(
        model, ret=ret, unl=ctx.unl, val=ctx.heldout, device=ctx.device, batch_size=cfg.batch_size
    )
    metrics = metrics_from_outputs(outs, ctx.tasks, ret=ret, unl=ctx.unl, val=ctx.heldout, device=ctx.device)
    return metrics, outs


@dataclass
class Reference:
    """The exact reference of one request: a retrain on its retain set, and its metrics (the
    benchmark's scoring; never trained on the request path)."""

    model: PeftModel
    metrics: ModelMetrics
    wall_s: float


def reference_retrain(
    base: MultiTaskModel,
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
    model = reference_retrain(
        ctx.base,
        ctx.retain,
        ctx.tasks,
        ctx.settings,
        seed=ctx.seed,
        pruned=ctx.pruned_after,
        device=ctx.device,
    )
    settle(ctx.device)
    wall = time.perf_counter() - t0
    return Reference(model=model, metrics=evaluate(model, ctx), wall_s=wall)


def training_data(ctx: RequestContext) -> Batch:
    """D of SSD's full-data importance: the current training data, one row per sample with every
    label it still has (the retain set and D_f merged), in sample-id order (SSD's own order)."""
    parts = [b for b in (ctx.retain, ctx.partitions.forget) if len(b)]
    return merge_rows_in_id_order(parts) if parts else ctx.retain


def full_importance_settings(method: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The SSD settings with which ``method`` reads the full-data importance, or ``None`` if it
    does not (then computing it ahead is pointless): what its spec declares
    (:class:`worker.unlearning.methods.Needs`)."""
    from worker.unlearning.methods import get_spec

    reads = get_spec(method).needs.full_importance
    return None if reads is None else reads(settings)


def importance_settings_of_methods(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The distinct SSD settings with which the registered methods read the full-data importance
    (what ``prepare`` computes ahead for v1), in registration order."""
    from worker.unlearning.methods import specs

    out: list[dict[str, Any]] = []
    for spec in specs():
        chosen = full_importance_settings(spec.name, settings)
        if chosen is not None and chosen not in out:
            out.append(chosen)
    return out


def precompute_next_importance(
    model: torch.nn.Module, ctx: RequestContext, method: str
) -> tuple[str | None, float]:
    """After ``ctx``'s request: the next request's ``I_D`` of ``model`` (its training data is this
    request's retain set) into the cache, when ``method`` uses it. Returns the cache key for the
    next request (``None``: nothing cached) and the seconds spent."""
    ssd_settings = full_importance_settings(method, ctx.settings)
    if ssd_settings is None:
        return None, 0.0
    return precompute_full_importance(
        model, ctx.retain, ctx.tasks, ssd_settings, seed=ctx.seed, cache_dir=ctx.cache_dir
    )


def apply_method(
    method: str,
    model: PeftModel,
    ctx: RequestContext,
    *,
    on_progress: Callable[[str], None] | None = None,
    on_stage: StageCallback | None = None,
) -> tuple[PeftModel, dict[str, Any], list[int], float]:
    """Run ``method`` (from the methods registry) for one request, then re-apply the persistent
    pruning. Returns the model, the method's info, the outputs the method pruned, and the wall time."""
    from worker.unlearning.methods import MethodContext, run_method

    t0 = time.perf_counter()
    mctx = MethodContext(
        model=model,
        tasks=ctx.tasks,
        partitions=ctx.partitions,
        full=training_data(ctx),
        heldout=ctx.heldout,
        settings=ctx.settings,
        seed=ctx.seed,
        device=ctx.device,
        prune_outputs=ctx.prune_outputs,
        pruned_outputs=list(ctx.state.pruned_subset_outputs),
        cache_dir=ctx.cache_dir,
        cache_key=ctx.cache_key,
        retain=ctx.retain,
        base=ctx.base,
        on_progress=on_progress,
        on_stage=on_stage,
        references=ctx.references,
        client_index=ctx.client_index,
        heldout_clients=ctx.heldout_clients,
    )
    result = run_method(method, mctx)
    out = result.model
    if not isinstance(out, PeftModel):
        raise TypeError(f"method {method!r} returned a {type(out).__name__}, not a peft model")
    pruned = sorted({int(o) for o in result.pruned_outputs})
    reapply_pruning(out, sorted(set(ctx.state.pruned_subset_outputs) | set(pruned)))
    settle(ctx.device)
    return out, dict(result.info), pruned, time.perf_counter() - t0


@dataclass
class StageResult:
    """One request (one stage of the sequential setting) run by :func:`run_stage`; a round keeps
    one per request until its acceptance check and audit. The model after the stage is returned
    next to it, not in it: a round must not keep every stage's model alive."""

    info: dict[str, Any]  # the method's info
    pruned: list[int]  # the subset-ID outputs this request suppressed
    # partitions_s, method_s, importance_precompute_s (the next request's I_D, computed ahead);
    # a round adds acceptance_continuation_s and acceptance_fallback_s
    timings: dict[str, float]
    ctx: RequestContext
    original: ModelMetrics  # the model before the request, on this request's splits
    next_cache_key: str | None  # the key of the next request's I_D (None: nothing computed ahead)
    # the model before the request's outputs on the splits (the acceptance check reuses them)
    original_outputs: SplitOutputs | None = None

    @property
    def nothing_left(self) -> bool:
        return len(self.ctx.partitions.forget) == 0


def run_stage(
    inputs: EngineInputs,
    model: PeftModel,
    spec: ForgetSpec,
    state: RoundState,
    *,
    method: str,
    stage: int,
    cache_key: str | None,
    precompute_next: bool,
    on_progress: Callable[[str], None] | None = None,
    on_stage: StageCallback | None = None,
) -> tuple[PeftModel, StageResult]:
    """One request on one model, as a round and the benchmark both run it: resolve it and build
    its partitions (:func:`request_context`), measure ``model`` on its splits, apply ``method``,
    record the request in ``state`` (in place) and, with ``precompute_next``, compute the next
    request's full-data importance ahead. No oracle: nothing here trains or reads a retrain.

    ``cache_key``: the key under which ``model``'s ``I_D`` was computed ahead (``None``: none).
    Returns the model after the request (the method's update, pruning re-applied) and the stage."""
    t0 = time.perf_counter()
    ctx = request_context(inputs, spec, state, stage=stage, cache_key=cache_key, method=method)
    t_ctx = time.perf_counter() - t0
    original, outputs = evaluate_outputs(model, ctx)
    original_outputs = {k: outputs[k] for k in ("unl", "val")}  # Ret's are not reused
    if on_progress is not None:
        on_progress(method)
    info: dict[str, Any]
    nothing_left = len(ctx.partitions.forget) == 0
    if nothing_left:
        # everything the request names is already forgotten (a repeated request, or a retry after
        # a purge): nothing to unlearn; pruning of a whole client is still (re)applied
        pruned = ctx.prune_outputs
        reapply_pruning(model, sorted(set(state.pruned_subset_outputs) | set(pruned)))
        info, wall = {"method": method, "skipped": "nothing left to forget"}, 0.0
    else:
        model, info, pruned, wall = apply_method(
            method, model, ctx, on_progress=on_progress, on_stage=on_stage
        )
    advance_state(state, ctx, pruned)
    # the adapter changed: the next request needs the new weights' I_D; computing it now is
    # reported as its own timing, not hidden in the next request's method time
    next_key, t_next = None, 0.0
    if precompute_next and not nothing_left:
        next_key, t_next = precompute_next_importance(model, ctx, method)
    return model, StageResult(
        info=info,
        pruned=list(pruned),
        timings={"partitions_s": t_ctx, "method_s": wall, "importance_precompute_s": t_next},
        ctx=ctx,
        original=original,
        next_cache_key=next_key,
        original_outputs=original_outputs,
    )


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
    references: LoadedReferences | None = None,
) -> dict[str, Any]:
    """The evidence of one request (JSON): the audit plus what was run on which data.

    ``pruned``: the subset-ID outputs this request's method suppressed. ``references``: the
    likelihood-ratio audit's reference adapters; with them the evidence has ``likelihood_ratio``
    (:mod:`worker.unlearning.likelihood_ratio`), without them (none trained) it has none."""
    ret = audit_ret(ctx)
    # one forward of the published model per split, shared by the audit and the likelihood-ratio
    # attack (which forwarded Unl and Val again: ≈ 0.6 s of a scenes round)
    batch_size = AuditConfig.from_settings(ctx.settings).batch_size
    outs = split_outputs(
        model, ret=ret, unl=ctx.unl, val=ctx.heldout, device=ctx.device, batch_size=batch_size
    )
    evidence = audit(
        model,
        ctx.tasks,
        outputs=outs,
        ret=ret,
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
    evidence["ret_rows"] = ret_rows_evidence(ctx, ret, evidence["tasks"])
    if references is not None and len(ctx.unl):
        t_lr = time.perf_counter()
        unl_out, val_out = outs["unl"], outs["val"]
        shared = (
            None
            if unl_out is None or val_out is None
            else {k: torch.cat([unl_out[k], val_out[k]]) for k in unl_out}
        )
        evidence["likelihood_ratio"] = likelihood_ratio_audit(
            model, references, ctx.tasks, forget=ctx.unl, unseen=ctx.heldout,
            forget_tasks=ctx.partitions.forget_tasks, client_index=ctx.client_index, device=ctx.device,
            outputs=shared,
        )  # fmt: skip
        evidence["likelihood_ratio"]["wall_s"] = time.perf_counter() - t_lr
    if len(ctx.partitions.forget) == 0:
        evidence["uis"]["reason"] = "nothing left to forget: the request's data is already forgotten"
    elif reference is None and evidence["uis"].get("reason") is not None:
        evidence["uis"]["reason"] = (
            "UIS is only reported against a real retrain on the same retain set: certification computes "
            "it off the request path"
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
                "fraction": ctx.anchor_fraction,
                "seed": anchor_seed(ctx.seed, request_anchor_key(ctx.spec, ctx.settings)),
                "draw": int(ctx.settings.get("anchor_draw", 0)),
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


# ----------------------------------------------------------------------------------------------
# acceptance: the published model keeps every request's promise, or the exact path replaces it
# ----------------------------------------------------------------------------------------------


def acceptance_groups(ctx: RequestContext) -> acceptance.Groups:
    """The rows the acceptance check of ``ctx``'s request measures: its forget set (D_f), its kept
    tasks on X_f (D_r^task), the retained instances (every retained client) and the held-out split."""
    return acceptance.Groups(
        forget=ctx.partitions.forget,
        kept=ctx.partitions.retain_task,
        retained=ctx.ret,
        heldout=ctx.heldout,
    )


class ReferenceAllowance:
    """Per forgotten task of one request, the acceptance check's forget-bound allowance: the median
    over the reference adapters that never saw the request's rows of (their metric on the forget
    set − their metric on the held-out split) (:func:`likelihood_ratio.forget_bound_allowance`; the
    per-task request's OUT references too). Computed on first use and kept:
    a round whose checks pass never forwards the references for it. ``values``: what was computed
    (``None``: not needed)."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.values: dict[str, float] | None = None

    def __call__(self) -> dict[str, float]:
        if self.values is None:
            ctx = self.ctx
            per_task = {}
            if ctx.references is not None and ctx.references.models:
                per_task = out_reference_targets(
                    ctx.references, ctx.tasks, forget=ctx.partitions.forget, unseen=ctx.heldout,
                    forget_tasks=ctx.partitions.forget_tasks, client_index=ctx.client_index,
                    device=ctx.device,
                )  # fmt: skip
            self.values = forget_bound_allowance(per_task)
        return self.values


def check_request(
    before: torch.nn.Module,
    after: torch.nn.Module,
    ctx: RequestContext,
    cfg: acceptance.AcceptanceConfig,
    before_outputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    allowance: ReferenceAllowance | None = None,
) -> list[acceptance.Check]:
    """The acceptance checks of one request: ``after`` (the model to publish) against ``before`` (the
    version the round started from), with the original version's held-out level from the state.
    ``before_outputs``: ``before``'s outputs on some of the groups, already computed
    (:func:`before_outputs_of`). ``allowance``: the request's :class:`ReferenceAllowance`
    (``None``: the model has no references, a failed forget bound stays as it is)."""
    names = {i: c for c, i in ctx.client_index.items()}
    return acceptance.check(
        before,
        after,
        acceptance_groups(ctx),
        ctx.tasks,
        ctx.partitions.forget_tasks,
        cfg,
        original_val=ctx.state.original_val,
        client_names=names,
        before_outputs=before_outputs,
        allowance=allowance,
    )


def before_outputs_of(staged: Sequence[StageResult]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per request id, the round input's outputs on that request's acceptance groups that the
    round already computed: the first request was measured on the round input itself before its
    update (``StageResult.original_outputs``): its Unl split is D_f followed by D_r^task
    (:func:`worker.unlearning.audit.unl_split`), its Val split the held-out rows, which every
    request of the round shares. Later requests were measured on the model after the one before
    them, so only the held-out outputs are the round input's."""
    outs = staged[0].original_outputs if staged else None
    if outs is None:
        return {}
    first = staged[0]
    unl, val = outs.get("unl"), outs.get("val")
    n_forget = len(first.ctx.partitions.forget)
    reused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for position, s in enumerate(staged):
        mine: dict[str, dict[str, torch.Tensor]] = {}
        if val is not None:
            mine["heldout"] = val
        if position == 0 and unl is not None:
            mine["forget"] = {k: v[:n_forget] for k, v in unl.items()}
            mine["kept"] = {k: v[n_forget:] for k, v in unl.items()}
        reused[s.ctx.spec.request_id] = mine
    return reused


def continuation_context(
    inputs: EngineInputs, staged: Sequence[StageResult], index: int, method: str
) -> RequestContext:
    """The context the acceptance check's continuation runs request ``staged[index]`` with: its own
    forget set, and retain partitions that exclude every later request of the round too (the last
    request's context as it is)."""
    s = staged[index]
    if index == len(staged) - 1:
        return s.ctx
    state = s.ctx.state.copy()
    for later in staged[index + 1 :]:
        advance_state(state, later.ctx, later.pruned)
    return request_context(inputs, s.ctx.spec, state, stage=s.ctx.stage, cache_key=None, method=method)


def _continue_update(
    inputs: EngineInputs,
    model: PeftModel,
    staged: Sequence[StageResult],
    failing: set[str],
    settings: dict[str, Any],
    method: str,
    pruned: Sequence[int],
) -> tuple[PeftModel, dict[str, Any]]:
    """The continuation (``worker.unlearning.continuation``) of each request in ``failing``, in the
    round's order, on ``model``; the round's pruning re-applied. Returns the model and what ran."""
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for index, s in enumerate(staged):
        if s.ctx.spec.request_id not in failing:
            continue
        ctx = dataclasses.replace(continuation_context(inputs, staged, index, method), settings=settings)
        model, info, _, wall = apply_method(CONTINUATION_METHOD, model, ctx)
        ia = info.get("ia") or {}
        runs.append(
            {
                "request_id": s.ctx.spec.request_id,
                "steps": ia.get("steps"),
                "stopped": ia.get("stopped"),
                "kept_epoch": ia.get("best_epoch"),
                "seconds": round(wall, 3),
            }
        )
    reapply_pruning(model, pruned)
    seconds = time.perf_counter() - t0
    return model, {"settings": settings[CONTINUATION_METHOD], "runs": runs, "seconds": seconds}


@dataclass
class Accepted:
    """What :func:`accept_round` decided: the model to publish, the ``acceptance`` evidence per
    request id, and the seconds of the continuation and of the exact path (0 when none ran)."""

    model: PeftModel
    evidence: dict[str, dict[str, Any]]
    continuation_s: float = 0.0
    fallback_s: float = 0.0


#: the exact path of a round whose update failed its check: (the model, the last request's context)
#: → (the model to publish, its seconds)
ExactPath = Callable[[PeftModel, RequestContext], tuple[PeftModel, float]]


def retrain_exact_path(model: PeftModel, ctx: RequestContext) -> tuple[PeftModel, float]:
    """The exact path: ``retrain`` of the adapter on ``ctx``'s retain set."""
    model, _, _, seconds = apply_method("retrain", model, ctx)
    return model, seconds


def accept_round(
    inputs: EngineInputs,
    round_input: torch.nn.Module,
    model: PeftModel,
    staged: list[StageResult],
    cfg: acceptance.AcceptanceConfig,
    method: str,
    pruned: Sequence[int],
    progress: Callable[[str], None],
    exact_path: ExactPath = retrain_exact_path,
) -> Accepted:
    """The acceptance check of every request of the round on the model the round publishes. On a
    failure of forget bounds alone, the continuation (``acceptance.continue_steps``) goes on with
    the interference-aware stage for the failing requests; if a check still fails, the exact path
    (``retrain`` on the round's final retain set, which excludes every request of the round and
    every earlier one) replaces the update, and is checked in turn. ``pruned``: every subset-ID
    output the round's final state suppresses. ``exact_path``: how the exact path is computed
    (``lethe bench --served`` passes its second retrain: the round's own retrain would be the
    bench's scoring reference, ``bench.quality``)."""
    work = [s for s in staged if not s.nothing_left]
    if not cfg.enabled or not work:
        reason = "disabled (settings.acceptance.enabled is false)" if not cfg.enabled else "nothing to forget"
        return Accepted(model, {s.ctx.spec.request_id: {"checked": False, "reason": reason} for s in staged})
    progress("acceptance check")
    reused = before_outputs_of(staged)  # the round input's outputs, not forwarded again
    # one per request, shared by every check of the request
    allowances = {
        s.ctx.spec.request_id: ReferenceAllowance(s.ctx) for s in work if s.ctx.references is not None
    }

    def checked(after: torch.nn.Module) -> dict[str, list[acceptance.Check]]:
        out = {}
        for s in work:
            rid = s.ctx.spec.request_id
            out[rid] = check_request(round_input, after, s.ctx, cfg, reused.get(rid), allowances.get(rid))
        return out

    def all_passed(checks: Mapping[str, list[acceptance.Check]]) -> bool:
        return all(c.ok for cs in checks.values() for c in cs)

    first = checked(model)
    path, final, continued, continuation = method, first, None, None
    extra = continuation_settings(inputs.settings, method, cfg.continue_steps, cfg.forget_z)
    every = [c for cs in first.values() for c in cs]
    if not all_passed(first) and extra is not None and acceptance.only_forget_bounds_failed(every):
        progress("acceptance check failed on forget bounds: continuing the interference-aware stage")
        failing = {rid for rid, cs in first.items() if not all(c.ok for c in cs)}
        model, continuation = _continue_update(inputs, model, staged, failing, extra, method, pruned)
        continued = checked(model)
        path, final = f"{method}+continuation", continued
    fallback_s = 0.0
    if not all_passed(final) and cfg.fallback == "retrain" and method != "retrain":
        progress("acceptance check failed: falling back to retrain (the exact path)")
        model, fallback_s = exact_path(model, work[-1].ctx)
        path = "retrain"
        final = checked(model)
    out: dict[str, dict[str, Any]] = {}
    for s in staged:
        rid = s.ctx.spec.request_id
        if rid not in final:
            out[rid] = {"checked": False, "reason": "nothing to forget"}
            continue
        ok = all(c.ok for c in final[rid])
        entry: dict[str, Any] = {
            "checked": True,
            "passed": ok,
            "path": path,
            "config": cfg.to_json(),
            "checks": [c.to_json() for c in final[rid]],
        }
        computed = allowances[rid].values if rid in allowances else None
        if computed is not None:  # a forget bound failed once: what the references allowed
            entry["reference_allowance"] = computed
        if path != method:
            entry["method_checks"] = [c.to_json() for c in first[rid]]
        if continuation is not None and continued is not None:
            entry["continuation"] = {**continuation, "checks": [c.to_json() for c in continued[rid]]}
        if path == "retrain":
            entry["reason"] = f"{method}'s update failed the acceptance check; the round published a retrain"
        elif continuation is not None:
            entry["reason"] = (
                f"{method}'s update failed a forget bound; the round published it continued "
                "(the interference-aware stage until the forget set was at the unseen-data level)"
            )
        if not ok:
            entry["warning"] = (
                "the published model fails this check"
                + (" even after the exact path (retrain)" if path == "retrain" else "")
                + ": see the failed checks"
            )
        out[rid] = entry
    seconds = 0.0 if continuation is None else float(continuation["seconds"])
    return Accepted(model, out, continuation_s=seconds, fallback_s=fallback_s)


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
    state_in: Path | None = None,
    on_stage: StageCallback | None = None,
    references_dir: Path | None = None,
    defer_next_importance: bool = False,
) -> RoundOutcome:
    """One unlearning round: the requests in order (one stage each), the acceptance check of the
    model to publish (with the exact path as fallback), the audit of every request on it; writes
    ``adapter_out``.

    ``defer_next_importance``: the next request's full-data importance of the published model is
    not computed in the round but returned as ``RoundOutcome.next_importance``, for the caller to
    run after publishing (on scenes it is 16–21 s of a 70 s round, docs/benchmarks.md).

    ``state_in``: the RoundState file of ``adapter_in`` when it is kept elsewhere (the worker keeps
    it out of served directories); default ``adapter_in/unlearning_state.json``.
    ``on_stage``: where the round is (``worker.unlearning.progress``), for the worker to record.
    ``references_dir``: the likelihood-ratio audit's reference adapters, if trained (read only: a
    round never trains one)."""
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
        references_dir=references_dir,
    )
    accept_cfg = acceptance.AcceptanceConfig.from_settings(inputs.settings.get("acceptance"))
    state = RoundState.load(Path(adapter_in)) if state_in is None else RoundState.load_file(Path(state_in))
    model = load_adapter(inputs.base, Path(adapter_in), trainable=True, device=device)
    reapply_pruning(model, state.pruned_subset_outputs)
    round_input = copy.deepcopy(model).eval()  # the published version this round replaces
    # the cached full-data importance belongs to adapter_in's weights (the state records the key;
    # the digest is recomputed so that a mismatch can never reuse a stale cache)
    cache_key: str | None = weights_digest(model)
    timings: dict[str, float] = {}
    n = len(requests)
    staged: list[StageResult] = []

    def round_progress(message: str) -> None:
        if on_progress is not None:
            on_progress(n, n, message)

    def stage_progress(stage: str, step: int = 0, of: int = 0) -> None:
        if on_stage is not None:
            on_stage(stage, step, of)

    for stage, spec in enumerate(requests, start=1):

        def progress(message: str, _stage: int = stage, _id: str = spec.request_id) -> None:
            if on_progress is not None:
                on_progress(_stage - 1, n, f"request {_id}: {message}")

        stage_progress(PARTITIONS, stage, n)
        # the last request's next I_D is computed after the acceptance check, on the model the
        # round publishes
        model, done = run_stage(
            inputs,
            model,
            spec,
            state,
            method=method,
            stage=stage,
            cache_key=cache_key,
            precompute_next=stage < n,
            on_progress=progress,
            on_stage=on_stage,
        )
        cache_key = done.next_cache_key
        staged.append(done)
        timings[spec.request_id] = done.timings["method_s"]
        if on_progress is not None:
            on_progress(stage, n, f"request {spec.request_id}: updated")

    stage_progress(ACCEPTANCE)
    decided = accept_round(
        inputs, round_input, model, staged, accept_cfg, method, state.pruned_subset_outputs, round_progress
    )
    model, accepted = decided.model, decided.evidence
    next_importance: Callable[[], float] | None = None
    if staged and not staged[-1].nothing_left:
        if defer_next_importance:
            last_ctx, published = staged[-1].ctx, model

            def next_importance() -> float:
                return precompute_next_importance(published, last_ctx, method)[1]

        else:
            _, staged[-1].timings["importance_precompute_s"] = precompute_next_importance(
                model, staged[-1].ctx, method
            )
    round_progress("audit")
    evidence: dict[str, dict[str, Any]] = {}
    for position, s in enumerate(staged, start=1):
        stage_progress(AUDIT, position, n)
        s.timings["acceptance_continuation_s"] = decided.continuation_s
        s.timings["acceptance_fallback_s"] = decided.fallback_s
        ev = request_evidence(
            model,
            s.ctx,
            method=method,
            method_info=s.info,
            reference=None,
            original=s.original,
            pruned=s.pruned,
            timings=s.timings,
            references=inputs.references,
        )
        ev["acceptance"] = accepted[s.ctx.spec.request_id]
        evidence[s.ctx.spec.request_id] = ev
    if next_importance is not None:
        evidence[staged[-1].ctx.spec.request_id]["next_importance"] = "computed after publishing"
    state.version += 1
    save_adapter(model, Path(adapter_out))
    # the key the next round's full-data importance is cached under: this version's weights digest
    state.importance_cache_key = weights_digest(model)
    state.save(Path(adapter_out))
    return RoundOutcome(evidence=evidence, state=state, timings=timings, next_importance=next_importance)
