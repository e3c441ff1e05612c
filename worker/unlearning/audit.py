"""Audit evidence of one forget request: task metrics, membership inference, UIS.

- Per task and split (``ret`` retained instances, ``unl`` forgotten instances, ``val`` held out) the
  task metric.
- Loss-based MIA (interference paper App. C.1.4): score = −per-sample task loss, ROC-AUC of
  members vs held-out non-members; ``unl``-vs-``val`` is the headline (``mia_auc``), ``ret``-vs-``val``
  is recorded (``mia_auc_ret``), with the average precision of the headline attack (``mia_ap``).
- The logistic-regression attacker of the subset-wise paper §5: features = the concatenated
  softmaxes of every head (main tasks, then the subset-ID head), forget instances labelled 1,
  retained instances 0, ``class_weight="balanced"``, 5-fold ``StratifiedKFold``, accuracy of the
  cross-validated predictions. (The public code passes ``multi_class=``, which current
  scikit-learn rejects; with two classes lbfgs fits the same model without it.)
- Forget vs unseen (UNLEARNING.md "Audit evidence", no retrain): per forgotten task the loss-MIA
  AUC of the forgotten samples against unseen-population data (``val`` unless the caller passes
  other unseen data), a seeded bootstrap confidence interval (members and non-members resampled
  apart, percentile interval), and each forgotten sample's *exposure* — the share of unseen samples
  whose loss is higher than its own (ties one half); the AUC is the mean exposure. Only the
  ``exposed_top`` most exposed samples (id, loss, exposure) are kept in the evidence, not every score.
- UIS (interference paper Eqs. 30–31) only against a real retrain reference: forgotten tasks are
  compared with the retrain reference, retained tasks with the original model; otherwise ``None``
  with the reason.

Everything returned is a dataclass with ``to_json()`` (NaN becomes ``null``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from pydantic import dataclasses as pydantic_dataclasses
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from torch import Tensor, nn

from worker.unlearning.config import SETTINGS, BatchSize, Count, parse_settings, setting_keys
from worker.unlearning.grads import eval_mode
from worker.unlearning.types import (
    SUBSET_HEAD,
    Batch,
    Partitions,
    TaskSpec,
    cat_inputs,
    concat_batches,
    input_rows,
    inputs_to,
    is_supervised,
    num_rows,
)

UIS_TERMS = ("ret", "unl", "val", "mia")


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class AuditConfig:
    """Audit settings (``settings["audit"]``; keys the audit does not own are ignored)."""

    attacker_folds: Annotated[int, Field(ge=2, le=100)] = 5  # cross-validation folds
    attacker_max_retain: BatchSize = 2000  # retained rows the attacker sees at most (seeded subsample)
    attacker_max_iter: BatchSize = 1000
    # smallest |reference| a UIS term divides by (reference metric 0)
    uis_floor: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    batch_size: BatchSize = 1024
    bootstrap: Count = 200  # resamples of the forget-vs-unseen AUC's confidence interval (0: none)
    ci_level: Annotated[float, Field(gt=0, lt=1)] = 0.95
    exposed_top: Count = 20  # most exposed forgotten samples kept per task in the evidence
    # likelihood-ratio audit: reference adapters trained at preparation on halves of the clients
    # (even; 0 = off, then the evidence has no ``likelihood_ratio``); see reference_adapters.py
    reference_adapters: int = Field(default=0, ge=0, le=64, multiple_of=2)
    # each client's IN references trained without one task's labels for it (the per-task request's
    # task-withheld calibration, ``ia.per_task_target``; reference_adapters.assign_withheld)
    reference_withhold_tasks: bool = False
    # how many of a client's IN references withhold each task (their first T·this; T tasks): one
    # task-withheld reference per (client, task) is as noisy as one reference (docs/benchmarks.md,
    # "The targets' error, split"); IN references beyond T·this see every label of the client
    reference_withheld_per_task: Annotated[int, Field(ge=1, le=32)] = 1
    # each client's share of IN references (deviation from LiRA's halves; reference_adapters.in_count:
    # round(K·share), clamped so that each client has at least one IN and one OUT reference)
    reference_in_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # the Ret split's rows the evidence measures (Ret metrics, ``mia_auc_ret``; the logistic attacker
    # draws its retained rows from them): a seeded subset of at most this many, the same rows for
    # the model before the request (``original_metrics``) and after; 0 = all. 2,000 rows: an
    # accuracy's SE ≤ 0.011; on scenes Ret (9,200 rows) was forwarded twice a request
    ret_rows: Count = 2000

    def reference_withheld_tasks(self, tasks: Sequence[TaskSpec]) -> list[str]:
        """The tasks whose labels each client's IN references are trained without
        (``reference_adapters.train_references``' ``withhold_tasks``): all of them with
        ``reference_withhold_tasks``, else none. Each task is named
        ``reference_withheld_per_task`` times in turn, so that the client's ``j``-th IN reference
        withholds the ``j mod T``-th (:func:`reference_adapters.assign_withheld` cycles the list)."""
        if not self.reference_withhold_tasks:
            return []
        return [t.name for t in tasks] * self.reference_withheld_per_task

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> AuditConfig:
        audit = dict((settings or {}).get("audit", {}) or {})
        keys = setting_keys(cls)
        return parse_settings(cls, {k: v for k, v in audit.items() if k in keys}, "audit")


# ----------------------------------------------------------------------------------------------
# evidence types
# ----------------------------------------------------------------------------------------------


def _num(value: float | None) -> float | None:
    # JSON (and PostgreSQL's jsonb) has no NaN or infinity: an undefined metric is null.
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class TaskMetrics:
    """One task's metrics on the three splits and its loss-based MIA."""

    ret: float | None
    unl: float | None
    val: float | None
    mia_auc: float | None  # unl-vs-val ROC-AUC (headline)
    mia_auc_ret: float | None  # ret-vs-val ROC-AUC
    mia_ap: float | None  # unl-vs-val average precision
    n_ret: int = 0
    n_unl: int = 0
    n_val: int = 0

    def value(self, term: str) -> float | None:
        """The UIS term ``term`` (``ret``, ``unl``, ``val``, ``mia``)."""
        return _num(self.mia_auc if term == "mia" else getattr(self, term))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _jsonable(asdict(self))
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskMetrics:
        def f(key: str) -> float | None:
            v = data.get(key)
            return None if v is None else float(v)

        return cls(
            ret=f("ret"),
            unl=f("unl"),
            val=f("val"),
            mia_auc=f("mia_auc"),
            mia_auc_ret=f("mia_auc_ret"),
            mia_ap=f("mia_ap"),
            n_ret=int(data.get("n_ret", 0)),
            n_unl=int(data.get("n_unl", 0)),
            n_val=int(data.get("n_val", 0)),
        )


@dataclass
class ModelMetrics:
    """:class:`TaskMetrics` per task of one model (the method's, the original's or the retrain's)."""

    tasks: dict[str, TaskMetrics]

    def to_json(self) -> dict[str, Any]:
        return {name: m.to_json() for name, m in self.tasks.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelMetrics:
        return cls(tasks={str(k): TaskMetrics.from_json(v) for k, v in data.items()})


@dataclass
class AttackerResult:
    """The logistic-regression attacker (forget = 1 vs retain = 0), cross-validated accuracy."""

    accuracy: float | None
    folds: int
    n_forget: int
    n_retain: int
    features: list[str]
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _jsonable(asdict(self))
        return out


@dataclass
class UISResult:
    """UIS (Eqs. 30–31) or ``None`` with the reason; per task its reference and terms."""

    value: float | None
    reference: str | None  # name of the retrain reference used, None when UIS is not reported
    reason: str | None
    per_task: dict[str, float | None] = field(default_factory=dict)
    task_reference: dict[str, str] = field(default_factory=dict)  # task -> "retrain" | "original"
    terms: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _jsonable(asdict(self))
        return out


@dataclass
class ExposedSample:
    """One forgotten sample's loss and exposure (share of unseen samples with a higher loss)."""

    sample_id: str
    loss: float
    exposure: float


@dataclass
class ForgetVsUnseen:
    """The headline attack of one forgotten task, with its uncertainty and its worst samples."""

    auc: float | None
    ci_low: float | None
    ci_high: float | None
    level: float
    resamples: int
    seed: int
    n_forget: int
    n_unseen: int
    most_exposed: list[ExposedSample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _jsonable(asdict(self))
        return out


@dataclass
class AuditEvidence:
    """The audit of one request: per task metrics (method), attacker, UIS and the references."""

    tasks: dict[str, TaskMetrics]
    forget_tasks: list[str]
    retain_tasks: list[str]
    attacker: AttackerResult
    uis: UISResult
    reference: str | None  # which retrain reference UIS used (None: none given)
    reference_metrics: ModelMetrics | None = None
    original_metrics: ModelMetrics | None = None
    forget_vs_unseen: dict[str, ForgetVsUnseen] = field(default_factory=dict)

    @property
    def mia_auc(self) -> dict[str, float | None]:
        """Headline unl-vs-val AUC per forgotten task."""
        return {t: self.tasks[t].mia_auc for t in self.forget_tasks if t in self.tasks}

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": {name: m.to_json() for name, m in self.tasks.items()},
            "forget_tasks": list(self.forget_tasks),
            "retain_tasks": list(self.retain_tasks),
            "mia": {
                "kind": "loss",
                "score": "-per_sample_loss",
                "headline": "unl_vs_val",
                "unl_vs_val": _jsonable(self.mia_auc),
                "forget_vs_unseen": {t: r.to_json() for t, r in self.forget_vs_unseen.items()},
            },
            "attacker": self.attacker.to_json(),
            "uis": self.uis.to_json(),
            "reference": self.reference,
            "reference_metrics": None if self.reference_metrics is None else self.reference_metrics.to_json(),
            "original_metrics": None if self.original_metrics is None else self.original_metrics.to_json(),
        }


# ----------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------


def loss_mia_auc(member_losses: Tensor, nonmember_losses: Tensor) -> float | None:
    """ROC-AUC of the loss attack: score = −loss, members = 1. ``None`` if a side is empty.

    The Mann–Whitney form (ties count one half), equal to ``sklearn.metrics.roc_auc_score`` and
    without its per-call validation cost (early stopping calls it every epoch).
    """
    m = member_losses.detach().double().cpu().reshape(-1)
    n = nonmember_losses.detach().double().cpu().reshape(-1)
    n_m, n_n = int(m.numel()), int(n.numel())
    if n_m == 0 or n_n == 0:
        return None
    score = -torch.cat([m, n])
    ranks = _average_ranks(score)
    u = float(ranks[:n_m].sum()) - n_m * (n_m + 1) / 2.0
    return u / (n_m * n_n)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values`` with ties given their average rank (vectorised)."""
    sorted_vals, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_vals, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # last 1-based rank of each tie group
    avg = ends - (counts.to(torch.float64) - 1.0) / 2.0
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def sample_exposure(member_losses: Tensor, nonmember_losses: Tensor) -> Tensor:
    """Per member: the share of non-members whose loss is higher (ties count one half) — its own
    ROC-AUC against the non-members; the mean over members is :func:`loss_mia_auc`."""
    m = member_losses.detach().double().cpu().reshape(-1)
    n = torch.sort(nonmember_losses.detach().double().cpu().reshape(-1)).values
    if m.numel() == 0 or n.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    below_or_equal = torch.searchsorted(n, m, right=True)
    below = torch.searchsorted(n, m, right=False)
    higher = n.numel() - below_or_equal
    ties = below_or_equal - below
    return (higher.double() + 0.5 * ties.double()) / n.numel()


def bootstrap_auc_ci(
    member_losses: Tensor, nonmember_losses: Tensor, *, resamples: int, level: float, seed: int
) -> tuple[float | None, float | None]:
    """Percentile confidence interval of :func:`loss_mia_auc`: members and non-members are resampled
    with replacement apart (their sizes kept), ``resamples`` times from a generator seeded with
    ``seed``. ``(None, None)`` when a side is empty or ``resamples`` is 0.

    Vectorised (a loop of ``loss_mia_auc`` calls took ~0.5 s for 200 resamples of 2,000 unseen
    samples): a resample is a count per original sample, and its AUC is
    ``Σ_j c_j·(#resampled non-members above m_j + ½ #tied) / (n_m·n_n)`` read from cumulative counts
    of the sorted non-members."""
    m = member_losses.detach().double().cpu().reshape(-1)
    n = nonmember_losses.detach().double().cpu().reshape(-1)
    n_m, n_n = int(m.numel()), int(n.numel())
    if n_m == 0 or n_n == 0 or resamples <= 0:
        return None, None
    n_sorted, order = torch.sort(n)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_n)
    lo = torch.searchsorted(n_sorted, m, right=False)  # sorted non-members below m_j
    hi = torch.searchsorted(n_sorted, m, right=True)  # ... at or below m_j
    gen = torch.Generator().manual_seed(seed)
    values: list[Tensor] = []
    chunk = max(1, 4_000_000 // max(n_n, n_m))  # bound the [resamples, n] count matrices
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        mi = torch.randint(0, n_m, (b, n_m), generator=gen)
        ni = torch.randint(0, n_n, (b, n_n), generator=gen)
        c_m = torch.zeros(b, n_m, dtype=torch.float64).scatter_add_(
            1, mi, torch.ones(b, n_m, dtype=torch.float64)
        )
        c_n = torch.zeros(b, n_n, dtype=torch.float64).scatter_add_(
            1, rank[ni], torch.ones(b, n_n, dtype=torch.float64)
        )
        cum = torch.cat([torch.zeros(b, 1, dtype=torch.float64), torch.cumsum(c_n, 1)], 1)
        above = n_n - cum[:, hi]
        tied = cum[:, hi] - cum[:, lo]
        values.append((c_m * (above + 0.5 * tied)).sum(1) / (n_m * n_n))
    tail = (1.0 - level) / 2.0
    qs = torch.quantile(torch.cat(values), torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(qs[0]), float(qs[1])


def forget_vs_unseen(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    *,
    forget: Batch,
    unseen: Batch,
    forget_tasks: Sequence[str],
    cfg: AuditConfig,
    seed: int = 0,
    device: str = "cpu",
    outputs: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
) -> dict[str, ForgetVsUnseen]:
    """Per forgotten task supervised in ``forget``: AUC, bootstrap CI and the most exposed samples
    (``forget`` = the Unl split with sample ids; ``unseen`` = data of the same population the model
    never trained on). ``outputs``: ``model``'s outputs on ``forget`` and ``unseen`` if the caller
    has them (the audit reuses its own forward passes)."""
    if len(forget) == 0 or len(unseen) == 0:
        return {}
    if outputs is not None:
        out_f, out_u = outputs
    else:
        out_f = model_outputs(model, inputs_to(forget.inputs, device), batch_size=cfg.batch_size)
        out_u = model_outputs(model, inputs_to(unseen.inputs, device), batch_size=cfg.batch_size)
    ids = forget.sample_ids if len(forget.sample_ids) == len(forget) else [str(i) for i in range(len(forget))]
    result: dict[str, ForgetVsUnseen] = {}
    for i, task in enumerate(tasks):
        if task.name not in forget_tasks or task.name not in forget.labels or task.name not in unseen.labels:
            continue
        y_f = forget.labels[task.name].to(device)
        supervised = is_supervised(y_f).cpu()
        if not bool(supervised.any()):
            continue
        member = _task_losses(task, out_f[task.name], y_f).cpu()
        other = _task_losses(task, out_u[task.name], unseen.labels[task.name].to(device)).cpu()
        exposure = sample_exposure(member, other)
        task_ids = [s for s, keep in zip(ids, supervised.tolist(), strict=True) if keep]
        # most exposed first; ties by lower loss, then by id, so the list is deterministic
        order = sorted(
            range(len(task_ids)), key=lambda j: (-float(exposure[j]), float(member[j]), task_ids[j])
        )
        top = [
            ExposedSample(sample_id=task_ids[j], loss=float(member[j]), exposure=float(exposure[j]))
            for j in order[: max(0, cfg.exposed_top)]
        ]
        low, high = bootstrap_auc_ci(
            member, other, resamples=cfg.bootstrap, level=cfg.ci_level, seed=seed * 1000 + i
        )
        result[task.name] = ForgetVsUnseen(
            auc=loss_mia_auc(member, other),
            ci_low=low,
            ci_high=high,
            level=cfg.ci_level,
            resamples=cfg.bootstrap,
            seed=seed * 1000 + i,
            n_forget=int(member.numel()),
            n_unseen=int(other.numel()),
            most_exposed=top,
        )
    return result


def loss_mia_ap(member_losses: Tensor, nonmember_losses: Tensor) -> float | None:
    """Average precision of the loss attack (members positive). ``None`` if a side is empty."""
    m = member_losses.detach().double().cpu().reshape(-1)
    n = nonmember_losses.detach().double().cpu().reshape(-1)
    if m.numel() == 0 or n.numel() == 0:
        return None
    y = np.concatenate([np.ones(m.numel()), np.zeros(n.numel())])
    score = -np.concatenate([m.numpy(), n.numpy()])
    return float(average_precision_score(y, score))


def logistic_attack(
    forget_features: np.ndarray,
    retain_features: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 1000,
    feature_names: Sequence[str] = (),
) -> AttackerResult:
    """Cross-validated accuracy of a balanced logistic regression telling forget (1) from retain (0)."""
    n_f, n_r = int(forget_features.shape[0]), int(retain_features.shape[0])
    k = min(folds, n_f, n_r)
    names = list(feature_names)
    if k < 2:
        return AttackerResult(None, k, n_f, n_r, names, reason="fewer than 2 samples in a class")
    X = np.nan_to_num(np.concatenate([forget_features, retain_features]).astype(np.float64))
    y = np.concatenate([np.ones(n_f, dtype=np.int64), np.zeros(n_r, dtype=np.int64)])
    clf = LogisticRegression(class_weight="balanced", max_iter=max_iter)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        pred = cross_val_predict(clf, X, y, cv=cv)
    reason = None if k == folds else f"{k} folds (a class has fewer than {folds} samples)"
    return AttackerResult(float(accuracy_score(y, pred)), k, n_f, n_r, names, reason=reason)


def _relative(value: float | None, ref: float | None, floor: float) -> float | None:
    if value is None or ref is None:
        return None
    return abs(value - ref) / max(abs(ref), floor)


def unlearning_impact_score(
    metrics: ModelMetrics,
    *,
    forget_tasks: Sequence[str],
    reference: ModelMetrics | None,
    original: ModelMetrics | None,
    reference_name: str = "retrain",
    floor: float = 1e-3,
) -> UISResult:
    """UIS (Eqs. 30–31): mean over tasks of Σ_{ret,unl,val,mia} |s − s̄| / s̄.

    s̄ is the retrain reference's metric for forgotten tasks and the original model's for retained
    tasks. A term whose value is missing on either side (e.g. no samples) is left out of its task's
    sum and listed as ``None`` in ``terms``; s̄ is floored at ``floor`` in the denominator. Returns
    ``value=None`` with the reason when no retrain reference is given, when a retained task has no
    original metrics, or when a task has no term at all.
    """
    task_names = list(metrics.tasks)
    if reference is None:
        return UISResult(None, None, "no retrain reference given: UIS is only reported against one")
    per_task: dict[str, float | None] = {}
    task_ref: dict[str, str] = {}
    terms: dict[str, dict[str, float | None]] = {}
    for t in task_names:
        if t in forget_tasks:
            ref_model, ref_name = reference, "retrain"
        else:
            if original is None:
                return UISResult(None, None, f"retained task {t!r} needs the original model's metrics")
            ref_model, ref_name = original, "original"
        if t not in ref_model.tasks:
            return UISResult(None, None, f"the {ref_name} metrics lack task {t!r}")
        task_ref[t] = ref_name
        mine, ref = metrics.tasks[t], ref_model.tasks[t]
        terms[t] = {k: _relative(mine.value(k), ref.value(k), floor) for k in UIS_TERMS}
        present = [v for v in terms[t].values() if v is not None]
        per_task[t] = float(sum(present)) if present else None
    missing = [t for t, v in per_task.items() if v is None]
    if missing or not per_task:
        return UISResult(None, None, f"no comparable metric for tasks {missing}", per_task, task_ref, terms)
    value = float(sum(v for v in per_task.values() if v is not None) / len(per_task))
    return UISResult(value, reference_name, None, per_task, task_ref, terms)


# ----------------------------------------------------------------------------------------------
# model evaluation
# ----------------------------------------------------------------------------------------------


def model_outputs(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    batch_size: int = 1024,
    forward: Callable[[dict[str, Tensor]], Mapping[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """``model(inputs)`` in eval mode without gradients, in chunks (training mode restored after).
    ``forward``: a function computing the same outputs (``lora.fast_forward(model)``)."""
    fn = forward if forward is not None else model
    chunks: list[dict[str, Tensor]] = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, max(num_rows(inputs), 1), batch_size):
            part = input_rows(inputs, start, start + batch_size)
            if num_rows(part) == 0 and chunks:
                break
            chunks.append({k: v.detach() for k, v in fn(part).items()})
    if len(chunks) == 1:
        return chunks[0]
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def _task_losses(task: TaskSpec, out: Tensor, target: Tensor) -> Tensor:
    supervised = is_supervised(target)
    return task.per_sample_loss(out, target)[supervised]


def _metric(task: TaskSpec, out: Tensor, target: Tensor) -> float | None:
    if not bool(is_supervised(target).any()):
        return None
    return _num(task.metric(out, target))


def evaluate_model(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    *,
    ret: Batch,
    unl: Batch,
    val: Batch,
    device: str = "cpu",
    batch_size: int = 1024,
) -> ModelMetrics:
    """Task metric per split and the loss-based MIA AUCs of every task."""
    outs = split_outputs(model, ret=ret, unl=unl, val=val, device=device, batch_size=batch_size)
    return metrics_from_outputs(outs, tasks, ret=ret, unl=unl, val=val, device=device)


SplitOutputs = dict[str, dict[str, Tensor] | None]


def split_outputs(
    model: nn.Module, *, ret: Batch, unl: Batch, val: Batch, device: str = "cpu", batch_size: int = 1024
) -> SplitOutputs:
    """``model``'s outputs on the Ret / Unl / Val splits (``None`` for an empty split): one
    forward pass per row, which the audit's metrics, attacker and forget-vs-unseen AUC share."""
    return {
        split: model_outputs(model, inputs_to(b.inputs, device), batch_size=batch_size) if len(b) else None
        for split, b in (("ret", ret), ("unl", unl), ("val", val))
    }


def metrics_from_outputs(
    outs: SplitOutputs, tasks: Sequence[TaskSpec], *, ret: Batch, unl: Batch, val: Batch, device: str = "cpu"
) -> ModelMetrics:
    """:func:`evaluate_model` from outputs already computed (:func:`split_outputs`)."""
    batches = {"ret": ret, "unl": unl, "val": val}
    result: dict[str, TaskMetrics] = {}
    for task in tasks:
        metric: dict[str, float | None] = {}
        losses: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for split, b in batches.items():
            out = outs[split]
            if out is None or task.name not in b.labels:
                metric[split], losses[split], counts[split] = None, torch.zeros(0), 0
                continue
            y = b.labels[task.name].to(device)
            metric[split] = _metric(task, out[task.name], y)
            losses[split] = _task_losses(task, out[task.name], y)
            counts[split] = int(losses[split].numel())
        result[task.name] = TaskMetrics(
            ret=metric["ret"],
            unl=metric["unl"],
            val=metric["val"],
            mia_auc=loss_mia_auc(losses["unl"], losses["val"]),
            mia_auc_ret=loss_mia_auc(losses["ret"], losses["val"]),
            mia_ap=loss_mia_ap(losses["unl"], losses["val"]),
            n_ret=counts["ret"],
            n_unl=counts["unl"],
            n_val=counts["val"],
        )
    return ModelMetrics(tasks=result)


def forget_mia(
    model: nn.Module, tasks: Sequence[TaskSpec], forget: Batch, heldout: Batch, *, device: str = "cpu"
) -> dict[str, float]:
    """Unl-vs-val loss-MIA AUC per task supervised in ``forget`` (early stopping uses it)."""
    if len(forget) == 0 or len(heldout) == 0:
        return {}
    out = model_outputs(model, inputs_to(cat_inputs([forget.inputs, heldout.inputs]), device))  # one pass
    n_f = len(forget)
    return mia_from_outputs(
        tasks, {k: v[:n_f] for k, v in out.items()}, forget, {k: v[n_f:] for k, v in out.items()}, heldout
    )


def mia_from_outputs(
    tasks: Sequence[TaskSpec],
    out_forget: Mapping[str, Tensor],
    forget: Batch,
    out_heldout: Mapping[str, Tensor],
    heldout: Batch,
) -> dict[str, float]:
    """:func:`forget_mia` from outputs already computed (``out_*[task]`` aligned with the batches)."""
    aucs: dict[str, float] = {}
    for task in tasks:
        if task.name not in forget.labels or task.name not in heldout.labels:
            continue
        device = out_forget[task.name].device
        auc = loss_mia_auc(
            _task_losses(task, out_forget[task.name], forget.labels[task.name].to(device)),
            _task_losses(task, out_heldout[task.name], heldout.labels[task.name].to(device)),
        )
        if auc is not None:
            aucs[task.name] = auc
    return aucs


def softmax_features(
    model: nn.Module, tasks: Sequence[TaskSpec], inputs: Mapping[str, Tensor], *, batch_size: int = 1024
) -> tuple[np.ndarray, list[str]]:
    """Concatenated head softmaxes (main tasks in order, then the subset-ID head if present); a
    one-output head (a regression) gives its raw output (its softmax would be the constant 1)."""
    return softmax_from_outputs(model_outputs(model, inputs, batch_size=batch_size), tasks)


def softmax_from_outputs(
    out: Mapping[str, Tensor], tasks: Sequence[TaskSpec]
) -> tuple[np.ndarray, list[str]]:
    """:func:`softmax_features` from outputs already computed."""
    keys = [t.name for t in tasks] + ([SUBSET_HEAD] if SUBSET_HEAD in out else [])
    probs = [
        out[k].double() if int(out[k].shape[-1]) == 1 else torch.softmax(out[k].double(), dim=-1)
        for k in keys
    ]
    names = [f"{k}[{i}]" for k, p in zip(keys, probs, strict=True) for i in range(int(p.shape[-1]))]
    return torch.cat(probs, dim=-1).cpu().numpy(), names


def unique_rows(batch: Batch) -> Batch:
    """``batch`` with one row per sample id (first occurrence); unchanged without sample ids."""
    keep = unique_index(batch)
    return batch if keep is None else batch.select(keep)


def unique_index(batch: Batch) -> Tensor | None:
    """The rows of :func:`unique_rows` (``None``: every row, the batch has no sample ids)."""
    if len(batch.sample_ids) != len(batch):
        return None
    seen: set[str] = set()
    keep: list[int] = []
    for i, s in enumerate(batch.sample_ids):
        if s not in seen:
            seen.add(s)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def _merge_labels(y: Tensor, inverse: Tensor, n: int) -> Tensor:
    """Per merged row, the one real label among its rows: the max, as "no label" (IGNORE = -1 /
    NaN as -inf) is below every class index and every real target."""
    if not y.is_floating_point():
        return torch.full((n,), -1, dtype=y.dtype).scatter_reduce(0, inverse, y, reduce="amax")
    low = torch.finfo(y.dtype).min
    filled = torch.nan_to_num(y, nan=low)
    merged = torch.full((n,), low, dtype=y.dtype).scatter_reduce(0, inverse, filled, reduce="amax")
    return torch.where(merged == low, torch.full_like(merged, float("nan")), merged)


def merge_rows(batch: Batch) -> Batch:
    """One row per sample id with every label it has in ``batch`` (rows without ids stay apart)."""
    if len(batch.sample_ids) != len(batch):
        return batch
    first: dict[str, int] = {}
    inverse = torch.tensor([first.setdefault(s, len(first)) for s in batch.sample_ids], dtype=torch.long)
    keep = torch.zeros(len(first), dtype=torch.long).scatter_(
        0, inverse.flip(0), torch.arange(len(batch) - 1, -1, -1, dtype=torch.long)
    )  # the first row of each sample
    labels = {t: _merge_labels(y, inverse, len(first)) for t, y in batch.labels.items()}
    rows = batch.select(keep)
    return Batch(inputs=rows.inputs, labels=labels, subset=rows.subset, sample_ids=rows.sample_ids)


def merge_rows_in_id_order(parts: Sequence[Batch]) -> Batch:
    """``merge_rows(concat_batches(parts))`` with its rows sorted by sample id (what
    ``ssd.canonical_order`` makes of it), each input row copied once.

    Why not the three calls: SSD's full data D is the whole training set and each of them copied
    every input row (36,000 scenes-sized rows: 1.11 s against 0.78 s; ``python -m bench.merge_copy``,
    docs/benchmarks.md, "Reference outputs on clients' samples computed ahead"), while a cached
    importance reads only the ids and labels. Without one id per row it is
    ``concat_batches(parts)``, as the three calls give."""
    if any(len(b.sample_ids) != len(b) for b in parts):
        return concat_batches(parts)
    # ids, labels and subsets in concatenated order (no inputs: those are gathered once below)
    joined = concat_batches(
        [Batch(inputs={}, labels=b.labels, subset=b.subset, sample_ids=b.sample_ids) for b in parts]
    )
    first: dict[str, int] = {}
    inverse = torch.tensor([first.setdefault(s, len(first)) for s in joined.sample_ids], dtype=torch.long)
    keep = torch.zeros(len(first), dtype=torch.long).scatter_(
        0, inverse.flip(0), torch.arange(len(joined) - 1, -1, -1, dtype=torch.long)
    )  # the first row of each sample, in order of first appearance
    unique = list(first)
    order = torch.tensor(sorted(range(len(unique)), key=unique.__getitem__), dtype=torch.long)
    rows = keep[order]  # the concatenated row each output row takes its inputs from
    starts = torch.tensor([0, *np.cumsum([len(b) for b in parts]).tolist()])
    part_of = torch.bucketize(rows, starts[1:], right=True)
    keys = list(parts[0].inputs)
    if any(list(b.inputs) != keys for b in parts):
        raise ValueError("merge_rows_in_id_order needs batches with the same input keys")
    inputs: dict[str, Tensor] = {}
    for key in keys:
        sources = [b.inputs[key] for b in parts]
        dtype = sources[0].dtype
        for s in sources[1:]:
            dtype = torch.promote_types(dtype, s.dtype)
        out = torch.empty((len(rows), *sources[0].shape[1:]), dtype=dtype, device=sources[0].device)
        for p, source in enumerate(sources):
            mine = (part_of == p).nonzero(as_tuple=True)[0]
            out[mine] = source[rows[mine] - starts[p]].to(dtype)
        inputs[key] = out
    labels = {t: _merge_labels(y, inverse, len(unique))[order] for t, y in joined.labels.items()}
    return Batch(
        inputs=inputs,
        labels=labels,
        subset=joined.subset[rows],
        sample_ids=[unique[i] for i in order.tolist()],
    )


def ret_subset(ret: Batch, rows: int, seed: int) -> Batch:
    """The Ret rows the evidence measures (``audit.ret_rows``): a seeded subset of ``rows`` in their
    original order, drawn as the logistic attacker draws its retained rows (so that with
    ``ret_rows == attacker_max_retain`` the attacker sees the rows it saw before); all of them
    when ``rows`` is 0 or not fewer."""
    if rows <= 0 or len(ret) <= rows:
        return ret
    gen = torch.Generator().manual_seed(seed)
    return ret.select(torch.randperm(len(ret), generator=gen)[:rows].sort().values)


def unl_split(partitions: Partitions) -> Batch:
    """The Unl split: the forgotten instances X_f with every label they have (D_f ∪ D_r^task)."""
    parts = [b for b in (partitions.forget, partitions.retain_task) if len(b)]
    return concat_batches(parts) if parts else partitions.forget


# ----------------------------------------------------------------------------------------------
# the audit
# ----------------------------------------------------------------------------------------------


def audit(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    *,
    ret: Batch,
    unl: Batch,
    val: Batch,
    forget_tasks: Sequence[str],
    reference: ModelMetrics | None = None,
    original: ModelMetrics | None = None,
    reference_name: str = "retrain",
    settings: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    unseen: Batch | None = None,
    outputs: SplitOutputs | None = None,
) -> AuditEvidence:
    """Audit ``model`` after one request.

    ``ret``: retained instances (the retain set, all their retained labels); ``unl``: the forgotten
    instances with every label they have (:func:`unl_split`); ``val``: held out; ``unseen``: the
    unseen-population data of the forget-vs-unseen attack (default ``val``).
    ``reference``: the metrics of a *real* retrain on the same retain set (``evaluate_model`` on the
    same splits) — UIS is reported only with it; ``original``: the metrics of the model before the
    request (needed for retained tasks in partial-task requests). ``outputs``: ``model``'s
    :func:`split_outputs` on these splits, if the caller computed them (to share them further).
    """
    cfg = AuditConfig.from_settings(settings)
    # one forward pass per split, shared by the metrics, the attacker and forget-vs-unseen (each
    # ran its own: ≈ 9 % of a default round on scenes, docs/benchmarks.md)
    outs = (
        split_outputs(model, ret=ret, unl=unl, val=val, device=device, batch_size=cfg.batch_size)
        if outputs is None
        else outputs
    )
    metrics = metrics_from_outputs(outs, tasks, ret=ret, unl=unl, val=val, device=device)
    attacker = _attack(model, tasks, unl, ret, cfg, seed=seed, device=device, outputs=outs)
    uis = unlearning_impact_score(
        metrics,
        forget_tasks=forget_tasks,
        reference=reference,
        original=original,
        reference_name=reference_name,
        floor=cfg.uis_floor,
    )
    exposure = forget_vs_unseen(
        model,
        tasks,
        forget=unl,
        unseen=val if unseen is None else unseen,
        forget_tasks=forget_tasks,
        cfg=cfg,
        seed=seed,
        device=device,
        outputs=None
        if unseen is not None or outs["unl"] is None or outs["val"] is None
        else (outs["unl"], outs["val"]),
    )
    return AuditEvidence(
        forget_vs_unseen=exposure,
        tasks=metrics.tasks,
        forget_tasks=[t.name for t in tasks if t.name in forget_tasks],
        retain_tasks=[t.name for t in tasks if t.name not in forget_tasks],
        attacker=attacker,
        uis=uis,
        reference=None if reference is None else reference_name,
        reference_metrics=reference,
        original_metrics=original,
    )


def _attack(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    unl: Batch,
    ret: Batch,
    cfg: AuditConfig,
    *,
    seed: int,
    device: str,
    outputs: SplitOutputs | None = None,
) -> AttackerResult:
    """``outputs``: ``model``'s outputs on ``unl`` and ``ret`` (:func:`split_outputs`); the
    attacker's rows are selected from them instead of forwarded again."""
    f_rows = _all_rows(unl, unique_index(unl))
    r_rows = _all_rows(ret, unique_index(ret))
    if int(r_rows.numel()) > cfg.attacker_max_retain:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(int(r_rows.numel()), generator=gen)[: cfg.attacker_max_retain].sort().values
        r_rows = r_rows[idx]
    n_f, n_r = int(f_rows.numel()), int(r_rows.numel())
    if n_f == 0 or n_r == 0:
        return AttackerResult(None, 0, n_f, n_r, [], reason="empty forget or retain set")
    out_f = None if outputs is None else outputs.get("unl")
    out_r = None if outputs is None else outputs.get("ret")
    if out_f is not None and out_r is not None:
        f_feat, names = softmax_from_outputs({k: v[f_rows.to(v.device)] for k, v in out_f.items()}, tasks)
        r_feat, _ = softmax_from_outputs({k: v[r_rows.to(v.device)] for k, v in out_r.items()}, tasks)
    else:
        forget, retain = unl.select(f_rows), ret.select(r_rows)
        f_feat, names = softmax_features(
            model, tasks, inputs_to(forget.inputs, device), batch_size=cfg.batch_size
        )
        r_feat, _ = softmax_features(
            model, tasks, inputs_to(retain.inputs, device), batch_size=cfg.batch_size
        )
    return logistic_attack(
        f_feat,
        r_feat,
        folds=cfg.attacker_folds,
        seed=seed,
        max_iter=cfg.attacker_max_iter,
        feature_names=names,
    )


def _all_rows(batch: Batch, index: Tensor | None) -> Tensor:
    return torch.arange(len(batch), dtype=torch.long) if index is None else index
