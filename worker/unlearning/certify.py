"""Certification of a published adapter version, off the request path (UNLEARNING.md "Audit evidence").

A pure library function (no database, no Celery): for a version and the requests it served, train
the exact reference — a fresh adapter on the version's retain set, :func:`engine.reference_retrain`
— then compare the version with it on each request's splits: per forgotten task
``|Unl(version) − Unl(retrain)|`` and ``|MIA(version) − MIA(retrain)|`` (loss-MIA AUC, forget vs
held out) against ``settings["certify"]["tolerance"]``, and UIS (interference paper Eqs. 30–31,
``audit.unlearning_impact_score``: retrain for forgotten tasks, the pre-request model's metrics
from the request's evidence for retained tasks).

The raw data of forgotten subjects is purged after publishing, so the forget set comes from a
*certification snapshot* (:func:`save_snapshot`: X_f with every label, one ``.npz`` per request,
written by the worker before the purge for the rounds chosen for certification). Without one the
forget-set terms (Unl, MIA, UIS) are unavailable and the verdict is ``incomplete``; Ret and Val are
still compared. The retain set is the store's remaining data minus what the version's
``RoundState`` forgot; when later rounds purged more than the version forgot, it is smaller than
the version's own retain set and the result says so (``retain_set.exact: false``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from worker.unlearning.adapter_io import load_adapter
from worker.unlearning.audit import (
    AuditConfig,
    ModelMetrics,
    UISResult,
    evaluate_model,
    unlearning_impact_score,
)
from worker.unlearning.datastore import Collate, DataStore
from worker.unlearning.engine import EngineInputs, reference_retrain
from worker.unlearning.partitions import id_mask, retain_set
from worker.unlearning.state import RoundState
from worker.unlearning.types import Batch, ForgetSpec

Verdict = Literal["within_bounds", "out_of_bounds", "incomplete"]
SNAPSHOT_INDEX = "snapshot.json"


@dataclass(frozen=True)
class CertifyConfig:
    """``settings["certify"]``: ``tolerance`` (largest |version − retrain| of Unl and of MIA AUC per
    forgotten task that is within bounds)."""

    tolerance: float = 0.05

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> CertifyConfig:
        raw = dict((settings or {}).get("certify", {}) or {})
        unknown = sorted(set(raw) - {"tolerance"})
        if unknown:
            raise ValueError(f"unknown certify settings {unknown}")
        tolerance = float(raw.get("tolerance", cls.tolerance))
        if not tolerance >= 0:
            raise ValueError("certify tolerance must be >= 0")
        return cls(tolerance=tolerance)


@dataclass(frozen=True)
class CertifyRequest:
    """One request the version served: its forgotten tasks, its forget set (X_f with every label;
    ``None`` when purged without a snapshot) and the pre-request model's metrics (its evidence's
    ``original_metrics``; needed for UIS on retained tasks)."""

    request_id: str
    forget_tasks: list[str]
    forget: Batch | None
    original: ModelMetrics | None = None


@dataclass
class Certification:
    """The outcome: overall verdict and, per request, the comparison with the retrain."""

    version: int
    verdict: Verdict
    tolerance: float
    requests: dict[str, dict[str, Any]]
    retain_set: dict[str, Any]
    retrain_wall_s: float
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def within_bounds(self) -> bool | None:
        return None if self.verdict == "incomplete" else self.verdict == "within_bounds"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "certification",
            "version": self.version,
            "verdict": self.verdict,
            "within_bounds": self.within_bounds,
            "tolerance": self.tolerance,
            "reference": "retrain",
            "retrain_wall_s": self.retrain_wall_s,
            "retain_set": dict(self.retain_set),
            "seed": self.seed,
            "notes": list(self.notes),
            "requests": {rid: dict(doc) for rid, doc in self.requests.items()},
        }


# ----------------------------------------------------------------------------------------------
# snapshots of the forget set (written before the purge, deleted by certification)
# ----------------------------------------------------------------------------------------------


def save_snapshot(directory: Path, forget_sets: Mapping[str, Batch]) -> Path:
    """Write ``{request id: X_f with every label}`` under ``directory`` (replaced atomically: written
    next to it, then renamed). ``.npz`` files without pickles, and an index."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index: dict[str, str] = {}
    for i, (request_id, batch) in enumerate(forget_sets.items()):
        name = f"request-{i}.npz"
        arrays: dict[str, np.ndarray] = {
            "subset": batch.subset.detach().cpu().numpy(),
            "sample_ids": np.asarray(batch.sample_ids, dtype=np.str_),
        }
        for task, y in batch.labels.items():
            arrays[f"label__{task}"] = y.detach().cpu().numpy()
        for key, leaf in batch.inputs.items():
            arrays[f"input__{key}"] = leaf.detach().cpu().numpy()
        with open(tmp / name, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        index[request_id] = name
    (tmp / SNAPSHOT_INDEX).write_text(json.dumps({"requests": index}, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def forget_sets(store: DataStore, specs: Sequence[ForgetSpec]) -> dict[str, Batch]:
    """Each request's X_f with every label the store still has (read *before* the purge): what a
    snapshot keeps. A request whose samples are already gone gets an empty batch."""
    data = store.client_data()
    index = store.client_index()
    out: dict[str, Batch] = {}
    for spec in specs:
        wanted = set(store.resolve(spec).sample_ids)
        rows = [i for i, s in enumerate(data.sample_ids) if s in wanted]
        picked = data.to_batch(index).select(torch.tensor(rows, dtype=torch.long))
        out[spec.request_id] = picked
    return out


def load_snapshot(directory: Path, collate: Collate | None = None) -> dict[str, Batch] | None:
    """The snapshot under ``directory`` (``None`` when there is none). It keeps the store's arrays;
    ``collate`` (the workload's) maps them to the model's inputs."""
    index_path = Path(directory) / SNAPSHOT_INDEX
    if not index_path.exists():
        return None
    index = json.loads(index_path.read_text())["requests"]
    out: dict[str, Batch] = {}
    for request_id, name in index.items():
        with np.load(Path(directory) / name, allow_pickle=False) as npz:
            labels = {
                key.removeprefix("label__"): torch.from_numpy(np.array(npz[key]))
                for key in npz.files
                if key.startswith("label__")
            }
            # "x": the single input of snapshots written before inputs were a dict
            keys = [k for k in npz.files if k.startswith("input__")] or ["x"]
            out[str(request_id)] = Batch(
                inputs=(collate or dict)(
                    {k.removeprefix("input__"): torch.from_numpy(np.array(npz[k])) for k in keys}
                ),
                labels=labels,
                subset=torch.from_numpy(np.array(npz["subset"])),
                sample_ids=[str(s) for s in npz["sample_ids"].tolist()],
            )
    return out


# ----------------------------------------------------------------------------------------------
# the certification
# ----------------------------------------------------------------------------------------------


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else abs(a - b)


def _retain_exactness(inputs: EngineInputs, state: RoundState) -> dict[str, int]:
    """What the store purged beyond what the version forgot (later rounds' subjects)."""
    store = inputs.store
    return {
        "clients": len(set(store.purged_clients) - set(state.forgotten_clients)),
        "samples": len(set(store.purged_samples) - set(state.forgotten_samples)),
        "pairs": len(set(store.purged_pairs) - state.forgotten_pair_set()),
    }


def _compare_request(
    request: CertifyRequest,
    mine: ModelMetrics,
    ref: ModelMetrics,
    *,
    tolerance: float,
    uis_floor: float,
) -> dict[str, Any]:
    tasks: dict[str, dict[str, Any]] = {}
    verdicts: list[bool | None] = []
    for name, m in mine.tasks.items():
        r = ref.tasks[name]
        entry: dict[str, Any] = {
            "forgotten": name in request.forget_tasks,
            "version": m.to_json(),
            "retrain": r.to_json(),
            "ret_diff": _diff(m.ret, r.ret),
            "val_diff": _diff(m.val, r.val),
        }
        if name in request.forget_tasks:
            unl_diff, mia_diff = _diff(m.unl, r.unl), _diff(m.mia_auc, r.mia_auc)
            within = (
                None
                if unl_diff is None or mia_diff is None
                else unl_diff <= tolerance and mia_diff <= tolerance
            )
            entry.update({"unl_diff": unl_diff, "mia_diff": mia_diff, "within_bounds": within})
            verdicts.append(within)
        tasks[name] = entry
    if request.forget is None:
        uis = UISResult(
            None,
            None,
            "forget-set terms unavailable: the raw data was purged and no certification snapshot was kept",
        )
    else:
        uis = unlearning_impact_score(
            mine, forget_tasks=request.forget_tasks, reference=ref, original=request.original, floor=uis_floor
        )
    verdict: Verdict
    if any(v is False for v in verdicts):
        verdict = "out_of_bounds"
    elif request.forget is None or not verdicts or any(v is None for v in verdicts):
        verdict = "incomplete"
    else:
        verdict = "within_bounds"
    return {
        "verdict": verdict,
        "forget_tasks": list(request.forget_tasks),
        "forget_set": "snapshot" if request.forget is not None else "unavailable",
        "forget_samples": 0 if request.forget is None else len(set(request.forget.sample_ids)),
        "tasks": tasks,
        "uis": uis.to_json(),
    }


def certify_version(
    inputs: EngineInputs,
    *,
    adapter_dir: Path,
    requests: Sequence[CertifyRequest],
    state_file: Path | None = None,
) -> Certification:
    """Retrain the reference for the version in ``adapter_dir`` and compare (see the module doc).

    ``inputs``: the model's engine inputs (store, base, settings with ``certify``/``train``/``audit``,
    seed, device) — the same that rounds use. ``state_file``: the version's RoundState when the
    worker keeps it outside the version directory (default ``adapter_dir/unlearning_state.json``)."""
    cfg = CertifyConfig.from_settings(inputs.settings)
    audit_cfg = AuditConfig.from_settings(inputs.settings)
    state = RoundState.load(Path(adapter_dir)) if state_file is None else RoundState.load_file(state_file)
    model = load_adapter(inputs.base, Path(adapter_dir), device=inputs.device)
    retain = retain_set(
        inputs.data, None, tasks=inputs.task_names, client_index=inputs.client_index, state=state
    )
    beyond = _retain_exactness(inputs, state)
    t0 = time.perf_counter()
    reference = reference_retrain(
        inputs.base,
        retain,
        inputs.tasks,
        inputs.settings,
        seed=inputs.seed,
        pruned=state.pruned_subset_outputs,
        device=inputs.device,
    )
    wall = time.perf_counter() - t0
    empty = retain.select(torch.zeros(0, dtype=torch.long))
    results: dict[str, dict[str, Any]] = {}
    for request in requests:
        forget = request.forget if request.forget is not None else empty
        ret = retain.select(~id_mask(retain.sample_ids, set(forget.sample_ids)))
        splits = {"ret": ret, "unl": forget, "val": inputs.heldout}
        mine = evaluate_model(
            model, inputs.tasks, **splits, device=inputs.device, batch_size=audit_cfg.batch_size
        )
        ref = evaluate_model(
            reference, inputs.tasks, **splits, device=inputs.device, batch_size=audit_cfg.batch_size
        )
        results[request.request_id] = _compare_request(
            request, mine, ref, tolerance=cfg.tolerance, uis_floor=audit_cfg.uis_floor
        )
    verdicts = [r["verdict"] for r in results.values()]
    overall: Verdict
    if "out_of_bounds" in verdicts:
        overall = "out_of_bounds"
    elif not verdicts or "incomplete" in verdicts:
        overall = "incomplete"
    else:
        overall = "within_bounds"
    notes = []
    if any(beyond.values()):
        notes.append(
            "the store purged data that later versions forgot: the retrain learned from less than this "
            "version's retain set"
        )
    return Certification(
        version=state.version,
        verdict=overall,
        tolerance=cfg.tolerance,
        requests=results,
        retain_set={"size": len(retain), "exact": not any(beyond.values()), "purged_beyond_version": beyond},
        retrain_wall_s=wall,
        seed=inputs.seed,
        notes=notes,
    )
