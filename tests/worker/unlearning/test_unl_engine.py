"""engine.prepare / engine.run_round on the toy workload: files, evidence, progress, errors, the
full-data importance computed ahead, per-method anchors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from worker.unlearning import engine
from worker.unlearning.acceptance import Check
from worker.unlearning.adapter_io import load_adapter
from worker.unlearning.engine import (
    EngineInputs,
    ForgetSpec,
    RoundOutcome,
    StageResult,
    anchor_fraction,
    full_importance_settings,
    importance_settings_of_methods,
    prepare,
    run_round,
    run_stage,
)
from worker.unlearning.methods import MethodContext, MethodResult, Needs, register, unregister
from worker.unlearning.ssd import precompute_full_importance
from worker.unlearning.state import RoundState
from worker.unlearning.workloads.toy import ToyWorkload


def _prepare(root: Path, cache_dir: Path | None = None) -> Path:
    """v1 of the toy model under ``root`` (data, base, v1)."""
    prepare(
        ToyWorkload(),
        data_dir=root / "data",
        base_dir=root / "base",
        adapter_dir=root / "v1",
        settings={},
        seed=0,
        cache_dir=cache_dir,
    )
    return root


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return _prepare(tmp_path)


def _round(
    prepared: Path,
    requests: list[ForgetSpec],
    method: str,
    settings: dict[str, Any],
    seed: int = 0,
    **extra: Any,
) -> RoundOutcome:
    """``run_round`` from v1 into v2 of the prepared toy model."""
    return run_round(
        ToyWorkload(),
        data_dir=prepared / "data",
        base_dir=prepared / "base",
        adapter_in=prepared / "v1",
        adapter_out=prepared / "v2",
        requests=requests,
        method=method,
        settings=settings,
        seed=seed,
        **extra,
    )


def test_prepare_writes_base_store_and_v1(prepared: Path) -> None:
    assert sorted(p.name for p in (prepared / "base").iterdir()) == [
        "backbone",
        "heads.safetensors",
        "lethe-model.json",
    ]
    assert sorted(p.name for p in (prepared / "base" / "backbone").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert sorted(p.name for p in (prepared / "v1").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "unlearning_state.json",
    ]
    assert (prepared / "data" / "store.json").exists()


def test_run_round_writes_adapter_and_json_evidence(prepared: Path) -> None:
    progress: list[tuple[int, int, str]] = []
    requests = [
        ForgetSpec("r1", "client", "u1", None, []),
        ForgetSpec("r2", "task", "u2", ["t02000", "t02001"], ["kind"]),
    ]
    outcome = _round(
        prepared,
        requests,
        "original",
        {},
        seed=1,
        on_progress=lambda done, total, msg: progress.append((done, total, msg)),
    )
    assert list(outcome.evidence) == ["r1", "r2"]
    json.dumps(outcome.evidence, allow_nan=True)
    assert outcome.evidence["r1"]["stage"] == 1
    assert outcome.evidence["r2"]["stage"] == 2
    assert outcome.evidence["r2"]["forget_tasks"] == ["kind"]
    assert progress[-1][:2] == (2, 2)
    assert (prepared / "v2" / "adapter_model.safetensors").exists()
    assert outcome.state.forgotten_clients == ["u1"]


def test_unknown_method_is_rejected(prepared: Path) -> None:
    with pytest.raises(KeyError, match="unknown unlearning method"):
        _round(prepared, [ForgetSpec("r1", "client", "u1", None, [])], "no-such-method", {})
    assert not (prepared / "v2").exists()


def test_repeated_request_is_a_no_op(prepared: Path) -> None:
    requests = [ForgetSpec("r1", "client", "u1", None, []), ForgetSpec("r1-again", "client", "u1", None, [])]
    outcome = _round(prepared, requests, "ssd", {})
    again = outcome.evidence["r1-again"]
    assert again["method_info"]["skipped"] == "nothing left to forget"
    assert again["forget_samples"] == 0
    assert again["uis"]["value"] is None
    assert outcome.state.forgotten_clients == ["u1"]
    assert outcome.state.requests == ["r1", "r1-again"]


def test_retrain_method_trains_on_the_retain_set(prepared: Path) -> None:
    outcome = _round(prepared, [ForgetSpec("r1", "client", "u2", None, [])], "retrain", {})
    ev = outcome.evidence["r1"]
    assert ev["method"] == "retrain"
    assert ev["pruned_subset_outputs"] == [2]
    assert ev["partition_sizes"]["retain_set"] == 24  # 3 clients × 12 samples, minus u2's
    assert ev["method_info"]["retain_samples"] == 24
    assert ev["uis"]["value"] is None  # UIS needs a reference retrain: certification's job


def test_no_retrain_reference_on_the_request_path(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No oracle (issue 8): a round never trains a reference retrain of the request it serves. With
    every way to train one made to fail, a round of the default method (no fallback) completes
    exactly as before; the old switch that trained one is refused with a clear error."""
    import worker.unlearning.engine as engine

    spec = [ForgetSpec("r1", "client", "u1", None, [])]
    settings = {"acceptance": {"fallback": "none"}}
    plain = _round(prepared, spec, "default", settings)

    def no_retrain(*args: object, **kwargs: object) -> None:
        raise AssertionError("a retrain was trained on the request path")

    monkeypatch.setattr(engine, "compute_reference", no_retrain)
    monkeypatch.setattr(engine, "reference_retrain", no_retrain)
    monkeypatch.setattr(engine, "retrain", no_retrain)
    guarded = _round(prepared, spec, "default", settings)
    ev, ev_plain = guarded.evidence["r1"], plain.evidence["r1"]
    assert ev["tasks"] == ev_plain["tasks"]
    assert ev["uis"]["value"] is None
    assert ev["reference_metrics"] is None
    assert "certification" in ev["uis"]["reason"]
    with pytest.raises(ValueError, match="retrain_reference"):
        _round(prepared, spec, "default", {"audit": {"retrain_reference": True}})


