"""One round of the default method on ``digits-clients`` (client c3), judged over 10 seeds (v1 and the
engine's randomness per seed; one frozen base): a client request moves the forget set towards an exact
retrain while Val and Ret stay within stated tolerances; a partial-task request keeps the retained
task; and whatever the method does, the published model passes its acceptance check.

The method is measured on its own (``acceptance.fallback: none``, ``continue_steps: 0``: neither a
continuation nor a retrain replaces a failed update); the retrain it is scored against is trained
here by the test, never by the round (no oracle).
Thresholds: see MEASURED below — the spread over seeds 0–9 on two CPU kernel paths
(``ATEN_CPU_CAPABILITY=default`` and ``avx2``), with the bound set below the worst path's median and
pass fraction by about one seed's worth, so that a path that differs in the last bits cannot flip the
verdict, while a method that stopped forgetting (or started breaking retained data) fails.
Tolerances are one-sided (a rise is no harm).
``LETHE_TEST_DEVICE=cuda``: the rounds (and the test's retrains) run on the GPU, v1 is prepared on the
CPU as a worker does; the same bounds judge them (``scripts/gpu-check``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.unlearning.distributions import assert_distribution
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import ForgetSpec, ensure_base, prepare, run_round
from worker.unlearning.workload import Workload, load_workload

pytestmark = pytest.mark.quality

METHOD = "default"
CLIENT = "c3"
SEEDS = tuple(range(10))
VAL_TOLERANCE = 0.08  # Val(method) ≥ min(Val(original), Val(retrain)) − VAL_TOLERANCE, every task
RET_TOLERANCE = 0.10  # Ret(method) ≥ min(Ret(original), Ret(retrain)) − RET_TOLERANCE, every task
KEPT_TOLERANCE = 0.05  # a retained task's accuracy on the client's samples, same form
MIN_CLOSED = 0.5  # a seed "closes the gap" when the method closes half the original→retrain gap

CLIENT_SPEC = ForgetSpec("r1", "client", CLIENT, None, [])
TASK_SPEC = ForgetSpec("r2", "task", CLIENT, None, ["orientation"])
NO_FALLBACK = {"acceptance": {"fallback": "none", "continue_steps": 0}}
DEVICE = os.environ.get("LETHE_TEST_DEVICE", "cpu")


@dataclass(frozen=True)
class SeedRun:
    method: dict[str, Any]  # the method's own evidence (no fallback)
    retrain: dict[str, Any]  # the exact retrain's evidence (the test's scoring reference)
    published: dict[str, Any]  # what the engine publishes with its defaults (fallback on)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workload, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("digits")
    workload = load_workload("digits-clients")
    DataStore.materialise(root / "data", workload)
    ensure_base(workload, root / "base", workload.settings(), seed=0)
    return workload, root


def _round(
    digits: tuple[Workload, Path], seed: int, spec: ForgetSpec, method: str, settings: dict[str, Any]
) -> dict[str, Any]:
    workload, root = digits
    v1 = root / f"v1-{seed}"
    if not v1.exists():
        prepare(workload, data_dir=root / "data", base_dir=root / "base", adapter_dir=v1, settings={},
                seed=seed, cache_dir=root / "cache")  # fmt: skip
    out = root / f"v2-{seed}-{spec.request_id}-{method}-{len(settings)}"
    outcome = run_round(workload, data_dir=root / "data", base_dir=root / "base", adapter_in=v1,
                        adapter_out=out, requests=[spec], method=method, settings=settings, seed=seed,
                        device=DEVICE, cache_dir=root / "cache")  # fmt: skip
    evidence: dict[str, Any] = outcome.evidence[spec.request_id]
    return evidence


def run_seeds(digits: tuple[Workload, Path], spec: ForgetSpec) -> list[SeedRun]:
    runs = []
    for seed in SEEDS:
        own = _round(digits, seed, spec, METHOD, NO_FALLBACK)
        # the engine's default publishes the method's update when it passes its check: the same run
        published = own if own["acceptance"]["passed"] else _round(digits, seed, spec, METHOD, {})
        runs.append(SeedRun(own, _round(digits, seed, spec, "retrain", NO_FALLBACK), published))
    return runs


@pytest.fixture(scope="module")
def client_runs(digits: tuple[Workload, Path]) -> list[SeedRun]:
    return run_seeds(digits, CLIENT_SPEC)


@pytest.fixture(scope="module")
def task_runs(digits: tuple[Workload, Path]) -> list[SeedRun]:
    return run_seeds(digits, TASK_SPEC)


def gap_closed(run: SeedRun, task: str) -> float:
    """Fraction of the original→retrain gap in Unl accuracy the method closed (1 = at the retrain)."""
    original = run.method["original_metrics"][task]["unl"]
    retrain = run.retrain["tasks"][task]["unl"]
    method = run.method["tasks"][task]["unl"]
    before = abs(original - retrain)
    return 1.0 - abs(method - retrain) / before if before > 0 else 1.0


def margin_within(run: SeedRun, split: str, tasks: tuple[str, ...]) -> float:
    """The smallest margin over ``tasks`` of the method's ``split`` metric above
    min(original, retrain) (negative: below)."""
    return min(
        float(run.method["tasks"][t][split])
        - min(float(run.method["original_metrics"][t][split]), float(run.retrain["tasks"][t][split]))
        for t in tasks
    )


def summary(runs: list[SeedRun]) -> dict[str, list[float]]:
    """Every per-seed number the tests judge (also printed by ``scripts/quality_spread.py``)."""
    return {
        "closed_digit": [gap_closed(r, "digit") for r in runs],
        "closed_orientation": [gap_closed(r, "orientation") for r in runs],
        "val_margin": [margin_within(r, "val", ("digit", "orientation")) for r in runs],
        "ret_margin": [margin_within(r, "ret", ("digit", "orientation")) for r in runs],
        "kept_digit_margin": [margin_within(r, "unl", ("digit",)) for r in runs],
        "method_passed_check": [float(bool(r.method["acceptance"]["passed"])) for r in runs],
        "published_passed_check": [float(bool(r.published["acceptance"]["passed"])) for r in runs],
    }


# MEASURED (2026-12-01, torch 2.13.0 CPU, 1 thread, seeds 0–9; docs/benchmarks.md, "Quality tests
# over seeds"), per kernel path default / avx2:
# - client request, gap closed (digit): median 0.76 / 0.91; seeds ≥ MIN_CLOSED 9/10 / 10/10
# - client request, Val margin ≥ −VAL_TOLERANCE: 10/10 / 10/10 (worst −0.03 / −0.03)
# - client request, Ret margin ≥ −RET_TOLERANCE: 9/10 / 10/10 (worst −0.12 / −0.09)
# - partial-task request, digit kept on X_f (≥ −KEPT_TOLERANCE): 10/10 / 10/10 (worst 0.00 / −0.05)
# - partial-task request, Val margin: 9/10 / 10/10 (worst −0.15 / −0.05)
# Bounds: the worst path's median less 0.15, its pass fraction less one seed.
CLIENT_CLOSED_MEDIAN = 0.6
CLIENT_CLOSED_FRACTION = 0.8
CLIENT_VAL_FRACTION = 0.9
CLIENT_RET_FRACTION = 0.8
TASK_KEPT_FRACTION = 0.9
TASK_VAL_FRACTION = 0.8
# MEASURED (2026-12-02, issue 8 part 2, the same seeds; docs/methods.md, "A stronger default"): the
# method's own update (no fallback) passes its acceptance check on 8/10 / 9/10 (client) and 7/10 /
# 7/10 (partial-task) seeds, default / avx2; the previous defaults passed 5/10 / 7/10 and 3/10 /
# 3/10. Bounds: the worst path's fraction less one seed (so the client bound does not separate the
# previous code on avx2; the partial-task bound does on both paths).
CLIENT_METHOD_PASS_FRACTION = 0.7
TASK_METHOD_PASS_FRACTION = 0.6


def test_client_round_moves_forget_set_towards_retrain(client_runs: list[SeedRun]) -> None:
    s = summary(client_runs)
    assert_distribution(
        "client request: original→retrain gap closed (digit)",
        s["closed_digit"],
        median_at_least=CLIENT_CLOSED_MEDIAN,
        passes=[v >= MIN_CLOSED for v in s["closed_digit"]],
        fraction_at_least=CLIENT_CLOSED_FRACTION,
    )
    assert_distribution(
        "client request: Val margin over min(original, retrain) + tolerance",
        s["val_margin"],
        passes=[v >= -VAL_TOLERANCE for v in s["val_margin"]],
        fraction_at_least=CLIENT_VAL_FRACTION,
    )
    assert_distribution(
        "client request: Ret margin over min(original, retrain) + tolerance",
        s["ret_margin"],
        passes=[v >= -RET_TOLERANCE for v in s["ret_margin"]],
        fraction_at_least=CLIENT_RET_FRACTION,
    )
    assert all(r.method["pruned_subset_outputs"] == [3] for r in client_runs)


def test_partial_task_round_keeps_the_retained_task(task_runs: list[SeedRun]) -> None:
    s = summary(task_runs)
    assert all(r.method["forget_tasks"] == ["orientation"] for r in task_runs)
    assert_distribution(
        "partial-task request: digit kept on c3's samples",
        s["kept_digit_margin"],
        passes=[v >= -KEPT_TOLERANCE for v in s["kept_digit_margin"]],
        fraction_at_least=TASK_KEPT_FRACTION,
    )
    assert_distribution(
        "partial-task request: Val margin",
        s["val_margin"],
        passes=[v >= -VAL_TOLERANCE for v in s["val_margin"]],
        fraction_at_least=TASK_VAL_FRACTION,
    )


@pytest.mark.parametrize("kind", ["client", "task"])
def test_the_methods_own_update_passes_its_acceptance_check(
    kind: str, client_runs: list[SeedRun], task_runs: list[SeedRun]
) -> None:
    """Issue 8 part 2 (a stronger default method): the update itself keeps the request's promise
    on most seeds, rather than leaving it to the exact fallback. The previous defaults (patience in
    epochs, a forget term 0.2–0.3 of the retain term's size, early stopping on the MIA alone) fail
    it: partial-task 3/10 on both kernel paths, client 5/10 on the default path (7/10 on avx2)."""
    runs = client_runs if kind == "client" else task_runs
    passed = [bool(r.method["acceptance"]["passed"]) for r in runs]
    assert_distribution(
        f"{kind} request: the method's own update passes its acceptance check",
        [float(p) for p in passed],
        passes=passed,
        fraction_at_least=CLIENT_METHOD_PASS_FRACTION if kind == "client" else TASK_METHOD_PASS_FRACTION,
    )


@pytest.mark.parametrize("kind", ["client", "task"])
def test_a_failed_update_is_never_published_silently(
    kind: str, client_runs: list[SeedRun], task_runs: list[SeedRun]
) -> None:
    """Whatever the method does on a seed, what the round publishes either passes the acceptance
    check, or is the exact retrain (the best there is) with a warning in its evidence — on every
    seed, not a fraction. Measured: the published model passes on 10/10 (client) and 10/10 (task)
    seeds on the default path, 10/10 and 8/10 on AVX2, where the exact retrain itself moved held-out
    ``orientation`` by 6 points on two seeds (the tolerance is 5: a retrain's Val spread on this
    workload is 3–6 points)."""
    runs = client_runs if kind == "client" else task_runs
    for seed, run in zip(SEEDS, runs, strict=True):
        accepted = run.published["acceptance"]
        if accepted["passed"]:
            continue
        failed = [c["what"] for c in accepted["checks"] if not c["ok"]]
        assert accepted["path"] == "retrain", (seed, failed)
        assert "even after the exact path" in accepted["warning"], (seed, accepted)
    passed = [bool(r.published["acceptance"]["passed"]) for r in runs]
    assert_distribution(
        f"{kind} request: the published model passes its acceptance check",
        [float(p) for p in passed],
        passes=passed,
        fraction_at_least=0.7,
    )
