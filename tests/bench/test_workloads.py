"""``lethe bench``, the workload measurement and the latency bench take any registered workload
with options, and the workload's data follows the benchmark's seeds (issue 7 part 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from bench import cli, quality
from bench.quality import run_bench
from bench.seeded_workloads import SeededWorkloads
from bench.workload_figures import measure_latency, measure_workload
from tests.worker.unlearning.toy_entry_point import register_toy
from worker.unlearning.workloads.digits import DigitsClients
from worker.unlearning.workloads.toy import ToyWorkload


@pytest.fixture(autouse=True)
def _toy(monkeypatch: pytest.MonkeyPatch) -> None:
    register_toy(monkeypatch)


def test_the_data_seed_follows_the_benchmark_seed() -> None:
    """Defect: ``--seeds`` never changed the data (the workload was built once, with seed 0)."""
    toy = SeededWorkloads("toy", {"num_clients": 4})
    three, four = toy.of(3), toy.of(4)
    assert isinstance(three, ToyWorkload)
    assert isinstance(four, ToyWorkload)
    assert (three.seed, four.seed, three.num_clients) == (3, 4, 4)
    assert not torch.equal(three.client_data().inputs["x"], four.client_data().inputs["x"])
    assert toy.of(4) is four  # built again only when the data seed changes
    digits = SeededWorkloads("digits-clients").of(2)
    assert isinstance(digits, DigitsClients)
    assert digits.seed == 2
    pinned = SeededWorkloads("toy", {"seed": 9})  # an explicit seed option pins the data
    nine = pinned.of(3)
    assert isinstance(nine, ToyWorkload)
    assert (nine.seed, pinned.follows_seed) == (9, False)
    assert pinned.root(Path("r"), 3) == pinned.root(Path("r"), 4)


def test_bench_runs_a_named_workload_with_its_options(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        "smoke", out, seeds=[3, 4], workload="toy", workload_options={"num_clients": 4},
        methods=["original", "retrain"], echo=None,
    )  # fmt: skip
    meta = json.loads(out.read_text())["meta"]
    assert (meta["workload"], meta["workload_options"], meta["data_seed_follows_seeds"]) == (
        "toy", {"num_clients": 4}, True,
    )  # fmt: skip
    assert {r["seed"] for r in result["runs"]} == {3, 4}
    with pytest.raises(ValueError, match="refused the options"):
        run_bench("smoke", None, seeds=[0], workload="toy", workload_options={"nope": 1}, echo=None)


def test_measure_workload_and_latency_take_a_workload_with_options() -> None:
    measured = measure_workload("toy", seeds=[1, 2], clients=["u0"], workload_options={"per_client": 10})
    assert (measured["workload"], measured["workload_options"]) == ("toy", {"per_client": 10})
    assert [(r["seed"], r["n"]) for r in measured["rows"]] == [(1, 10), (2, 10)]
    timed = measure_latency("toy", method="ssd", seed=2, workload_options={"num_clients": 4})
    assert (timed["workload"], timed["workload_options"], timed["seed"]) == ("toy", {"num_clients": 4}, 2)
    assert set(timed["rounds"]) == {"client request", "partial-task request", "client + partial-task"}


def test_bench_commands_pass_the_workload_and_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_bench(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs, args=args)
        return {}

    monkeypatch.setattr(quality, "run_bench", fake_bench)
    runner = CliRunner()
    done = runner.invoke(
        cli.bench_command,
        [
            "--workload",
            "toy",
            "--workload-option",
            "num_clients=4",
            "--workload-option",
            "dim=6",
            "--seeds",
            "2",
        ],
    )
    assert done.exit_code == 0, done.output
    assert (seen["workload"], seen["workload_options"], seen["args"][2]) == (
        "toy",
        {"num_clients": 4, "dim": 6},
        2,
    )
    unknown = runner.invoke(cli.bench_command, ["--workload", "no-such-workload"])
    assert unknown.exit_code == 2
    assert "unknown workload" in unknown.output
    assert runner.invoke(cli.bench_command, ["--workload-option", "x"]).exit_code == 2
    seen.clear()
    assert (
        cli.main(["--preset", "smoke", "--workload", "toy", "--workload-option", "dim=6", "--seeds", "1"])
        == 0
    )
    assert (seen["workload"], seen["workload_options"], seen["args"][2]) == ("toy", {"dim": 6}, 1)


def test_the_latency_report_judges_each_workload_by_its_own_goal() -> None:
    """Issue 8's POST → served goal is ≤ 10 s on digits-clients and ≤ 60 s on scenes: the same
    13.8 s median is reported as not met on the first and met on the second. Each run's row says
    which path published it and what its early stopping aimed at."""
    from bench.latency import markdown

    def report(workload: str) -> str:
        run = {"run": 1, "client": "c0", "version": 2, "post_s": 0.01, "completed_s": 13.7, "latest_s": 13.7,
               "served_s": 13.8, "path": "retrain",
               "engine_timings_s": {"acceptance_continuation_s": 2.04, "acceptance_fallback_s": 9.5},
               "target": {"source": "constant", "reason": "no OUT reference"}}  # fmt: skip
        result: dict[str, Any] = {
            "host": {"cpus": 2, "python": "3.11", "load_avg_1m_at_end": 0.5},
            "api_rss_mb": {"max": 120.0, "median": 119.0},
            "worker_rss_mb_during_rounds": {"max": 900.0, "median": 800.0},
            "date": "2026-12-02", "model": "m", "workload": workload, "settings": "defaults",
            "prepare_s": 1.0, "runs": [run], "median_served_s": 13.8, "median_completed_s": 13.7,
            "max_served_s": 13.8, "command": "python -m bench latency",
        }  # fmt: skip
        return markdown(result, "label")

    assert "(goal ≤ 10 s: **not met**)" in report("digits-clients")
    assert "(goal ≤ 60 s: met)" in report("scenes")
    # which path published each run, and a target that fell back says why
    # and the seconds its continuation and exact path added
    assert "| 13.80 | retrain | 2.0 / 9.5 | constant (no OUT reference) |" in report("scenes")


def test_the_latency_rows_say_what_each_request_aimed_at() -> None:
    """A request's evidence names its early-stopping target (``default`` nests it under ``ia``; a
    constant fallback says why): the latency bench reports it per run, so a burst's rounds that
    ran without OUT references show. Methods without a target report none."""
    from bench.latency import _target_summary

    fallback = {"source": "constant", "reason": "no OUT reference", "mia_auc": 0.5}
    assert _target_summary({"method_info": {"ia": {"target": fallback}}}) == {
        "source": "constant", "reason": "no OUT reference",
    }  # fmt: skip
    assert _target_summary({"method_info": {"target": {"source": "references"}}}) == {
        "source": "references", "reason": None,
    }  # fmt: skip
    assert _target_summary({"method_info": {"ssd": {}}}) is None
    assert _target_summary({}) is None


def test_the_latency_rows_say_why_a_request_fell_back() -> None:
    """A request published by the exact retrain names the method's failed checks (not the
    retrain's, which may pass); a request whose checks all passed names none."""
    from bench.evidence import failed_checks

    bad = {
        "what": "forgotten: forget set, position_x",
        "ok": False,
        "detail": "-0.089 → -0.094",
        "margin": -0.002,
    }
    good = {"what": "held-out accuracy kept: shape", "ok": True, "detail": "…", "margin": 0.04}
    fell_back = {"path": "retrain", "checks": [good], "method_checks": [bad, good]}
    assert failed_checks(fell_back) == [{k: bad[k] for k in ("what", "detail", "margin")}]
    assert failed_checks({"path": "default", "checks": [good]}) == []
    assert failed_checks({"path": "retrain", "checks": [bad]}) == [
        {k: bad[k] for k in ("what", "detail", "margin")}
    ]
    assert failed_checks({"checked": False, "reason": "nothing to forget"}) == []
    assert failed_checks(None) == []
