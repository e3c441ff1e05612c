"""The retain check of early stopping: which rows, and each task's accuracy on them.

Deviation (docs/methods.md): early stopping keeps only checkpoints whose accuracy on these rows
dropped by at most ``IAConfig.retain_tolerance`` from the pre-request model — plus, with
``IAConfig.retain_noise_z``, that many standard errors of each task's paired change over the rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from worker.unlearning.acceptance import paired_standard_error
from worker.unlearning.audit import merge_rows, model_outputs
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.partitions import id_mask
from worker.unlearning.types import Batch, Partitions, TaskSpec, concat_batches


def retain_check(
    partitions: Partitions, *, size: int, seed: int, retain: Batch | None = None, rows: str = "anchor"
) -> Batch:
    """The rows the retain tolerance is checked on, one row per sample with all its retained
    labels: retained instances (a seeded subset of at most ``size`` per source; ``size = 0``: no
    rows at all), then every row of D_r^task (X_f's kept tasks: what a per-task request promises
    to keep). :func:`retain_accuracy` measures each source on its own.

    ``rows``: where the retained instances come from — ``"anchor"``: the retain partitions over the
    anchor (D_r^clean, D_r^inst), which the update trains on; ``"outside_anchor"``: the rows of
    ``retain`` (the full retain set) outside the anchor and X_f, which it does not train on (damage
    there is what the retain term did not repair, e.g. a task's generalisation); ``"both"``: both
    (docs/methods.md has all three measured)."""
    empty = partitions.forget.select(torch.zeros(0, dtype=torch.long))
    if size == 0:
        return empty
    gen = torch.Generator().manual_seed(seed)

    def subset(batch: Batch) -> Batch:
        if len(batch) <= size:
            return batch
        return batch.select(torch.randperm(len(batch), generator=gen)[:size].sort().values)

    sources: list[Batch] = []
    if rows in ("anchor", "both"):
        parts = [b for b in (partitions.retain_clean, partitions.retain_inst) if len(b)]
        sources.append(subset(merge_rows(concat_batches(parts))) if parts else empty)
    if rows in ("outside_anchor", "both"):
        if retain is None:
            raise ValueError(f"retain_check(rows={rows!r}) needs the retain set")
        seen = {*partitions.anchor_sample_ids, *partitions.forget.sample_ids}
        sources.append(subset(retain.select(~id_mask(retain.sample_ids, seen))))
    if len(partitions.retain_task):
        sources.append(merge_rows(partitions.retain_task))
    return concat_batches(sources)


KEPT_OF_FORGOTTEN = " (kept tasks of X_f)"
OUTSIDE_ANCHOR = " (outside the anchor)"


@dataclass(frozen=True)
class RetainLevel:
    """A model on the :func:`retain_check` rows: each task's metric on each source (the keys of
    :func:`retain_accuracy`) and, for the tasks with a ``per_sample_metric``, the per-row scores
    behind it (the same rows in the same order at every checkpoint of a request): what the retain
    gate's noise term (``ia.retain_noise_z``) pairs."""

    accuracy: dict[str, float]
    rows: dict[str, Tensor] = field(default_factory=dict)


def _sources(check: Batch, forget_ids: Sequence[str], anchor_ids: Sequence[str] | None) -> dict[str, Tensor]:
    """The row masks of the check's sources, by the suffix their keys carry."""
    device = check.device
    on_xf = id_mask(check.sample_ids, forget_ids).to(device)
    if anchor_ids is None:
        return {"": ~on_xf, KEPT_OF_FORGOTTEN: on_xf}
    in_anchor = id_mask(check.sample_ids, anchor_ids).to(device)
    return {"": in_anchor, OUTSIDE_ANCHOR: ~in_anchor & ~on_xf, KEPT_OF_FORGOTTEN: on_xf}


def retain_level(
    tasks: Sequence[TaskSpec],
    outputs: Mapping[str, Tensor],
    check: Batch,
    forget_ids: Sequence[str],
    anchor_ids: Sequence[str] | None = None,
) -> RetainLevel:
    """:func:`retain_accuracy` with each task's per-row scores where it has them."""
    level = RetainLevel({})
    for suffix, mask in _sources(check, forget_ids, anchor_ids).items():
        if not bool(mask.any()):
            continue
        rows, out = check.select(mask), {k: v[mask] for k, v in outputs.items()}
        level.accuracy.update({f"{t}{suffix}": a for t, a in task_accuracy(tasks, out, rows).items()})
        level.rows.update({f"{t}{suffix}": r for t, r in task_rows(tasks, out, rows).items()})
    return level


def retain_accuracy(
    tasks: Sequence[TaskSpec],
    outputs: Mapping[str, Tensor],
    check: Batch,
    forget_ids: Sequence[str],
    anchor_ids: Sequence[str] | None = None,
) -> dict[str, float]:
    """Each task's accuracy on each source of the :func:`retain_check` rows: the retained instances
    (under ``"<task>"``; with ``anchor_ids``, the rows outside the anchor under ``"<task> (outside
    the anchor)"``) and X_f's rows (D_r^task, under ``"<task> (kept tasks of X_f)"``). A drop in
    any counts against the retain tolerance, so a per-task request cannot trade the kept tasks of
    the forgotten samples (a few dozen rows) for the anchor's hundreds."""
    return retain_level(tasks, outputs, check, forget_ids, anchor_ids).accuracy


