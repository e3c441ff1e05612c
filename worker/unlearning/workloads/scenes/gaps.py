"""Is unlearning measurable on the scenes workload? v1 against the base, and v1 against a retrain.

``python -m worker.unlearning.workloads.scenes.gaps --clients c00,c07 --threads 1 --json gaps.json``
(``--v1-dir DIR`` shares one v1 between runs over different clients; ``--workload-options`` builds
a smaller workload for a cheap proxy):

- v1 (the workload's default recipe on every client) and its wall time; held-out quality of the base
  and of v1 per task (accuracy / −MAE) on the neutral held-out scenes (the quality goal's measure)
  and on the unseen clients (with and without their quirk samples);
- per forgotten client: a retrain of the adapter on every other client (same recipe; the seed of
  ``--retrain-seed``, default ``--seed``, for the retrain's spread over training seeds), its
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

from worker.unlearning.adapter_io import load_adapter, save_adapter
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import SUBSET_HEAD, Batch, RegressionTask, TaskSpec
from worker.unlearning.workloads.scenes.workload import ScenesWorkload

V1_META = "gaps-v1.json"


@torch.no_grad()
def _outputs(model: nn.Module, batch: Batch, size: int = 512) -> dict[str, torch.Tensor]:
    model.eval()
    parts = [model({k: v[i : i + size] for k, v in batch.inputs.items()}) for i in range(0, len(batch), size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _metrics(model: nn.Module, batch: Batch, tasks: list[TaskSpec]) -> dict[str, float]:
    out = _outputs(model, batch)
    return {t.name: round(t.metric(out[t.name], batch.labels[t.name]), 4) for t in tasks}


def _r2(model: nn.Module, batch: Batch, tasks: list[TaskSpec]) -> dict[str, float]:
    """R² of each regression task on ``batch`` (its targets carry no NaN here)."""
    out = _outputs(model, batch)
    r2 = {}
    for t in tasks:
        if isinstance(t, RegressionTask):
            y, pred = batch.labels[t.name].float(), out[t.name].reshape(-1).float()
            r2[t.name] = round(float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()), 4)
    return r2


def subset_accuracy(model: nn.Module, batch: Batch) -> float:
    """Accuracy of the subset-ID head (which client a sample is from) on ``batch``."""
    out = _outputs(model, batch)[SUBSET_HEAD]
    return round(float((out.argmax(-1) == batch.subset).float().mean()), 4)


def _losses(model: nn.Module, batch: Batch, tasks: list[TaskSpec]) -> torch.Tensor:
    out = _outputs(model, batch)
    return sum((t.per_sample_loss(out[t.name], batch.labels[t.name]) for t in tasks), torch.zeros(len(batch)))


def _auc(members: torch.Tensor, others: torch.Tensor) -> float:
    """ROC-AUC of the score −loss: members (lower loss) against non-members."""
    a, b = -members, -others
    greater = (a[:, None] > b[None, :]).float().mean()
    ties = (a[:, None] == b[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def _v1(
    base: Any, data: Batch, tasks: list[TaskSpec], cfg: TrainConfig, seed: int, v1_dir: Path | None
) -> Any:
    """v1 and its training time: loaded from ``v1_dir`` when a run with the same recipe saved it
    there (so that parallel runs over different clients train it once), else trained (and saved)."""
    meta = v1_dir / V1_META if v1_dir is not None else None
    if v1_dir is not None and meta is not None and meta.is_file():
        stored = json.loads(meta.read_text())
        if stored["train_config"] != cfg.to_json() or stored["seed"] != seed:
            raise SystemExit(f"{v1_dir} holds a v1 of another recipe or seed")
        return load_adapter(base, v1_dir), float(stored["v1_train_s"])
    started = time.perf_counter()
    v1 = train_v1(base, data, tasks, cfg, seed=seed)
    v1_s = time.perf_counter() - started
    if v1_dir is not None and meta is not None:
        save_adapter(v1, v1_dir)
        meta.write_text(json.dumps({"train_config": cfg.to_json(), "seed": seed, "v1_train_s": v1_s}))
    return v1, v1_s


def measure(
    clients: list[str],
    seed: int,
    workload: ScenesWorkload,
    overrides: dict[str, Any] | None = None,
    *,
    retrain_seed: int | None = None,
    v1_dir: Path | None = None,
    retrains_first: bool = False,
    json_path: Path | None = None,
) -> dict[str, Any]:
    tasks = workload.tasks()
    index = workload.client_index()
    base = workload.pretrain(seed)
    data = workload.client_data().to_batch(index)
    held = workload.heldout_data().to_batch(index)
    neutral = held.select(torch.tensor([not s.startswith("u") for s in held.sample_ids]))
    unseen = held.select(torch.tensor([s.startswith("u") for s in held.sample_ids]))
    # the unseen clients' own quirk samples (watermark → their quirk label) are a rule no model here
    # was shown: reported with and without them
    unseen_plain = unseen.select(~workload.unseen_data().quirk)
    cfg = TrainConfig.from_settings(workload.settings(overrides))
    retrain_seed = seed if retrain_seed is None else retrain_seed
    owners = torch.tensor([index[c] for c in workload.client_data().client_ids if c is not None])

    def retrained(client: str) -> dict[str, Any]:
        keep = owners != index[client]
        forget = data.select(~keep)
        started = time.perf_counter()
        retrain = train_v1(base, data.select(keep), tasks, cfg, seed=retrain_seed)
        return {
            "forget": forget,
            "retrain_s": round(time.perf_counter() - started, 1),
            "metrics": _metrics(retrain, forget, tasks),
            "auc": _auc(_losses(retrain, forget, tasks), _losses(retrain, unseen, tasks)),
            "heldout": _metrics(retrain, neutral, tasks),
        }

    # retrains first: a parallel run trains v1 into ``v1_dir`` meanwhile; each row is emitted as soon
    # as v1 is there, and the JSON rewritten, so that a run stopped early keeps what it measured
    done: dict[str, dict[str, Any]] = {}
    if retrains_first:
        for client in clients:
            done[client] = retrained(client)
            if _saved_v1(v1_dir):
                break
        while v1_dir is not None and not _saved_v1(v1_dir):
            time.sleep(10)  # the parallel run that trains v1 has not saved it yet
    v1, v1_s = _v1(base, data, tasks, cfg, seed, v1_dir)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "retrain_seed": retrain_seed,
        "samples": len(data),
        "train_config": cfg.to_json(),
        "v1_train_s": round(v1_s, 1),
        "heldout": {"base": _metrics(base, neutral, tasks), "v1": _metrics(v1, neutral, tasks)},
        "unseen_clients": {"base": _metrics(base, unseen, tasks), "v1": _metrics(v1, unseen, tasks)},
        "unseen_clients_without_quirks": {
            "base": _metrics(base, unseen_plain, tasks),
            "v1": _metrics(v1, unseen_plain, tasks),
        },
        "heldout_r2": {"base": _r2(base, neutral, tasks), "v1": _r2(v1, neutral, tasks)},
        "v1_subset_id_accuracy": subset_accuracy(v1, data),
        "clients": {},
    }
    print(json.dumps(result, indent=2), flush=True)
    unseen_loss = _losses(v1, unseen, tasks)
    for client in clients:
        r = done.pop(client, None) or retrained(client)
        orig_m, re_m = _metrics(v1, r["forget"], tasks), r["metrics"]
        auc_orig = _auc(_losses(v1, r["forget"], tasks), unseen_loss)
        row = {
            "samples": len(r["forget"]),
            "retrain_s": r["retrain_s"],
            "forget_original": orig_m,
            "forget_retrain": re_m,
            "gap": {t: round(orig_m[t] - re_m[t], 4) for t in orig_m},
            "mia_auc": {"original": round(auc_orig, 4), "retrain": round(r["auc"], 4)},
            "retrain_heldout": r["heldout"],
        }
        result["clients"][client] = row
        print(json.dumps({client: row}), flush=True)
        if json_path is not None:
            json_path.write_text(json.dumps(result, indent=2))
    return result


def _saved_v1(v1_dir: Path | None) -> bool:
    return v1_dir is not None and (v1_dir / V1_META).is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="c00", help="comma-separated clients to forget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--settings", default="{}", help="settings overrides (JSON), e.g. the v1 recipe")
    parser.add_argument(
        "--retrain-seed", type=int, default=None, help="training seed of the retrains (default --seed)"
    )
    parser.add_argument(
        "--v1-dir", type=Path, default=None, help="load v1 from here if saved, else save it here"
    )
    parser.add_argument(
        "--retrains-first", action="store_true", help="retrain first, then wait for v1 in --v1-dir"
    )
    parser.add_argument(
        "--workload-options",
        default="{}",
        help='ScenesWorkload options (JSON), e.g. {"clients": 8} for a proxy',
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clients = [c for c in args.clients.split(",") if c]
    workload = ScenesWorkload(seed=args.seed, **json.loads(args.workload_options))
    result = measure(clients, args.seed, workload, json.loads(args.settings), retrain_seed=args.retrain_seed,
                     v1_dir=args.v1_dir, retrains_first=args.retrains_first, json_path=args.json)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
