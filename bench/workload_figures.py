"""What makes a workload worth auditing, measured (docs/workloads.md): per forgotten client the
original − retrain gap on its samples (accuracy, loss-MIA AUC) and the retrain's Val spread over
seeds (:func:`measure_workload`); the wall time of ``prepare`` and of three engine rounds
(:func:`measure_latency`). ``python -m bench measure-workload --help``."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.seeded_workloads import SeededWorkloads
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import EngineInputs, ensure_base, prepare, run_round
from worker.unlearning.training import TrainConfig, retrain, train_v1
from worker.unlearning.types import Batch, ForgetSpec, TaskSpec
from worker.unlearning.workload import Workload


def _auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """ROC-AUC of the score −loss for members vs non-members (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([-members.numpy(), -nonmembers.numpy()])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    return float(roc_auc_score(labels, scores))


def _eval(model: torch.nn.Module, batch: Batch, task: TaskSpec) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = model(batch.inputs)[task.name]
    target = batch.labels[task.name]
    supervised = target >= 0
    return task.metric(out, target), task.per_sample_loss(out, target)[supervised]


def _seed_inputs(workloads: SeededWorkloads, root: Path, seed: int) -> EngineInputs:
    """The engine inputs of ``seed``'s workload (its data and base made under ``root``)."""
    wl, home = workloads.of(seed), workloads.root(root, seed)
    settings = wl.settings()
    DataStore.materialise(home / "data", wl)
    ensure_base(wl, home / "base", settings, seed=0)
    return EngineInputs.load(wl, data_dir=home / "data", base_dir=home / "base", settings=settings, seed=0)


def measure_workload(
    workload: str | Workload = "digits-clients",
    seeds: Sequence[int] = (0, 1, 2),
    clients: Sequence[str] | None = None,
    *,
    workload_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Original vs retrain on each forgotten client: accuracy and loss-MIA gaps; retrain Val spread.

    The data follows the seeds (:class:`SeededWorkloads`), so the Val spread covers data draws and
    training seeds together."""
    torch.set_num_threads(1)
    workloads = SeededWorkloads(workload, workload_options)
    wl = workloads.of(seeds[0])
    with tempfile.TemporaryDirectory(prefix="lethe-measure-") as tmp:
        per_seed = {seed: _seed_inputs(workloads, Path(tmp), seed) for seed in seeds}
    inputs = per_seed[seeds[0]]
    picked = list(clients) if clients else wl.clients()
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        inputs = per_seed[seed]
        cfg = TrainConfig.from_settings(inputs.settings)
        data = inputs.full_train_set()
        owners = inputs.data.client_ids
        v1 = train_v1(inputs.base, data, inputs.tasks, cfg, seed=seed)
        for client in picked:
            idx = torch.tensor([o == client for o in owners], dtype=torch.bool)
            forget, keep = data.select(idx), data.select(~idx)
            ref = retrain(inputs.base, keep, inputs.tasks, cfg, seed=seed)
            row: dict[str, Any] = {"seed": seed, "client": client, "n": len(forget), "tasks": {}}
            for task in inputs.tasks:
                acc_o, loss_o = _eval(v1, forget, task)
                acc_r, loss_r = _eval(ref, forget, task)
                val_o, vloss_o = _eval(v1, inputs.heldout, task)
                val_r, vloss_r = _eval(ref, inputs.heldout, task)
                row["tasks"][task.name] = {
                    "acc_original": acc_o,
                    "acc_retrain": acc_r,
                    "acc_gap": acc_o - acc_r,
                    "mia_original": _auc(loss_o, vloss_o),
                    "mia_retrain": _auc(loss_r, vloss_r),
                    "val_original": val_o,
                    "val_retrain": val_r,
                }
                row["tasks"][task.name]["mia_gap"] = (
                    row["tasks"][task.name]["mia_original"] - row["tasks"][task.name]["mia_retrain"]
                )
            rows.append(row)
            print(
                f"[measure] seed {seed} {client}: "
                + json.dumps({k: round(v["acc_gap"], 3) for k, v in row["tasks"].items()}),
                file=sys.stderr,
                flush=True,
            )
    summary: dict[str, Any] = {}
    for task in inputs.tasks:
        t = task.name
        acc_gaps = [r["tasks"][t]["acc_gap"] for r in rows]
        mia_gaps = [r["tasks"][t]["mia_gap"] for r in rows]
        # Val spread of the retrain over seeds, per forgotten client (max − min), then its median/max.
        spreads = []
        for client in picked:
            vals = [r["tasks"][t]["val_retrain"] for r in rows if r["client"] == client]
            spreads.append(max(vals) - min(vals))
        summary[t] = {
            "median_acc_gap": statistics.median(acc_gaps),
            "min_acc_gap": min(acc_gaps),
            "median_mia_gap": statistics.median(mia_gaps),
            "min_mia_gap": min(mia_gaps),
            "clients_acc_gap_ge_0.10": sum(
                1
                for c in picked
                if statistics.median([r["tasks"][t]["acc_gap"] for r in rows if r["client"] == c]) >= 0.10
            ),
            "clients_mia_gap_ge_0.10": sum(
                1
                for c in picked
                if statistics.median([r["tasks"][t]["mia_gap"] for r in rows if r["client"] == c]) >= 0.10
            ),
            "median_val_retrain": statistics.median([r["tasks"][t]["val_retrain"] for r in rows]),
            "median_val_original": statistics.median([r["tasks"][t]["val_original"] for r in rows]),
            "median_val_spread_over_seeds": statistics.median(spreads),
            "max_val_spread_over_seeds": max(spreads),
        }
    return {
        "workload": wl.name,
        "workload_options": workloads.options,
        "data_seed_follows_seeds": workloads.follows_seed,
        "seeds": list(seeds),
        "clients": picked,
        "rows": rows,
        "summary": summary,
    }


def measure_latency(
    workload: str | Workload = "digits-clients",
    method: str = "default",
    seed: int = 0,
    *,
    workload_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Wall time of ``prepare`` and of three ``run_round`` calls (client, partial-task, both).
    ``seed`` seeds the training and the workload's data (:class:`SeededWorkloads`)."""
    torch.set_num_threads(1)
    workloads = SeededWorkloads(workload, workload_options)
    wl = workloads.of(seed)
    clients = wl.clients()
    task = wl.tasks()[0].name

    def client(i: int) -> str:  # fixed picks, wrapped for workloads with few clients
        return clients[i % len(clients)]

    rounds = {
        "client request": [ForgetSpec("a", "client", client(3), None, [])],
        "partial-task request": [ForgetSpec("b", "task", client(5), None, [task])],
        "client + partial-task": [
            ForgetSpec("c", "client", client(1), None, []),
            ForgetSpec("d", "task", client(7), None, [task]),
        ],
    }
    out: dict[str, Any] = {
        "workload": wl.name,
        "workload_options": workloads.options,
        "method": method,
        "seed": seed,
        "rounds": {},
    }
    with tempfile.TemporaryDirectory(prefix="lethe-latency-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        prepare(
            wl,
            data_dir=root / "data",
            base_dir=root / "base",
            adapter_dir=root / "v1",
            settings={},
            seed=seed,
        )
        out["prepare_s"] = time.perf_counter() - t0
        for i, (name, specs) in enumerate(rounds.items()):
            t0 = time.perf_counter()
            outcome = run_round(
                wl, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1",
                adapter_out=root / f"v{i + 2}", requests=specs, method=method, settings={}, seed=seed,
                cache_dir=root / "cache",
            )  # fmt: skip
            out["rounds"][name] = {
                "wall_s": time.perf_counter() - t0,
                "per_request": {rid: ev["timings_s"] for rid, ev in outcome.evidence.items()},
            }
    return out
