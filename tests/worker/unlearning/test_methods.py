"""The methods registry and the built-in methods on a toy peft model."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.worker.unlearning.toy_nets import toy_batch, toy_model
from worker.unlearning.interference import IAConfig, check_accuracy
from worker.unlearning.lora import trainable_head
from worker.unlearning.methods import (
    MethodContext,
    MethodResult,
    Needs,
    available_methods,
    get_method,
    get_spec,
    register,
    run_method,
    unregister,
)
from worker.unlearning.methods.default import ssd_stage_settings
from worker.unlearning.pruning import is_pruned
from worker.unlearning.types import SUBSET_HEAD, Batch, ClassificationTask, Partitions, concat_batches

TASKS = [ClassificationTask("a", 3), ClassificationTask("b", 2)]


def _model() -> nn.Module:
    return toy_model(hidden=6, rank=4, num_subsets=3)


def _batch(n: int, seed: int, tasks: list[str], subset: int = 0) -> Batch:
    return toy_batch(n, seed, tasks, subset=subset)


def _ctx(model: nn.Module, settings: Mapping[str, Any], tmp: Path | None = None) -> MethodContext:
    parts = Partitions(
        forget=_batch(8, 1, ["a", "b"], subset=1),
        retain_task=_batch(0, 1, []),
        retain_inst=_batch(8, 2, ["a", "b"]),
        retain_clean=_batch(0, 2, []),
        forget_tasks=["a", "b"],
        retain_tasks=[],
        anchor_sample_ids=[],
    )
    retain = _batch(24, 2, ["a", "b"])
    return MethodContext(
        model=model,
        tasks=TASKS,
        partitions=parts,
        full=concat_batches([retain, parts.forget]),
        heldout=_batch(10, 3, ["a", "b"]),
        settings=settings,
        seed=0,
        prune_outputs=[1],
        pruned_outputs=[0],
        cache_dir=tmp,
        cache_key="v1digest" if tmp is not None else None,
        retain=retain,
    )


def test_registry_lookup_and_duplicates() -> None:
    assert {"original", "ssd", "ia", "default"} <= set(available_methods())
    with pytest.raises(KeyError, match="unknown unlearning method"):
        get_method("no-such-method")

    def other(ctx: MethodContext) -> MethodResult:
        return MethodResult(model=ctx.model)

    with pytest.raises(ValueError, match="already registered"):
        register("ssd")(other)


def test_a_methods_declared_needs_are_checked_before_it_runs() -> None:
    """Issue 7 part 6: a method's spec declares what it needs (here the retain set and the frozen
    base); ``run_method`` refuses a context without them before the method runs."""
    ran: list[str] = []

    @register("throwaway_needs", needs=Needs(retain=True, base=True))
    def throwaway(ctx: MethodContext) -> MethodResult:
        ran.append("ran")
        return MethodResult(model=ctx.model)

    try:
        assert get_spec("throwaway_needs").needs == Needs(retain=True, base=True)
        ctx = _ctx(_model(), {})
        with pytest.raises(ValueError, match="throwaway_needs needs the frozen base network"):
            run_method("throwaway_needs", ctx)
        with pytest.raises(ValueError, match="needs the retain set and the frozen base network"):
            run_method("throwaway_needs", dataclasses.replace(ctx, retain=None))
        assert ran == []
        run_method("throwaway_needs", dataclasses.replace(ctx, base=_model()))
        assert ran == ["ran"]
    finally:
        unregister("throwaway_needs")
    assert "throwaway_needs" not in available_methods()
    assert get_spec("retrain").needs == Needs(retain=True, base=True)


def test_original_is_a_no_op() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    result = get_method("original")(_ctx(model, {}))
    assert result.model is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.pruned_outputs == []


def test_default_runs_ssd_then_ia_then_prunes(tmp_path: Path) -> None:
    settings = {"ssd": {"alpha": 1.0}, "ia": {"lr": 1e-2, "epochs": 2, "batch_size": 4}}
    model = _model()
    result = get_method("default")(_ctx(model, settings, tmp_path))
    assert result.info["stages"] == {"ssd": True, "ia": True, "prune": True}
    assert result.info["ssd"]["selected"] > 0
    assert result.info["ia"]["epochs_run"] == 2
    assert result.pruned_outputs == [1]
    assert is_pruned(model, 1)
    assert is_pruned(model, 0)  # earlier rounds' outputs re-applied
    assert not is_pruned(model, 2)
    assert list(tmp_path.glob("importance-v1digest-*.safetensors"))  # I_D cached for the adapter
    # SSD alone through the stage switches equals the ssd method given the stage's D layout, order
    # and normalisation (the ssd method's defaults are the reference's: test_ssd.py)
    m1, m2 = _model(), _model()
    same = {**settings, "ssd": {"alpha": 1.0, "layout": "merged", "shuffle": True, "normalise": "pair"}}
    get_method("default")(_ctx(m1, {**settings, "default": {"ia": False, "prune": False}}))
    get_method("ssd")(_ctx(m2, same))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))
    assert not is_pruned(m1, 1)


def test_ia_method_leaves_subset_head_alone_and_rejects_unknown_settings() -> None:
    model = _model()
    head = trainable_head(model, SUBSET_HEAD).weight.detach().clone()
    get_method("ia")(_ctx(model, {"ia": {"epochs": 1, "lr": 1e-2}}))
    assert torch.equal(trainable_head(model, SUBSET_HEAD).weight.detach(), head)
    with pytest.raises(ValueError, match="unknown default-method setting 'finetune'"):
        get_method("default")(_ctx(_model(), {"default": {"finetune": True}}))


def test_default_stage_settings_merge_over_the_methods_own() -> None:
    settings = {"ssd": {"alpha": 2.0}, "ia": {"epochs": 1, "lr": 1e-2}, "default": {"ssd": {"lambda": 5}}}
    result = get_method("default")(_ctx(_model(), settings))
    assert result.info["ssd"]["config"]["alpha"] == 2.0  # from settings["ssd"]
    assert result.info["ssd"]["config"]["lam"] == 5.0  # default's SSD stage only
    alone = get_method("ssd")(_ctx(_model(), settings))
    assert alone.info["ssd"]["config"]["lam"] == 1.0  # the ssd method keeps the library default
    assert ssd_stage_settings(settings) == {"alpha": 2.0, "lambda": 5}
    assert ssd_stage_settings({"default": {"ssd": False}}) is None
    with pytest.raises(ValueError, match="default-method setting 'prune'"):
        get_method("default")(_ctx(_model(), {"default": {"prune": {"on": True}}}))


def test_default_measures_the_retain_baseline_before_ssd() -> None:
    """With a retain tolerance, the accuracy SSD costs the retain rows counts against it: the
    baseline is the model before the request, not after the dampening."""
    ia = {"epochs": 1, "lr": 1e-3, "retain_tolerance": 0.0}
    settings = {"ssd": {"alpha": 0.0, "lambda": 0.0}, "ia": ia}
    model = _model()
    before = check_accuracy(model, TASKS, _ctx(model, settings).partitions, IAConfig(), seed=0)
    result = get_method("default")(_ctx(model, settings))
    assert result.info["ia"]["retain_baseline"] == before.accuracy
    assert result.info["ia"]["history"][0]["retain_accuracy"] != before.accuracy  # SSD (zeroing) changed it
