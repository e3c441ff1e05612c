"""Pretrain the scenes base on data of no client.

``python -m worker.unlearning.workloads.scenes.pretrain --out DIR --seed 0``: trains the ViT backbone
and the task heads on ``pretrain_size`` generated scenes (rebuilt from the seed every epoch, never
stored), saves the base (see ``base.py``), prints held-out quality and each file's sha256.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from worker.unlearning.workloads.scenes.backbone import BackboneSize, ScenesModel, build_backbone, build_heads
from worker.unlearning.workloads.scenes.base import losses, quality, save_base
from worker.unlearning.workloads.scenes.generator import ScenesConfig, ScenesGenerator

HELDOUT_SIZE = 2_000


def pretrain(
    gen: ScenesGenerator,
    size: BackboneSize,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    log_every: int = 50,
) -> ScenesModel:
    torch.manual_seed(gen.config.seed)
    model = ScenesModel(build_backbone(size), build_heads(size.hidden_size))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_chunks = gen.num_pretraining_chunks()
    per_chunk = math.ceil(gen.config.chunk_size / batch_size)
    total = epochs * n_chunks * per_chunk
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    order_gen = torch.Generator().manual_seed(gen.config.seed)
    step, started = 0, time.monotonic()
    for epoch in range(epochs):
        for chunk_index in torch.randperm(n_chunks, generator=order_gen).tolist():
            chunk = gen.pretraining_chunk(chunk_index)
            perm = torch.randperm(len(chunk), generator=order_gen)
            for i in range(0, len(chunk), batch_size):
                idx = perm[i : i + batch_size]
                per_task = losses(
                    model(chunk.pixel_values[idx]), {t: v[idx] for t, v in chunk.labels.items()}
                )
                loss = sum(per_task.values(), torch.zeros(()))
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sched.step()
                step += 1
                if step % log_every == 0:
                    parts = " ".join(f"{t}={v.item():.4f}" for t, v in per_task.items())
                    print(
                        f"epoch {epoch} step {step}/{total} {parts} ({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
    model.eval()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrain-size", type=int, default=ScenesConfig.pretrain_size)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = ScenesGenerator(ScenesConfig(seed=args.seed, pretrain_size=args.pretrain_size))
    size = BackboneSize(image_size=gen.config.image_size)
    started = time.monotonic()
    model = pretrain(gen, size, epochs=args.epochs)
    seconds = time.monotonic() - started
    heldout = quality(model, gen.heldout(HELDOUT_SIZE))
    print(f"pretraining took {seconds:.0f} s; held-out quality (accuracy / R²): {heldout}", flush=True)
    meta = {
        "generator": asdict(gen.config),
        "backbone_size": asdict(size),
        "pretrain": {
            "epochs": args.epochs,
            "samples": gen.config.pretrain_size,
            "threads": args.threads,
            "seconds": round(seconds),
            "torch": torch.__version__,
        },
        "heldout_quality": {k: round(v, 4) for k, v in heldout.items()},
    }
    for rel, digest in save_base(model, args.out, meta).items():
        print(f"{digest}  {rel}")


if __name__ == "__main__":
    main()
