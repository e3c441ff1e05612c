"""``python -m bench reliability``: the demo's requests through the engine, one anchor draw."""

from __future__ import annotations

from typing import Any

import pytest

from bench import reliability
from tests.worker.unlearning.distributions import assert_distribution


def test_one_draw_reports_every_check_and_the_settings_it_ran_with() -> None:
    result = reliability.run(1, seed=0, rounds="two", settings={"ia": {"epochs": 2}}, method="default")
    assert result["trials"] == 1
    assert result["rounds"] == "two"
    # the overrides, and what the engine ran with: the workload's defaults with them merged over
    assert result["settings"] == {"ia": {"epochs": 2}}
    effective = result["effective_settings"]
    assert effective["ia"]["epochs"] == 2
    assert effective["default"]["ia"]["retain_distillation"] == 0.75  # digits' default's (not the paper's 0)
    assert effective["default"]["ia"]["forgotten_task_distillation"] == 1.0
    (draw,) = result["results"]
    assert [c["what"] for c in draw["checks"]] == [s["check"] for s in result["summary"]]
    assert len(draw["checks"]) == 6
    assert result["passed"] == int(draw["ok"]) == int(all(c["ok"] for c in draw["checks"]))
    # one round per request: each request's evidence says which path was published
    assert set(draw["requests"]) == {"client-0", "task-0"}
    # (this draw, with 2 epochs, is continued by the acceptance check on the AVX-512 path)
    paths = ("default", "default+continuation", "retrain")
    assert all(r["path"] in paths for r in draw["requests"].values())
    assert {"torch", "cpu_capability", "threads"} <= set(result["environment"])
    # the version between the two rounds measured on the same groups (which round moved what)
    (between,) = draw["after_rounds"]
    assert [(m["group"], m["task"]) for m in between] == [(m["group"], m["task"]) for m in draw["measured"]]
    assert all(0.0 <= m["after"] <= 1.0 for m in between)
    # the per-task request's kept tasks are judged against round 1's version, the one it was applied to
    kept = [c for c in draw["checks"] if c["what"].startswith("kept:")]
    assert kept
    assert all(c["detail"].endswith("against round 1's version") for c in kept)
    assert all(not c["detail"].endswith("version") for c in draw["checks"] if c not in kept)
    # judged again from what the draw stored, today's checks give the draw's verdict
    assert reliability.rejudge(result) == [draw["ok"]]


def _row(group: str, task: str, n: int, before: float, after: float) -> dict[str, Any]:
    return {
        "group": group,
        "task": task,
        "n": n,
        "before": before,
        "after": after,
        "changed": 0.0,
        "paired_se": 0.02,
    }


def test_stored_draws_are_judged_again_by_today_s_checks() -> None:
    """A two-round draw stored before 5 Dec 2026 failed the kept check on round 1's exact path
    (worker seed 4: c0's `digit` 0.975 → 0.825, round 1 already 0.825); judged again against round
    1's version it passes. The forgotten groups are known from the stored checks' names."""
    client, task = "forgotten client c9", "c0's samples, task forgotten"
    kept, heldout = "c0's samples, other tasks kept", "held-out"  # the demo's groups, in its order
    measured = [
        _row(client, "digit", 86, 0.95, 0.40),
        _row(task, "orientation", 40, 0.95, 0.40),
        _row(kept, "digit", 40, 0.975, 0.825),
        _row(heldout, "digit", 449, 0.62, 0.60),
        _row(heldout, "orientation", 449, 0.68, 0.66),
    ]
    # round 1's version: its exact path forgot c9 and fits c0's samples at 0.825
    round_1 = [{**m, "after": a} for m, a in zip(measured, (0.40, 0.95, 0.825, 0.60, 0.66), strict=True)]
    draw = {
        "anchor_draw": 7,
        "ok": False,
        "measured": measured,
        "after_rounds": [round_1],
        "checks": [{"what": f"forgotten: {client}, digit"}, {"what": f"forgotten: {task}, orientation"}],
    }
    assert reliability.rejudge({"results": [draw]}) == [True]
    # the same draw in one round (no round 1 to judge against): v1 → final, as stored
    assert reliability.rejudge({"results": [{**draw, "after_rounds": []}]}) == [False]


# MEASURED (2026-12-02, torch 2.13.0 CPU, 1 thread; docs/benchmarks.md, "The retain term's
# targets"; bench-results/distill-rel/*-s3-*-two.json, the first 10 draws): worker seed 3, the
# seed on which the labelled retain term did worst. Shipped (β = 0.75): 10/10 (AVX512) and 9/10
# (default) draws pass; c0's `orientation` median rise −0.019 / −0.019 (9 draws each). With the
# labels (β = 0): 8/10 and 5/10; rise +0.097 / +0.211. Bounds: the worst path's pass count less
# one draw, and a rise of at most the bench's closeness tolerance (0.05): every β = 0.75 cell of
# seeds 0–4 had a median rise ≤ +0.058 over 20 draws, both labels cells of seed 3 ≥ +0.097.
# Measured again 3 Dec 2026 (bench-results/heldout-rel/s3-two-*.json, the first 10 of 20 draws):
# AVX512 10/10, AVX2 10/10, default 8/10 — at the bound: draws 8 and 9 fail c0's `orientation`
# forget bound after round 2, identically on main 1df7e91 before the held-out bound's noise term.
# AVX2 was 5/10 before that change: the held-out check failed the round's exact retrain.
# Since `forgotten_task_distillation` 1 (3 Dec 2026, evening; bench-results/inst-rel/s3-two-*.json,
# the first 10 draws): default 10/10 (rise −0.115), AVX512 9/10 (−0.038; draw 0 fails the kept
# `digit` on c1's samples), AVX2 10/10 (+0.000). The rule above gives the same bound, 8/10.
SEQUENTIAL_SEED = 3
SEQUENTIAL_DRAWS = 10
SEQUENTIAL_PASS_FRACTION = 0.8
SEQUENTIAL_MAX_MEDIAN_RISE = 0.05


@pytest.mark.quality
def test_a_later_round_does_not_undo_an_earlier_rounds_forgetting() -> None:
    """The demo's requests in one round each: round 2 (a per-task request on another client) must
    not bring back the client round 1 forgot — what the labelled retain term of Eq. 11 did."""
    result = reliability.run(
        SEQUENTIAL_DRAWS, seed=SEQUENTIAL_SEED, rounds="two", settings={}, method="default"
    )
    rise = result["rise"]
    assert rise["n"] >= SEQUENTIAL_DRAWS // 2, rise  # enough draws published the method's update twice
    assert rise["median"]["orientation"] <= SEQUENTIAL_MAX_MEDIAN_RISE, rise
    assert_distribution(
        "two-round demo draws passing every check",
        [float(r["ok"]) for r in result["results"]],
        passes=[bool(r["ok"]) for r in result["results"]],
        fraction_at_least=SEQUENTIAL_PASS_FRACTION,
    )
