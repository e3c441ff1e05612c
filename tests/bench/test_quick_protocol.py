"""A workload declares its own protocol for a bench preset (``Workload.bench_protocols``), and
``lethe bench`` runs that protocol; independent seeds run in parallel processes (issue 7 part 4:
the quick preset on scenes within 30 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, ClassVar

import pytest

import worker.unlearning.workload
from bench import cli, quality
from bench.quality import run_bench, workload_protocol
from worker.unlearning.workload import BenchProtocol
from worker.unlearning.workloads.scenes.workload import ScenesWorkload
from worker.unlearning.workloads.toy import ToyWorkload

PROTOCOL = BenchProtocol(
    seeds=(5, 6),
    stages=1,
    settings=("PU:side",),
    methods=("original", "retrain"),
    workload_options={"num_clients": 4, "per_client": 8},
    tuned={},
    note="a toy protocol",
)


class QuickToy(ToyWorkload):
    """The toy workload with its own quick protocol (a test-local entry point, ``quick-toy``)."""

    name = "quick-toy"
    bench_protocols: ClassVar[Mapping[str, BenchProtocol]] = {"quick": PROTOCOL}


ENTRY = EntryPoint(name="quick-toy", value=f"{__name__}:QuickToy", group="lethe.workloads")


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    def with_quick_toy(*, group: str) -> list[EntryPoint]:
        found = list(entry_points(group=group))
        return [*found, ENTRY] if group == ENTRY.group else found

    monkeypatch.setattr(worker.unlearning.workload, "entry_points", with_quick_toy)


def _key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    return (run["setting"], run["stage"], run["method"], run["seed"])


def test_the_workload_declared_quick_protocol_is_what_the_bench_runs() -> None:
    """Defect: the quick preset was one protocol for every workload (4 settings × 3 stages × 5
    seeds × the core methods: hours on scenes); a workload could not say what its quick run is."""
    result = run_bench("quick", None, workload="quick-toy", echo=None, plots=False)
    runs = result["runs"]
    assert {r["seed"] for r in runs} == {5, 6}
    assert {r["setting"] for r in runs} == {"PU:side"}
    assert {r["stage"] for r in runs} == {1}
    assert {r["method"] for r in runs} == {"original", "retrain", "retrain_2"}
    meta = result["meta"]
    assert meta["workload_options"] == {"num_clients": 4, "per_client": 8}  # the bench-only pool
    assert meta["protocol"]["declared_by"] == "quick-toy"
    assert meta["protocol"]["note"] == "a toy protocol"
    assert meta["tuning"]["chosen"] == {}  # tuned={}: not the digits-tuned committed values
    # explicit seeds and options win over the protocol's
    mine = run_bench(
        "quick", None, seeds=[7], workload="quick-toy", workload_options={"num_clients": 3},
        methods=["original"], echo=None, plots=False,
    )  # fmt: skip
    assert {r["seed"] for r in mine["runs"]} == {7}
    assert mine["meta"]["workload_options"] == {"num_clients": 3, "per_client": 8}
    # a preset the workload does not declare runs as the bench defines it
    assert workload_protocol("quick-toy", "smoke") is None
    smoke = run_bench("smoke", None, workload="quick-toy", methods=["original"], echo=None)
    assert smoke["meta"]["protocol"] is None
    assert {r["setting"] for r in smoke["runs"]} == {"FU"}
    # protocol options need the workload by name (an instance is already built)
    with pytest.raises(ValueError, match="registered name"):
        run_bench("quick", None, workload=QuickToy(), echo=None)


def test_scenes_declares_a_quick_protocol_with_the_fairness_rules() -> None:
    """The scenes quick protocol keeps 5 evaluation seeds, 3 stages, FU and a partial-task
    setting, the reference and core methods, untuned; only the bench's pool shrinks."""
    quick = workload_protocol("scenes", "quick")
    assert quick is ScenesWorkload.bench_protocols["quick"]
    assert quick.seeds is not None
    assert len(quick.seeds) >= 5
    assert quick.stages == 3
    assert quick.settings is not None
    assert "FU" in quick.settings
    assert any(s.startswith("PU:") for s in quick.settings)
    assert quick.methods is not None
    assert {"original", "retrain", "default"} <= set(quick.methods)
    assert quick.tuned == {}
    assert quick.workload_options["clients"] >= 3 + 2  # 3 stages forget 3 clients, others remain


@pytest.mark.slow
def test_seeds_run_in_parallel_processes_with_the_same_results() -> None:
    """Seeds are independent: run in 2 worker processes they give the rows of a one-process run
    (up to the timings), each seed in a process of its own. Slow (each spawned process imports
    torch, peft and transformers: 20–120 s wall on the shared 2 cores):
    ``python -m pytest tests/bench/test_quick_protocol.py -m slow``."""
    one = run_bench("smoke", None, seeds=[3, 4], workload="quick-toy", methods=["original", "ssd"], echo=None)
    two = run_bench(
        "smoke", None, seeds=[3, 4], workload="quick-toy", methods=["original", "ssd"], echo=None, jobs=2
    )
    pids = {p["pid"] for p in two["meta"]["seed_processes"]}
    assert len(pids) == 2
    assert os.getpid() not in pids
    assert two["meta"]["jobs"] == 2
    assert [_key(r) for r in one["runs"]] == [_key(r) for r in two["runs"]]
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert (a["uis"], a["tasks"], a["close"]) == (b["uis"], b["tasks"], b["close"])
    assert two["meta"]["cpu_s"] > 0


def test_cli_takes_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr("bench.quality.run_bench", lambda *a, **k: seen.update(k))
    assert cli.main(["quality", "--workload", "quick-toy", "--jobs", "2"]) == 0
    assert seen["jobs"] == 2
    assert cli.main(["quality", "--workload", "quick-toy"]) == 0
    assert seen["jobs"] == (os.cpu_count() or 1)  # default: one process per core
    with pytest.raises(SystemExit):
        cli.main(["quality", "--jobs", "-1"])


def test_finished_units_are_kept_when_a_run_stops_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long run (scenes on a loaded machine) stopped before its last unit keeps the finished
    units in ``<json>.partial.jsonl``; a finished run leaves only its JSON."""
    real = quality._evaluate_seed

    def stop_at_seed_4(job: quality.SeedJob, seed: int, setting: str | None = None) -> dict[str, Any]:
        if seed == 4:
            raise RuntimeError("stopped")
        return real(job, seed, setting)

    out = tmp_path / "b.json"
    monkeypatch.setattr(quality, "_evaluate_seed", stop_at_seed_4)
    with pytest.raises(RuntimeError, match="stopped"):
        run_bench(
            "smoke", out, seeds=[3, 4], workload="quick-toy", methods=["original"], echo=None, plots=False
        )
    lines = out.with_suffix(".partial.jsonl").read_text().splitlines()
    assert [json.loads(line)["process"]["seed"] for line in lines] == [3]
    assert {r["seed"] for r in json.loads(lines[0])["runs"]} == {3}
    monkeypatch.setattr(quality, "_evaluate_seed", real)
    run_bench("smoke", out, seeds=[3], workload="quick-toy", methods=["original"], echo=None, plots=False)
    assert out.exists()
    assert not out.with_suffix(".partial.jsonl").exists()