def task_accuracy(tasks: Sequence[TaskSpec], outputs: Mapping[str, Tensor], batch: Batch) -> dict[str, float]:
    """Each task's metric on the rows of ``batch`` that have its label (tasks without any: left out)."""
    out: dict[str, float] = {}
    for task in tasks:
        y = batch.labels.get(task.name)
        if y is None or not bool(task.supervised(y).any()):
            continue
        out[task.name] = float(task.metric(outputs[task.name], y.to(outputs[task.name].device)))
    return out


def task_rows(tasks: Sequence[TaskSpec], outputs: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
    """Each task's per-sample metric on the rows of ``batch`` that have its label (on the CPU; tasks
    without a ``per_sample_metric`` or without any label: left out)."""
    out: dict[str, Tensor] = {}
    for task in tasks:
        y, per_sample = batch.labels.get(task.name), getattr(task, "per_sample_metric", None)
        if y is None or per_sample is None:
            continue
        rows, output = task.supervised(y), outputs[task.name]
        if bool(rows.any()):
            out[task.name] = per_sample(output, y.to(output.device))[rows].detach().cpu()
    return out


def check_accuracy(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    partitions: Partitions,
    cfg: IAConfig,
    *,
    seed: int,
    device: str = "cpu",
    retain: Batch | None = None,
) -> RetainLevel:
    """``model`` on the :func:`retain_check` rows (the ``retain_baseline`` of
    :func:`interference_aware_unlearn`, measured before any stage of a request changes the model)."""
    check = retain_check(partitions, size=cfg.check_size, seed=seed, retain=retain, rows=cfg.check_rows)
    check = check.to(device)
    if len(check) == 0:
        return RetainLevel({})
    return retain_level(
        tasks,
        model_outputs(model, check.inputs),
        check,
        partitions.forget.sample_ids,
        anchor_ids_of(partitions, cfg),
    )


def anchor_ids_of(partitions: Partitions, cfg: IAConfig) -> list[str] | None:
    """The anchor's sample ids when the check rows mix anchor and outside rows (``"both"``)."""
    return list(partitions.anchor_sample_ids) if cfg.check_rows == "both" else None


def retain_drop(
    accuracy: Mapping[str, float],
    baseline: Mapping[str, float],
    *,
    kept_two_sided: bool = False,
    relative: bool = False,
    noise: Mapping[str, float] | None = None,
) -> float:
    """The largest accuracy drop of any task from ``baseline`` (0 when nothing is comparable).
    ``kept_two_sided``: on X_f's kept tasks (``"<task> (kept tasks of X_f)"``) a rise counts too.
    ``relative``: each drop as a share of ``|baseline|`` (``ia.retain_tolerance_scale``), so that a
    regression task's −MAE of about 0.1 is judged on its own scale, not in accuracy points.
    ``noise``: per task, the part of its change the draw of the check rows explains
    (:func:`retain_noise`), taken off before the largest is taken (may leave it below 0)."""
    allowance = dict(noise or {})
    drops = []
    for t, a in accuracy.items():
        if t not in baseline:
            continue
        drop = abs(baseline[t] - a) if kept_two_sided and t.endswith(KEPT_OF_FORGOTTEN) else baseline[t] - a
        drop -= allowance.get(t, 0.0)
        # a baseline of exactly 0 (a perfect regression, or no correct row): any drop counts as huge
        drops.append(drop / max(abs(baseline[t]), 1e-12) if relative else drop)
    return max(drops, default=0.0)


def retain_noise(before: Mapping[str, Tensor], after: Mapping[str, Tensor], z: float) -> dict[str, float]:
    """Per task, ``z`` standard errors of the paired change of its per-row scores from ``before`` to
    ``after`` (:func:`~worker.unlearning.acceptance.paired_standard_error`; ``ia.retain_noise_z``):
    the retain gate's allowance for the draw of its rows, as the acceptance check's held-out bound
    has one. Tasks without the same rows on both sides, or ``z`` = 0: none."""
    if z <= 0:
        return {}
    out: dict[str, float] = {}
    for t, b in before.items():
        a = after.get(t)
        if a is not None and a.shape == b.shape:
            se = paired_standard_error(b, a)
            if not math.isnan(se):
                out[t] = z * se
    return out


def kept_deviation(accuracy: Mapping[str, float], baseline: Mapping[str, float]) -> float | None:
    """The largest |accuracy − pre-request accuracy| of X_f's kept tasks (``"<task> (kept tasks of
    X_f)"``): a rise is memorisation of the forgotten samples, a drop lost utility; ``None`` when
    the request has no kept task on X_f."""
    kept = [t for t in accuracy if t.endswith(KEPT_OF_FORGOTTEN) and t in baseline]
    gaps = [abs(accuracy[t] - baseline[t]) for t in kept]
    return max(gaps, default=None)