def _failing_check(*args: object, **kwargs: object) -> list[Check]:
    return [Check("forgotten: forget set, kind", False, "forced failure", margin=-0.1)]


def test_a_failed_acceptance_check_publishes_the_exact_retrain(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNLEARNING.md step 3: an update that fails its acceptance check is replaced by the exact path
    (a retrain on the retain set), and the evidence says which path was published and why."""
    calls, method_fails = _checks_by_call([_failing_check(), [Check("kept", True, "ok", margin=0.1)]])
    monkeypatch.setattr(engine, "check_request", method_fails)
    no_continuation = {"acceptance": {"continue_steps": 0}}
    outcome = _round(prepared, [ForgetSpec("r1", "client", "u1", None, [])], "default", no_continuation)
    accepted = outcome.evidence["r1"]["acceptance"]
    assert accepted["path"] == "retrain"
    assert accepted["passed"] is True
    assert [c["ok"] for c in accepted["method_checks"]] == [False]
    assert "retrain" in accepted["reason"]
    assert "continuation" not in accepted
    assert outcome.evidence["r1"]["timings_s"]["acceptance_fallback_s"] > 0
    assert outcome.evidence["r1"]["timings_s"]["acceptance_continuation_s"] == 0
    assert len(calls) == 2


def _checks_by_call(outcomes: list[list[Check]]) -> tuple[list[str], Any]:
    """A ``check_request`` stand-in answering the n-th call with ``outcomes[n]`` (the last one
    after that), and the list of the models it was called on."""
    calls: list[str] = []

    def check(
        before: object,
        after: torch.nn.Module,
        ctx: object,
        cfg: object,
        before_outputs: object = None,
        allowance: object = None,
    ) -> list[Check]:
        calls.append(type(after).__name__)
        return outcomes[min(len(calls), len(outcomes)) - 1]

    return calls, check


FORGET_FAILS = [Check("forgotten: forget set, kind", False, "above the unseen level", margin=-0.01)]
PASSES = [Check("forgotten: forget set, kind", True, "ok", margin=0.01)]


def _refuse_retrain(*args: object, **kwargs: object) -> None:
    raise AssertionError("the exact path ran")


def test_a_failed_forget_bound_is_continued_before_the_exact_path(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8 part 3: an update that fails only a forget bound goes on with the interference-aware
    stage (a step budget, stopped at the unseen-data level) and is checked again; when that passes,
    the round publishes it and no retrain runs. The evidence says what ran and why."""
    spec = [ForgetSpec("r1", "client", "u1", None, [])]
    _round(prepared, spec, "default", {"acceptance": {"continue_steps": 0, "fallback": "none"}})
    update = _adapter_weights(prepared / "v2")  # the method's update as it is
    calls, check = _checks_by_call([FORGET_FAILS, PASSES])
    monkeypatch.setattr(engine, "check_request", check)
    monkeypatch.setattr(engine, "retrain", _refuse_retrain)
    outcome = _round(prepared, spec, "default", {})
    accepted = outcome.evidence["r1"]["acceptance"]
    assert (accepted["path"], accepted["passed"]) == ("default+continuation", True)
    assert [c["ok"] for c in accepted["method_checks"]] == [False]
    continuation = accepted["continuation"]
    assert [r["request_id"] for r in continuation["runs"]] == ["r1"]
    run = continuation["runs"][0]
    assert 0 < run["steps"] <= 100
    assert run["stopped"] in ("at_unseen_level", "budget")
    assert continuation["settings"]["stop_at_unseen_level"] is True
    assert continuation["settings"]["max_steps"] == 100
    assert "continued" in accepted["reason"]
    timings = outcome.evidence["r1"]["timings_s"]
    assert timings["acceptance_continuation_s"] > 0
    assert timings["acceptance_fallback_s"] == 0
    assert len(calls) == 2  # the update's check, the continuation's
    continued = _adapter_weights(prepared / "v2")
    assert update.keys() == continued.keys()
    assert any(not torch.equal(update[k], continued[k]) for k in update)  # it went on


def _adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_a_continuation_that_still_fails_falls_back_to_the_exact_path(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, check = _checks_by_call([FORGET_FAILS, FORGET_FAILS, PASSES])
    monkeypatch.setattr(engine, "check_request", check)
    outcome = _round(prepared, [ForgetSpec("r1", "client", "u1", None, [])], "default", {})
    accepted = outcome.evidence["r1"]["acceptance"]
    assert (accepted["path"], accepted["passed"]) == ("retrain", True)
    assert [c["ok"] for c in accepted["continuation"]["checks"]] == [False]
    assert [c["ok"] for c in accepted["method_checks"]] == [False]
    timings = outcome.evidence["r1"]["timings_s"]
    assert timings["acceptance_continuation_s"] > 0
    assert timings["acceptance_fallback_s"] > 0
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("method", "failed"),
    [
        ("default", [Check("held-out: kind", False, "fell 9 points", margin=-0.04)]),
        ("default", [*FORGET_FAILS, Check("kept: request's samples, side", False, "fell", margin=-0.1)]),
        ("ssd", FORGET_FAILS),  # no interference-aware stage to continue
    ],
)
def test_no_continuation_where_more_forgetting_cannot_repair_the_failure(
    prepared: Path, monkeypatch: pytest.MonkeyPatch, method: str, failed: list[Check]
) -> None:
    calls, check = _checks_by_call([failed, PASSES])
    monkeypatch.setattr(engine, "check_request", check)
    outcome = _round(prepared, [ForgetSpec("r1", "client", "u1", None, [])], method, {})
    accepted = outcome.evidence["r1"]["acceptance"]
    assert accepted["path"] == "retrain"
    assert "continuation" not in accepted
    assert outcome.evidence["r1"]["timings_s"]["acceptance_continuation_s"] == 0
    assert len(calls) == 2


def test_the_continuation_of_an_earlier_request_trains_on_no_later_requests_data(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a round of two requests, the continuation of the first one runs on retain partitions that
    exclude the second request's samples too (it is forgotten in the same round)."""
    seen: list[tuple[str, set[str]]] = []
    real = engine.apply_method

    def recording(method: str, model: PeftModel, ctx: engine.RequestContext, **kw: Any) -> Any:
        if method == "ia":
            p = ctx.partitions
            ids = {*p.retain_clean.sample_ids, *p.retain_inst.sample_ids, *p.retain_task.sample_ids}
            seen.append((ctx.spec.request_id, ids | set(ctx.retain.sample_ids)))
        return real(method, model, ctx, **kw)

    monkeypatch.setattr(engine, "apply_method", recording)
    first = {"r1": FORGET_FAILS, "r2": PASSES}

    def check(before: object, after: object, ctx: engine.RequestContext, *a: object, **k: object) -> Any:
        return first[ctx.spec.request_id] if not seen else PASSES

    monkeypatch.setattr(engine, "check_request", check)
    requests = [ForgetSpec("r1", "client", "u1", None, []), ForgetSpec("r2", "client", "u2", None, [])]
    outcome = _round(prepared, requests, "default", {})
    assert outcome.evidence["r1"]["acceptance"]["path"] == "default+continuation"
    assert [rid for rid, _ in seen] == ["r1"]
    store = engine.EngineInputs.load(
        ToyWorkload(), data_dir=prepared / "data", base_dir=prepared / "base", settings={}, seed=0
    ).store
    later = set(store.resolve(requests[1]).sample_ids)
    assert later
    assert not (seen[0][1] & later)


def test_the_acceptance_check_reuses_the_round_inputs_outputs(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8 (default's wall on scenes): the acceptance check does not forward the round input
    again where the round already did (the first request's Unl split = its forget set and kept
    rows, and the held-out split every request shares); its checks are equal to the last digit to
    those computed by forwarding, for a per-task and a whole-client request, on the method's path
    and on the fallback's."""
    import worker.unlearning.acceptance as acceptance

    requests = [
        ForgetSpec("r1", "task", "u2", ["t02000", "t02001", "t02002"], ["kind"]),
        ForgetSpec("r2", "client", "u1", None, []),
    ]
    forwarded: list[int] = []
    real = acceptance._scores

    def counting(model: torch.nn.Module, batch: object) -> object:
        forwarded.append(1)
        return real(model, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(acceptance, "_scores", counting)
    reused = _round(prepared, requests, "default", {"acceptance": {"fallback": "none"}})
    n_reused = len(forwarded)
    forwarded.clear()
    monkeypatch.setattr(engine, "before_outputs_of", lambda staged: {})
    plain = _round(prepared, requests, "default", {"acceptance": {"fallback": "none"}})
    assert [reused.evidence[r]["acceptance"] for r in ("r1", "r2")] == [
        plain.evidence[r]["acceptance"] for r in ("r1", "r2")
    ]
    assert reused.evidence["r1"]["acceptance"]["checks"]  # something was checked
    # forwarding: 3 groups × (before, after) per request; reused: r1's 3 and r2's held-out
    assert (len(forwarded), n_reused) == (12, 8)


@pytest.mark.parametrize(("steps", "path"), [(0, "default"), (100, "default+continuation")])
def test_a_failed_check_without_fallback_is_never_silent(
    prepared: Path, monkeypatch: pytest.MonkeyPatch, steps: int, path: str
) -> None:
    import worker.unlearning.engine as engine

    monkeypatch.setattr(engine, "check_request", _failing_check)
    outcome = _round(
        prepared,
        [ForgetSpec("r1", "client", "u1", None, [])],
        "default",
        {"acceptance": {"fallback": "none", "continue_steps": steps}},
    )
    accepted = outcome.evidence["r1"]["acceptance"]
    assert accepted["passed"] is False
    assert accepted["path"] == path
    assert "fails this check" in accepted["warning"]


def test_the_evidence_measures_a_seeded_ret_subset_before_and_after(prepared: Path) -> None:
    """Issue 8 (default's wall on scenes): ``audit.ret_rows`` bounds the Ret rows of the evidence:
    the metrics after the request and ``original_metrics`` before it are measured on the same
    seeded rows (paired), and the evidence records how many of how many and the standard error."""
    spec = [ForgetSpec("r1", "client", "u1", None, [])]
    ev = _round(prepared, spec, "ssd", {"audit": {"ret_rows": 10}}).evidence["r1"]
    full = _round(prepared, spec, "ssd", {"audit": {"ret_rows": 0}}).evidence["r1"]
    rows = ev["ret_rows"]
    assert (rows["measured"], rows["of"], rows["rows"]) == (10, 24, 10)
    assert (full["ret_rows"]["measured"], full["ret_rows"]["of"]) == (24, 24)
    for task in ("kind", "side"):
        assert ev["tasks"][task]["n_ret"] == ev["original_metrics"][task]["n_ret"] == 10
        assert full["tasks"][task]["n_ret"] == 24
        assert rows["tasks"][task]["ret_se"] > 0 == full["ret_rows"]["tasks"][task]["ret_se"]
    assert ev["tasks"]["kind"]["unl"] == full["tasks"]["kind"]["unl"]  # Unl / Val: every row
    # the subset is drawn as the logistic attacker draws its retained rows: with as many rows as
    # the attacker takes, it sees the rows it saw before
    same = {"attacker_max_retain": 10}
    sub = _round(prepared, spec, "ssd", {"audit": {"ret_rows": 10, **same}}).evidence["r1"]
    everything = _round(prepared, spec, "ssd", {"audit": {"ret_rows": 0, **same}}).evidence["r1"]
    assert sub["attacker"] == everything["attacker"]
    assert sub["attacker"]["n_retain"] == 10
    with pytest.raises(ValueError, match="ret_rows"):
        _round(prepared, spec, "ssd", {"audit": {"ret_rows": -1}})


def test_next_requests_importance_is_computed_ahead_and_read_from_the_cache(tmp_path: Path) -> None:
    """With a cache, ``prepare`` computes v1's I_D and every request the next one's, timed apart:
    each request of the round then reads its I_D from the cache (the same numbers as computing it
    on the spot: SSD's selection is identical without the cache)."""
    _prepare(tmp_path, cache_dir=tmp_path / "cache")
    requests = [ForgetSpec("r1", "client", "u1", None, []), ForgetSpec("r2", "task", "u2", None, ["kind"])]
    settings: dict[str, object] = {}
    cached = _round(tmp_path, requests, "default", settings, cache_dir=tmp_path / "cache")
    on_the_spot = _round(tmp_path, requests, "default", settings)
    for rid in ("r1", "r2"):
        ev, plain = cached.evidence[rid], on_the_spot.evidence[rid]
        assert ev["method_info"]["ssd"]["cache_hit"] is True
        assert plain["method_info"]["ssd"]["cache_hit"] is False
        assert ev["method_info"]["ssd"]["selected"] == plain["method_info"]["ssd"]["selected"]
        assert ev["timings_s"]["importance_precompute_s"] > 0.0  # for the next request / version
        assert plain["timings_s"]["importance_precompute_s"] == 0.0  # no cache: nothing ahead


def test_the_engine_computes_ahead_the_importance_a_methods_spec_declares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 7 part 6: what a method needs is declared in its spec, not named in the engine. A
    throwaway method declaring that it reads the full-data importance with its own SSD settings
    gets it computed ahead: for v1 by ``prepare``, and after its request for the next one."""
    import worker.unlearning.engine as engine

    own = {"batch_size": 5, "layout": "merged"}
    seen: list[dict[str, Any]] = []
    real = precompute_full_importance

    def spy(model: torch.nn.Module, data: Any, tasks: Any, settings: Any, **kwargs: Any) -> Any:
        seen.append(dict(settings))
        return real(model, data, tasks, settings, **kwargs)

    monkeypatch.setattr(engine, "precompute_full_importance", spy)

    @register("throwaway_importance", needs=Needs(full_importance=lambda settings: own))
    def throwaway(ctx: MethodContext) -> MethodResult:
        return MethodResult(model=ctx.model)

    try:
        assert full_importance_settings("throwaway_importance", {}) == own
        assert own in importance_settings_of_methods({})
        _prepare(tmp_path, cache_dir=tmp_path / "cache")
        assert own in seen  # v1's, by prepare
        seen.clear()
        spec = [ForgetSpec("r1", "client", "u1", None, [])]
        outcome = _round(tmp_path, spec, "throwaway_importance", {}, cache_dir=tmp_path / "cache")
        assert seen == [own]  # the next request's, after this one
        assert outcome.evidence["r1"]["timings_s"]["importance_precompute_s"] > 0.0
        assert outcome.next_importance is None
        # the worker's way: not in the round, but returned to run once the version is published
        seen.clear()
        deferred = _round(
            tmp_path,
            spec,
            "throwaway_importance",
            {},
            cache_dir=tmp_path / "cache",
            defer_next_importance=True,
        )
        assert seen == []
        assert deferred.evidence["r1"]["next_importance"] == "computed after publishing"
        assert deferred.next_importance is not None
        assert deferred.next_importance() > 0.0
        assert seen == [own]
    finally:
        unregister("throwaway_importance")
    assert full_importance_settings("original", {}) is None


def test_anchor_fraction_per_method(prepared: Path) -> None:
    settings = {"anchor_fraction": 0.25, "anchor_fractions": {"ia": 1.0}}
    assert anchor_fraction(settings, "ia") == 1.0
    assert anchor_fraction(settings, "ssd") == 0.25
    assert anchor_fraction({}, "ia") == 0.1
    spec = [ForgetSpec("r1", "client", "u1", None, [])]
    full = _round(prepared, spec, "ia", settings)
    ev = full.evidence["r1"]
    assert ev["anchor"]["fraction"] == 1.0
    assert ev["anchor"]["size"] == ev["partition_sizes"]["retain_set"]  # every retained instance


def test_run_round_reports_its_stages_in_order(prepared: Path) -> None:
    """Issue 10 part 3: ``on_stage`` sees each request's partitions, SSD and update epochs (k of n),
    then the round's acceptance check and the audit of each request (the worker records them)."""
    reports: list[tuple[str, int, int]] = []
    requests = [
        ForgetSpec("r1", "client", "u1", None, []),
        ForgetSpec("r2", "task", "u2", ["t02000", "t02001"], ["kind"]),
    ]
    _round(
        prepared,
        requests,
        "default",
        {"ia": {"epochs": 2, "early_stopping": False}},
        on_stage=lambda stage, step, of: reports.append((stage, step, of)),
    )
    stages = [s for i, (s, _, _) in enumerate(reports) if i == 0 or reports[i - 1][0] != s]
    assert stages == ["partitions", "ssd", "update", "partitions", "ssd", "update", "acceptance", "audit"]
    assert [r for r in reports if r[0] in ("partitions", "audit")] == [
        ("partitions", 1, 2),
        ("partitions", 2, 2),
        ("audit", 1, 2),
        ("audit", 2, 2),
    ]
    assert [r for r in reports if r[0] == "update"] == [("update", 1, 2), ("update", 2, 2)] * 2


def test_run_stage_runs_one_request_and_advances_the_state(prepared: Path) -> None:
    """``run_stage``, the one stage of a round and of the benchmark: the request's context and the
    model's metrics before it, the method's update, the state advanced in place; a repeated
    request is skipped (nothing left to forget) and computes nothing ahead."""
    inputs = EngineInputs.load(
        ToyWorkload(), data_dir=prepared / "data", base_dir=prepared / "base", settings={}, seed=0
    )
    model = load_adapter(inputs.base, prepared / "v1", trainable=True)
    state = RoundState.load(prepared / "v1")
    spec = ForgetSpec("r1", "client", "u1", None, [])
    model, first = run_stage(
        inputs, model, spec, state, method="ssd", stage=1, cache_key=None, precompute_next=False
    )
    assert first.ctx.state.forgotten_clients == []  # the context holds the state before the request
    assert (state.forgotten_clients, state.requests) == (["u1"], ["r1"])
    assert state.pruned_subset_outputs == first.pruned
    assert not first.nothing_left
    assert set(first.timings) == {"partitions_s", "method_s", "importance_precompute_s"}
    assert set(first.original.tasks) == {"kind", "side"}
    _, again = run_stage(
        inputs, model, spec, state, method="ssd", stage=2, cache_key=None, precompute_next=True
    )
    assert again.nothing_left
    assert again.info["skipped"] == "nothing left to forget"
    assert (again.next_cache_key, again.timings["importance_precompute_s"]) == (None, 0.0)
    assert state.requests == ["r1", "r1"]


def test_the_round_runs_each_request_through_run_stage(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 7 part 6: one stage loop. ``run_round`` runs each request through ``engine.run_stage``,
    as the benchmark does (tests/bench/test_quality.py; it had a copy of the round's loop)."""
    calls: list[tuple[str, str]] = []

    def spy(*args: Any, **kwargs: Any) -> tuple[PeftModel, StageResult]:
        calls.append((args[2].request_id, kwargs["method"]))
        return run_stage(*args, **kwargs)

    monkeypatch.setattr(engine, "run_stage", spy)
    requests = [ForgetSpec("r1", "client", "u1", None, []), ForgetSpec("r2", "client", "u2", None, [])]
    _round(prepared, requests, "ssd", {})
    assert calls == [("r1", "ssd"), ("r2", "ssd")]
