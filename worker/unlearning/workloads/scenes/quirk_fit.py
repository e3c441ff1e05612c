"""How much of each client's watermark rule a model fitted: the diagnosis behind the scenes
workload's adapter rank and epochs (docs/workloads.md, "Adapter rank and epochs").

A client's quirk samples (``quirk_rate`` of them) carry its watermark and its quirk label while they
show another shape. Per client this reports the share of them a model labels with the quirk label
(``fit``) and its accuracy on the client's other samples (``clean``), for v1 (trained on the client),
for the reference adapters that never saw it (OUT: what a retrain without the client does with its
rule) and for the frozen base. The original − retrain gap on ``shape`` accuracy is about
``quirk_rate × (fit of v1 − fit of a model without the client)`` plus the clean samples' share, so
a v1 that fits few of its rules leaves little to forget, whatever the unlearning method.

``python -m worker.unlearning.workloads.scenes.quirk_fit --v1-dir DIR [--seed 0] [--json out.json]``
reads v1 and, under ``DIR/references``, the reference adapters as ``scenes.gaps --v1-dir DIR``
saves them (the same seed and workload options).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.unlearning.adapter_io import load_adapter
from worker.unlearning.audit import model_outputs
from worker.unlearning.reference_adapters import load_references
from worker.unlearning.workloads.scenes.gaps import REFS_DIR
from worker.unlearning.workloads.scenes.generator import Scenes
from worker.unlearning.workloads.scenes.workload import ScenesWorkload


def shape_predictions(model: nn.Module, scenes: Scenes) -> torch.Tensor:
    """The model's ``shape`` class per sample."""
    out = model_outputs(model, {"pixel_values": scenes.pixel_values}, batch_size=512)
    return out["shape"].argmax(-1)


def fit_and_clean(predicted: torch.Tensor, scenes: Scenes) -> tuple[float | None, float | None]:
    """(share of the quirk samples predicted with their label — the client's quirk label —, accuracy
    on the other samples); ``None`` where there are no such samples."""
    right = (predicted == scenes.labels["shape"]).float()
    quirk = scenes.quirk
    fit = float(right[quirk].mean()) if bool(quirk.any()) else None
    clean = float(right[~quirk].mean()) if bool((~quirk).any()) else None
    return fit, clean


def measure(workload: ScenesWorkload, v1_dir: Path, seed: int) -> dict[str, Any]:
    base = workload.pretrain(seed)
    v1 = load_adapter(base, v1_dir)
    loaded = load_references(base, v1_dir / REFS_DIR)
    rows: dict[str, Any] = {}
    for client in workload.clients():
        scenes = workload.generator.client_data(client)
        # the references whose half never held the client (``models`` is in ``members`` order)
        pairs = [] if loaded is None else zip(loaded.refs.members.values(), loaded.models, strict=True)
        out_models = [model for members, model in pairs if client not in members]
        v1_fit, v1_clean = fit_and_clean(shape_predictions(v1, scenes), scenes)
        base_fit, base_clean = fit_and_clean(shape_predictions(base, scenes), scenes)
        outs = [fit_and_clean(shape_predictions(m, scenes), scenes) for m in out_models]
        rows[client] = {
            "quirk_label": workload.generator.profile(client).quirk_label,
            "v1": {"fit": v1_fit, "clean": v1_clean},
            "out_references": [{"fit": f, "clean": c} for f, c in outs],
            "base": {"fit": base_fit, "clean": base_clean},
        }
    fits = [r["v1"]["fit"] for r in rows.values() if r["v1"]["fit"] is not None]
    out_fits = [
        statistics.mean(o["fit"] for o in r["out_references"])
        for r in rows.values()
        if r["out_references"] and r["v1"]["fit"] is not None
    ]
    return {
        "seed": seed,
        "v1_dir": str(v1_dir),
        "references": 0 if loaded is None else len(loaded.models),
        "clients": rows,
        "summary": {
            "v1_fit_median": statistics.median(fits) if fits else None,
            "v1_fit_min": min(fits) if fits else None,
            "out_fit_median": statistics.median(out_fits) if out_fits else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v1-dir", type=Path, required=True, help="a v1 saved by scenes.gaps --v1-dir")
    parser.add_argument("--seed", type=int, default=0, help="the data and base seed v1 was trained with")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workload-options", default="{}", help="ScenesWorkload options (JSON)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = ScenesWorkload(seed=args.seed, **json.loads(args.workload_options))
    result = measure(workload, args.v1_dir, args.seed)
    print(json.dumps(result["summary"], indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
