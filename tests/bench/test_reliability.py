"""``python -m bench reliability``: the demo's requests through the engine, one anchor draw."""

from __future__ import annotations

from bench import reliability


def test_one_draw_reports_every_check_and_the_settings_it_ran_with() -> None:
    result = reliability.run(1, seed=0, rounds="two", settings={"ia": {"epochs": 2}}, method="default")
    assert result["trials"] == 1
    assert result["rounds"] == "two"
    # the overrides, and what the engine ran with: the workload's defaults with them merged over
    assert result["settings"] == {"ia": {"epochs": 2}}
    effective = result["effective_settings"]
    assert effective["ia"]["epochs"] == 2
    assert effective["default"]["ia"]["retain_distillation"] == 0.75  # digits' default's (not the paper's 0)
    (draw,) = result["results"]
    assert [c["what"] for c in draw["checks"]] == [s["check"] for s in result["summary"]]
    assert len(draw["checks"]) == 6
    assert result["passed"] == int(draw["ok"]) == int(all(c["ok"] for c in draw["checks"]))
    # one round per request: each request's evidence says which path was published
    assert set(draw["requests"]) == {"client-0", "task-0"}
    assert all(r["path"] in ("default", "retrain") for r in draw["requests"].values())
    assert {"torch", "cpu_capability", "threads"} <= set(result["environment"])
