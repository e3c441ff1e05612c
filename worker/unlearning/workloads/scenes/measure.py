"""Sizing figures of the scenes workload that do not need the core (docs/workloads.md, "Scenes workload").

``python -m worker.unlearning.workloads.scenes.measure [--base DIR] [--threads 1]`` prints JSON:
- the base's quality per task (accuracy / R²) on held-out data, on the client pool (quirk samples
  left out) and on the unseen clients, and the spread of held-out quality over 10 seeds of
  ``SPREAD_SAMPLES`` samples, per task (what the committed-base test's floors are derived from);
- ms per sample: evaluation, LoRA training at the workload's rank (peft on the attention
  projections, heads trained) and full training (every weight, as pretraining);
- the projected adapter-retrain time: pool size × ``--epochs`` × LoRA ms per sample.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from worker.unlearning.workloads.scenes.backbone import LORA_RANK, ScenesModel, with_lora
from worker.unlearning.workloads.scenes.base import load_base, losses, predict, quality
from worker.unlearning.workloads.scenes.generator import TASKS, ScenesConfig, ScenesGenerator

BASE_DIR = Path(__file__).parent / "base"
SPREAD_SAMPLES = 500
SPREAD_SEEDS = 10


def heldout_spread(model: ScenesModel, n: int = SPREAD_SAMPLES, seeds: int = SPREAD_SEEDS) -> dict[str, Any]:
    """Per-task quality on ``n`` held-out samples of each of ``seeds`` seeds: values, mean, stdev."""
    runs = [quality(model, ScenesGenerator(ScenesConfig(seed=s)).heldout(n)) for s in range(seeds)]
    out: dict[str, Any] = {"samples": n, "seeds": seeds}
    for task in TASKS:
        values = [r[task] for r in runs]
        out[task] = {
            "values": [round(v, 4) for v in values],
            "mean": round(statistics.mean(values), 4),
            "stdev": round(statistics.stdev(values), 4),
            "min": round(min(values), 4),
        }
    return out


def eval_ms_per_sample(model: ScenesModel, pixel_values: torch.Tensor) -> float:
    predict(model, pixel_values[:256])  # warm-up
    started = time.perf_counter()
    predict(model, pixel_values)
    return 1000 * (time.perf_counter() - started) / len(pixel_values)


def train_ms_per_sample(
    model: ScenesModel, gen: ScenesGenerator, *, lora_rank: int | None, batch_size: int = 64, steps: int = 20
) -> float:
    """ms per sample of training on client data: a fresh LoRA adapter (r ``lora_rank`` on q/v) plus
    head copies, or (``lora_rank=None``) every weight of a copy, as pretraining does."""
    if lora_rank is None:
        student = copy.deepcopy(model)
    else:
        student = ScenesModel(with_lora(copy.deepcopy(model.backbone), lora_rank), copy.deepcopy(model.heads))
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    pool = gen.pool(gen.clients()[:4])

    def step(i: int) -> None:
        idx = torch.arange(i * batch_size, (i + 1) * batch_size) % len(pool)
        per_task = losses(student(pool.pixel_values[idx]), {t: v[idx] for t, v in pool.labels.items()})
        loss = sum(per_task.values(), torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    step(0)  # warm-up
    started = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return 1000 * (time.perf_counter() - started) / (steps * batch_size)


def measure(base: Path, epochs: int) -> dict[str, Any]:
    model, meta = load_base(base)
    gen = ScenesGenerator(ScenesConfig(**meta["generator"]))
    pool = gen.pool()
    unseen = gen.pool(gen.unseen_clients())
    heldout = gen.heldout(2_000)
    eval_ms = eval_ms_per_sample(model, heldout.pixel_values)
    lora_ms = train_ms_per_sample(model, gen, lora_rank=LORA_RANK)
    full_ms = train_ms_per_sample(model, gen, lora_rank=None)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quality": {
            "heldout": quality(model, heldout),
            "clients_without_quirks": quality(model, pool, ~pool.quirk),
            "unseen_clients_without_quirks": quality(model, unseen, ~unseen.quirk),
        },
        "heldout_spread": heldout_spread(model),
        "pool": {
            "clients": len(gen.clients()),
            "samples": len(pool),
            "quirk_share": float(pool.quirk.float().mean()),
        },
        "eval_ms_per_sample": round(eval_ms, 3),
        "lora_r8_train_ms_per_sample": round(lora_ms, 3),
        "full_train_ms_per_sample": round(full_ms, 3),
        "projected_retrain_s": {"epochs": epochs, "seconds": round(len(pool) * epochs * lora_ms / 1000)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=BASE_DIR)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of a projected adapter retrain")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.base, args.epochs), indent=2))


if __name__ == "__main__":
    main()
