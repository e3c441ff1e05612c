"""Wall and CPU time of single-request rounds, one method against another, on a prepared model.

``python -m bench.round_wall DIR --workload scenes --clients c03,c07,c05 --methods default,retrain``
prepares the workload into ``DIR`` once (kept: later calls reuse it), then runs, per client and
method, one per-client ``engine.run_round`` from v1 with the next request's importance deferred
(timed on its own, as the worker runs it after publishing). Prints one JSON row per round; with
``--profile`` also a cProfile of the first round (cumulative time). One torch thread.
docs/benchmarks.md, "Default's wall on scenes".
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from worker.unlearning import engine
from worker.unlearning.types import ForgetSpec
from worker.unlearning.workload import build_workload


def measure(root: Path, workload: str, clients: Sequence[str], methods: Sequence[str], profile: bool) -> None:
    torch.set_num_threads(1)
    wl = build_workload(workload, seed=0)
    if not (root / "v1").exists():
        engine.prepare(
            wl, data_dir=root / "data", base_dir=root / "base", adapter_dir=root / "v1", settings={}, seed=0,
            cache_dir=root / "cache",
        )  # fmt: skip
    method_cpu: list[float] = []
    apply = engine.apply_method

    def timed(*args: Any, **kwargs: Any) -> Any:
        c0 = time.process_time()
        try:
            return apply(*args, **kwargs)
        finally:
            method_cpu.append(time.process_time() - c0)

    engine.apply_method = timed  # the method's CPU time (a fallback retrain is a second call)
    prof: cProfile.Profile | None = cProfile.Profile() if profile else None
    for client in clients:
        for method in methods:
            out = root / f"out-{method}-{client}"
            shutil.rmtree(out, ignore_errors=True)
            method_cpu.clear()
            w0, c0 = time.perf_counter(), time.process_time()
            if prof is not None:
                prof.enable()
            outcome = engine.run_round(
                wl, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1", adapter_out=out,
                requests=[ForgetSpec("r", "client", client, None, [])], method=method, settings={}, seed=0,
                cache_dir=root / "cache", defer_next_importance=True,
            )  # fmt: skip
            if prof is not None:
                prof.disable()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(60)
                prof = None
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            ev = outcome.evidence["r"]
            n0, nc0 = time.perf_counter(), time.process_time()
            if outcome.next_importance is not None:
                outcome.next_importance()
            row = {
                "client": client,
                "method": method,
                "round_wall_s": wall,
                "round_cpu_s": cpu,
                "method_s": ev["timings_s"]["method_s"],
                "method_cpu_s": sum(method_cpu[:1]),
                "fallback_s": ev["timings_s"].get("acceptance_fallback_s"),
                "path": ev["acceptance"].get("path"),
                "next_importance_wall_s": time.perf_counter() - n0,
                "next_importance_cpu_s": time.process_time() - nc0,
                "forget_auc": {t: v.get("auc") for t, v in ev["mia"]["forget_vs_unseen"].items()},
            }
            print(json.dumps(row), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_wall", description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--workload", default="scenes")
    parser.add_argument("--clients", default="c03,c07,c05")
    parser.add_argument("--methods", default="default,retrain")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    measure(args.dir, args.workload, args.clients.split(","), args.methods.split(","), args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
