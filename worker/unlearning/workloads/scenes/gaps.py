"""Is unlearning measurable on the scenes workload? v1 against the base, and v1 against a retrain.

``python -m worker.unlearning.workloads.scenes.gaps --clients c00,c07 --threads 1 --json gaps.json``:

- v1 (the workload's default recipe on every client) and its wall time; held-out quality of the base
  and of v1 per task (accuracy / −MAE) on the neutral held-out scenes and on the unseen clients;
- per forgotten client: a retrain of the adapter on every other client (same recipe and seed), its
  wall time, and original − retrain on the client's samples: per-task metric and the loss-MIA AUC
  (the client's samples against the unseen clients' as non-members).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import Batch, TaskSpec
from worker.unlearning.workloads.scenes.workload import ScenesWorkload


@torch.no_grad()
def _outputs(model: nn.Module, batch: Batch, size: int = 512) -> dict[str, torch.Tensor]:
    model.eval()
    parts = [model({k: v[i : i + size] for k, v in batch.inputs.items()}) for i in range(0, len(batch), size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _metrics(model: nn.Module, batch: Batch, tasks: list[TaskSpec]) -> dict[str, float]:
    out = _outputs(model, batch)
    return {t.name: round(t.metric(out[t.name], batch.labels[t.name]), 4) for t in tasks}


def _losses(model: nn.Module, batch: Batch, tasks: list[TaskSpec]) -> torch.Tensor:
    out = _outputs(model, batch)
    return sum((t.per_sample_loss(out[t.name], batch.labels[t.name]) for t in tasks), torch.zeros(len(batch)))


def _auc(members: torch.Tensor, others: torch.Tensor) -> float:
    """ROC-AUC of the score −loss: members (lower loss) against non-members."""
    a, b = -members, -others
    greater = (a[:, None] > b[None, :]).float().mean()
    ties = (a[:, None] == b[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def measure(
    clients: list[str], seed: int, workload: ScenesWorkload, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    tasks = workload.tasks()
    index = workload.client_index()
    base = workload.pretrain(seed)
    data = workload.client_data().to_batch(index)
    held = workload.heldout_data().to_batch(index)
    neutral = held.select(torch.tensor([not s.startswith("u") for s in held.sample_ids]))
    unseen = held.select(torch.tensor([s.startswith("u") for s in held.sample_ids]))
    cfg = TrainConfig.from_settings(workload.settings(overrides))
    started = time.perf_counter()
    v1 = train_v1(base, data, tasks, cfg, seed=seed)
    v1_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "samples": len(data),
        "train_config": cfg.to_json(),
        "v1_train_s": round(v1_s, 1),
        "heldout": {"base": _metrics(base, neutral, tasks), "v1": _metrics(v1, neutral, tasks)},
        "unseen_clients": {"base": _metrics(base, unseen, tasks), "v1": _metrics(v1, unseen, tasks)},
        "clients": {},
    }
    print(json.dumps(result, indent=2), flush=True)
    owners = torch.tensor([index[c] for c in workload.client_data().client_ids if c is not None])
    unseen_loss = {"v1": _losses(v1, unseen, tasks)}
    for client in clients:
        keep = owners != index[client]
        forget = data.select(~keep)
        started = time.perf_counter()
        retrain = train_v1(base, data.select(keep), tasks, cfg, seed=seed)
        retrain_s = time.perf_counter() - started
        orig_m, re_m = _metrics(v1, forget, tasks), _metrics(retrain, forget, tasks)
        auc_orig = _auc(_losses(v1, forget, tasks), unseen_loss["v1"])
        auc_re = _auc(_losses(retrain, forget, tasks), _losses(retrain, unseen, tasks))
        row = {
            "samples": len(forget),
            "retrain_s": round(retrain_s, 1),
            "forget_original": orig_m,
            "forget_retrain": re_m,
            "gap": {t: round(orig_m[t] - re_m[t], 4) for t in orig_m},
            "mia_auc": {"original": round(auc_orig, 4), "retrain": round(auc_re, 4)},
            "retrain_heldout": _metrics(retrain, neutral, tasks),
        }
        result["clients"][client] = row
        print(json.dumps({client: row}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="c00", help="comma-separated clients to forget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--settings", default="{}", help="settings overrides (JSON), e.g. the v1 recipe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clients = [c for c in args.clients.split(",") if c]
    result = measure(clients, args.seed, ScenesWorkload(seed=args.seed), json.loads(args.settings))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
