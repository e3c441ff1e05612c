"""How often an exact retrain passes the acceptance check's held-out bound, with and without its
noise term: the calibration of ``heldout_check`` (docs/benchmarks.md, "The held-out bound").

``python -m bench.heldout_bound --seeds 0,1,2,3 --runs 10 --json bench-results/heldout-bound-digits.json``
(``--workload scenes --preset quick``: the quick bench's smaller scenes pool).

Per worker seed (the frozen base and the data, as ``lethe bench`` builds them): ``--runs`` adapters
with v1's recipe on every client's data (v1 of ``runs`` adapter seeds) and ``--runs`` on the same
data less the first client (the exact path of a per-client request on it, from other seeds). Every
(v1, retrain) pair is then judged by the held-out check as a round judges its exact path against v1:
the tolerance alone (the bound before), and the tolerance plus ``forget_z`` standard errors of the
paired change (:func:`worker.unlearning.acceptance.paired_standard_error`). An exact retrain is a
correct unlearning: every pair it fails is a false alarm of the check. One torch thread.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.calibration_cli import calibration_parser, seeds, workload_options, write_json
from bench.seeded_workloads import SeededWorkloads
from worker.unlearning import acceptance
from worker.unlearning.audit import model_outputs
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import ensure_base
from worker.unlearning.partitions import retain_set
from worker.unlearning.runtime import runtime_environment
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import Batch, TaskSpec


def _scores(model: torch.nn.Module, heldout: Batch, tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
    """Each task's per-sample metric on its labelled held-out rows."""
    out = model_outputs(model, heldout.inputs)
    return {
        t.name: t.per_sample_metric(out[t.name], heldout.labels[t.name])[t.supervised(heldout.labels[t.name])]  # type: ignore[attr-defined]
        for t in tasks
    }


def measure_seed(workloads: SeededWorkloads, seed: int, runs: int, root: Path) -> dict[str, Any]:
    workload = workloads.of(seed)
    settings = workload.settings({})
    store = DataStore.materialise(root / f"data-{seed}", workload)
    base = ensure_base(workload, root / f"base-{seed}", settings, seed)
    tasks = workload.tasks()
    client_index = store.client_index()
    data = retain_set(store.client_data(), None, tasks=[t.name for t in tasks], client_index=client_index,
                      state=RoundState(version=1))  # fmt: skip
    forgotten = store.active_clients[0]
    without = data.select(torch.nonzero(data.subset != client_index[forgotten]).flatten())
    heldout = store.heldout().to_batch(client_index)
    cfg = TrainConfig.from_settings(settings)
    # adapter seeds: v1's are the worker seed's own first, the retrains' never one of them
    v1s = [
        _scores(train_v1(base, data, tasks, cfg, seed=seed + 1000 * r), heldout, tasks) for r in range(runs)
    ]
    retrains = [
        _scores(train_v1(base, without, tasks, cfg, seed=seed + 1000 * (runs + r)), heldout, tasks)
        for r in range(runs)
    ]
    ac = acceptance.AcceptanceConfig.from_settings(settings.get("acceptance"))  # as a round judges
    pairs: dict[str, list[dict[str, float]]] = {t.name: [] for t in tasks}
    for v1 in v1s:
        for retrained in retrains:
            for t in tasks:
                b, a = v1[t.name], retrained[t.name]
                before, after, n = float(b.mean()), float(a.mean()), int(b.numel())
                se = acceptance.paired_standard_error(b, a)
                flat = acceptance.heldout_check(t.name, before, after, ac.heldout_tolerance, se=None)
                noisy = acceptance.heldout_check(
                    t.name, before, after, ac.heldout_tolerance, ac.forget_z, se, n
                )
                pairs[t.name].append({"drop": before - after, "se": se, "flat": flat.ok, "noisy": noisy.ok})
    per_task = {}
    for name, rows in pairs.items():
        se_median = statistics.median(r["se"] for r in rows)
        per_task[name] = {
            "pairs": len(rows),
            "flat_passed": sum(r["flat"] for r in rows),
            "noisy_passed": sum(r["noisy"] for r in rows),
            "drop_median": statistics.median(r["drop"] for r in rows),
            "drop_max": max(r["drop"] for r in rows),
            "se_median": se_median,
            "allowed_median": ac.heldout_tolerance + ac.forget_z * se_median,
            "v1": [round(float(v[name].mean()), 4) for v in v1s],
            "retrain": [round(float(v[name].mean()), 4) for v in retrains],
        }
    return {"seed": seed, "forgotten": forgotten, "heldout_rows": len(heldout), "tasks": per_task}


def main(argv: Sequence[str] | None = None) -> int:
    parser = calibration_parser("python -m bench.heldout_bound", __doc__)
    parser.add_argument("--runs", type=int, default=10, help="adapters per side (v1s, retrains) and seed")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    torch.set_num_threads(1)
    options = workload_options(parser, args)
    workloads = SeededWorkloads(args.workload, options)
    results = []
    with tempfile.TemporaryDirectory(prefix="lethe-heldout-bound-") as tmp:
        for seed in seeds(args):
            t0 = time.perf_counter()
            result = measure_seed(workloads, seed, args.runs, Path(tmp))
            results.append(result)
            for task, r in result["tasks"].items():
                print(f"seed {seed} {task}: exact retrains passing, tolerance alone "
                      f"{r['flat_passed']}/{r['pairs']}, "
                      f"with the noise term {r['noisy_passed']}/{r['pairs']}; drop median "
                      f"{100 * r['drop_median']:+.1f} max {100 * r['drop_max']:+.1f} points; allowed median "
                      f"{100 * r['allowed_median']:.1f} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    out = {
        "workload": args.workload,
        "preset": args.preset,
        "workload_options": options,
        "runs": args.runs,
        "environment": runtime_environment(),
        "seeds": results,
    }
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
