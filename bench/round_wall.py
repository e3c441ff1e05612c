"""Wall and CPU time of single-request rounds, one method against another, on a prepared model.

``python -m bench.round_wall DIR --workload scenes --clients c03,c07,c05 --methods default,retrain``
prepares the workload into ``DIR`` once (kept: later calls reuse it), then runs, per client and
method, one per-client ``engine.run_round`` from v1 with the next request's importance deferred
(timed on its own, as the worker runs it after publishing). Prints one JSON row per round; with
``--profile`` also a cProfile of the first round (cumulative time). ``--repeat N``: the method
runs N times on the round's context (the model restored between runs; the last run is the
round's), each run's CPU time in ``method_cpu_runs_s`` (``method_cpu_s``: their median), so that one
process measures a method warm and the load's noise shows. ``--device cuda``: the rounds run on the
GPU, as a GPU worker runs them (preparation stays on the CPU, as in production); each run's wall
time, after the GPU's queue drained, in ``method_wall_runs_s`` (``method_wall_s``: their median),
since on a GPU the CPU time measures the launches, not the work. ``--settings JSON``: the model's
settings (workload defaults underneath); where they ask for reference adapters
(``audit.reference_adapters`` > 0), preparation trains them into ``DIR/references`` (off the timed
path, as the worker does) and every round reads them. One torch thread.
docs/benchmarks.md, "Default's wall on scenes" and "… with the ViT view".
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.evidence import failed_checks, failed_of, ia_steps, ia_target
from worker.unlearning import engine
from worker.unlearning.runtime import runtime_environment, settle
from worker.unlearning.types import ForgetSpec
from worker.unlearning.workload import Workload, build_workload


def measure(
    root: Path,
    wl: Workload,
    clients: Sequence[str],
    methods: Sequence[str],
    *,
    profile: bool = False,
    repeat: int = 1,
    settings: Mapping[str, Any] | None = None,
    device: str = "cpu",
    prepare_threads: int = 1,
) -> list[dict[str, Any]]:
    """One row per (client, method) round, also printed as a JSON line as it finishes.
    ``prepare_threads``: torch threads for the preparation (not measured); the rounds run on one."""
    torch.set_num_threads(max(1, prepare_threads))
    if not (root / "v1").exists():
        # the settings' v1 recipe and reference adapters (if any) are prepared once, with the model
        engine.prepare(
            wl, data_dir=root / "data", base_dir=root / "base", adapter_dir=root / "v1",
            settings=settings or {}, seed=0, cache_dir=root / "cache", references_dir=root / "references",
        )  # fmt: skip
    torch.set_num_threads(1)
    method_runs: list[list[float]] = []  # CPU s per call of the method (a fallback retrain is a second)
    method_walls: list[list[float]] = []  # wall s of the same runs
    apply = engine.apply_method

    def timed(method: str, model: Any, *args: Any, **kwargs: Any) -> Any:
        n = 1 if method_runs else repeat  # a fallback retrain (a second call) runs once
        state = {k: v.clone() for k, v in model.state_dict().items()} if n > 1 else None
        runs: list[float] = []
        walls: list[float] = []
        for i in range(n):
            if state is not None and i:
                model.load_state_dict(state)
            settle(device)
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                out = apply(method, model, *args, **kwargs)  # settles the device before it returns
            finally:
                runs.append(time.process_time() - c0)
                walls.append(time.perf_counter() - w0)
        method_runs.append(runs)
        method_walls.append(walls)
        return out

    # the method's CPU time (a fallback retrain is a second call); run_round looks it up at call time
    engine.apply_method = timed
    try:
        return [
            _round(
                root,
                wl,
                client,
                method,
                method_runs,
                method_walls,
                profile=profile and i == 0,
                settings=settings or {},
                device=device,
            )
            for i, (client, method) in enumerate((c, m) for c in clients for m in methods)
        ]
    finally:
        engine.apply_method = apply


def _round(
    root: Path,
    wl: Workload,
    client: str,
    method: str,
    method_runs: list[list[float]],
    method_walls: list[list[float]],
    *,
    profile: bool,
    settings: Mapping[str, Any],
    device: str,
) -> dict[str, Any]:
    out = root / f"out-{method}-{client}"
    shutil.rmtree(out, ignore_errors=True)
    method_runs.clear()
    method_walls.clear()
    prof = cProfile.Profile() if profile else None
    w0, c0 = time.perf_counter(), time.process_time()
    if prof is not None:
        prof.enable()
    outcome = engine.run_round(
        wl, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1", adapter_out=out,
        requests=[ForgetSpec("r", "client", client, None, [])], method=method, settings=settings, seed=0,
        device=device, cache_dir=root / "cache", defer_next_importance=True,
        references_dir=root / "references" if (root / "references").exists() else None,
    )  # fmt: skip
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(60)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    ev = outcome.evidence["r"]
    n0, nc0 = time.perf_counter(), time.process_time()
    if outcome.next_importance is not None:
        outcome.next_importance()
        settle(device)
    row = {
        "client": client,
        "method": method,
        "device": device,
        "round_wall_s": wall,
        "round_cpu_s": cpu,
        "method_s": ev["timings_s"]["method_s"],
        "method_cpu_s": statistics.median(method_runs[0]) if method_runs else 0.0,
        "method_cpu_runs_s": method_runs[0] if method_runs else [],
        "method_wall_s": statistics.median(method_walls[0]) if method_walls else 0.0,
        "method_wall_runs_s": method_walls[0] if method_walls else [],
        "settings": dict(settings),
        "load": os.getloadavg()[0],
        "fallback_s": ev["timings_s"].get("acceptance_fallback_s"),
        "continuation_s": ev["timings_s"].get("acceptance_continuation_s"),
        "continuation": [
            {k: run.get(k) for k in ("steps", "stopped")}
            for run in (ev["acceptance"].get("continuation") or {}).get("runs", [])
        ],
        "method_failed": failed_checks(ev["acceptance"]),
        # the published model's own failed checks (the exact path's, where the round fell back)
        "published_failed": failed_of(ev["acceptance"].get("checks")),
        # what the references allowed a failed forget bound (absent: no bound failed)
        "reference_allowance": ev["acceptance"].get("reference_allowance"),
        "target": {k: (ia_target(ev.get("method_info")) or {}).get(k) for k in ("source", "wall_s")},
        "path": ev["acceptance"].get("path"),
        "update": ia_steps(ev.get("method_info")),
        "next_importance_wall_s": time.perf_counter() - n0,
        "next_importance_cpu_s": time.process_time() - nc0,
        "forget_auc": {t: v.get("auc") for t, v in ev["mia"]["forget_vs_unseen"].items()},
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_wall", description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--workload", default="scenes")
    parser.add_argument("--clients", default="c03,c07,c05")
    parser.add_argument("--methods", default="default,retrain")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="method runs per round (median reported)")
    parser.add_argument("--settings", type=json.loads, default=None, help="the model's settings (JSON)")
    parser.add_argument("--device", default="cpu", help="where the rounds run: cpu, cuda or cuda:N")
    parser.add_argument("--prepare-threads", type=int, default=1,
                        help="torch threads for preparing DIR (not measured; rounds run on one)")  # fmt: skip
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this process sees no GPU")
    print(json.dumps({"environment": runtime_environment()}), flush=True)
    wl = build_workload(args.workload, seed=0)
    measure(args.dir, wl, args.clients.split(","), args.methods.split(","), profile=args.profile,
            repeat=max(1, args.repeat), settings=args.settings, device=args.device,
            prepare_threads=args.prepare_threads)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
