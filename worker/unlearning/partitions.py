"""The four data partitions of a forget request (interference paper Eq. 3) and the retain set.

Instances X (the samples still in the store, minus everything the state says is forgotten), tasks T.
A request names X_f and T_f (T_r = T \\ T_f, X_r = X \\ X_f)::

    D_f        = X_f × T_f        forget
    D_r^task   = X_f × T_r        retain_task   (empty in full-task requests)
    D_r^inst   = X_r × T_f        retain_inst   (over the anchor subset of X_r)
    D_r^clean  = X_r × T_r        retain_clean  (over the anchor subset; empty in full-task requests)

Each partition is a Batch whose labels are ``IGNORE`` outside its task set; rows with no supervised
label left in the partition are dropped, so every (sample, task) pair of the data is in exactly one
of D_f, D_r^task, X_r × T (the anchor partitions are a seeded subset of the last). Already
forgotten clients and samples never enter X; already forgotten (sample, task) pairs are IGNORE.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.unlearning.state import RoundState
from worker.unlearning.types import Batch, Partitions, is_supervised, unsupervised_value, without_labels
from worker.unlearning.workload import SampleSet

DEFAULT_ANCHOR_FRACTION = 0.1


@dataclass(frozen=True)
class ForgetSelection:
    """X_f (sample ids) and T_f of one request."""

    sample_ids: list[str]
    forget_tasks: list[str]


def id_mask(ids: Sequence[str], wanted: Iterable[str]) -> torch.Tensor:
    """Bool tensor: which of ``ids`` are in ``wanted`` (vectorised with numpy)."""
    want = np.asarray(sorted(set(wanted)), dtype=np.str_)
    if len(ids) == 0 or want.size == 0:
        return torch.zeros(len(ids), dtype=torch.bool)
    return torch.from_numpy(np.isin(np.asarray(ids, dtype=np.str_), want))


def active_samples(data: SampleSet, state: RoundState) -> SampleSet:
    """``data`` without forgotten clients/samples, with forgotten (sample, task) labels ``IGNORE``."""
    keep = [
        i
        for i, (s, c) in enumerate(zip(data.sample_ids, data.client_ids, strict=True))
        if not state.is_excluded(s, c)
    ]
    rows = torch.tensor(keep, dtype=torch.long)
    labels = {t: y[rows].clone() for t, y in data.labels.items()}
    ids = [data.sample_ids[i] for i in keep]
    pairs = state.forgotten_pair_set()
    if pairs:
        for t, y in labels.items():
            mask = id_mask(ids, (s for s, task in pairs if task == t))
            y[mask] = unsupervised_value(y)
    return SampleSet(
        inputs={k: v[rows] for k, v in data.inputs.items()},
        sample_ids=ids,
        client_ids=[data.client_ids[i] for i in keep],
        labels=labels,
    )


def mask_tasks(batch: Batch, keep_tasks: Sequence[str]) -> Batch:
    """Labels outside ``keep_tasks`` set to IGNORE; rows with no supervised label left dropped."""
    labels = {
        t: (y.clone() if t in keep_tasks else torch.full_like(y, unsupervised_value(y)))
        for t, y in batch.labels.items()
    }
    masked = Batch(inputs=batch.inputs, labels=labels, subset=batch.subset, sample_ids=batch.sample_ids)
    if not labels:
        return masked
    supervised = torch.stack([is_supervised(y) for y in labels.values()]).any(dim=0)
    return masked.select(supervised)


def anchor_key(
    kind: str, client_id: str | None, sample_ids: Sequence[str] | None, tasks: Sequence[str], draw: int = 0
) -> str:
    """What a request's anchor subset is drawn from: the request's content (not its id, which is a
    random uuid), so that the same request on the same adapter version gives the same adapter — a
    reproducible result and evidence — and ``draw`` (``settings["anchor_draw"]``, default 0) to
    re-draw it on purpose (``python -m bench reliability`` measures over draws)."""
    samples = ",".join(sorted(sample_ids)) if sample_ids is not None else "*"
    return f"{kind}|{client_id or ''}|{samples}|{','.join(sorted(tasks))}|{draw}"


def anchor_seed(seed: int, key: str) -> int:
    """The seed of a request's anchor subset: a function of the round seed and :func:`anchor_key`."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def anchor_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """A seeded subset of ``range(n)`` of size ``ceil(fraction·n)`` (sorted)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError("anchor fraction must be in (0, 1]")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    k = min(n, max(1, math.ceil(fraction * n)))
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def build_partitions(
    data: SampleSet,
    selection: ForgetSelection,
    *,
    tasks: Sequence[str],
    client_index: Mapping[str, int],
    state: RoundState,
    anchor_fraction: float = DEFAULT_ANCHOR_FRACTION,
    seed: int = 0,
) -> Partitions:
    """The four partitions of one request over ``data`` (the store's current client data)."""
    unknown = [t for t in selection.forget_tasks if t not in tasks]
    if unknown:
        raise ValueError(f"unknown forget tasks {unknown}")
    forget_tasks = [t for t in tasks if t in selection.forget_tasks]
    retain_tasks = [t for t in tasks if t not in selection.forget_tasks]
    active = active_samples(data, state).to_batch(client_index)
    forget_ids = set(selection.sample_ids)
    is_forget = id_mask(active.sample_ids, forget_ids)
    x_f = active.select(is_forget)
    x_r = active.select(~is_forget)
    anchor = x_r.select(anchor_indices(len(x_r), anchor_fraction, seed))
    return Partitions(
        forget=mask_tasks(x_f, forget_tasks),
        retain_task=mask_tasks(x_f, retain_tasks),
        retain_inst=mask_tasks(anchor, forget_tasks),
        retain_clean=mask_tasks(anchor, retain_tasks),
        forget_tasks=forget_tasks,
        retain_tasks=retain_tasks,
        anchor_sample_ids=list(anchor.sample_ids),
    )


def retain_set(
    data: SampleSet,
    selection: ForgetSelection | None,
    *,
    tasks: Sequence[str],
    client_index: Mapping[str, int],
    state: RoundState,
) -> Batch:
    """Everything a retrain may learn from: X × T minus D_f minus everything already forgotten.

    Rows with no supervised label left are dropped (a sample forgotten for every task is gone).
    """
    active = active_samples(data, state).to_batch(client_index)
    if selection is None or not selection.sample_ids:
        return mask_tasks(active, tasks)
    forget_ids = set(selection.sample_ids)
    is_forget = id_mask(active.sample_ids, forget_ids)
    labels = {}
    for t, y in active.labels.items():
        labels[t] = without_labels(y, is_forget) if t in selection.forget_tasks else y
    return mask_tasks(
        Batch(inputs=active.inputs, labels=labels, subset=active.subset, sample_ids=active.sample_ids), tasks
    )


def heldout_batch(data: SampleSet, client_index: Mapping[str, int]) -> Batch:
    return data.to_batch(client_index)
