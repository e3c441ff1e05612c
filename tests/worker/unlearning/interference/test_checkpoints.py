"""Early stopping: the kept checkpoint, within the retain tolerance."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.worker.unlearning.interference.toy import (
    TASKS,
    empty_batch,
    ia_batch,
    ia_model,
    partial_partitions,
)
from worker.unlearning.interference.checkpoints import (
    Monitor,
    checkpoint_heldout,
    past_target,
    select_checkpoint,
)
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.targets import ReferenceTarget
from worker.unlearning.interference.update import interference_aware_unlearn
from worker.unlearning.types import Partitions


def _checkpoints(*rows: tuple[float | None, float]) -> list[dict[str, object]]:
    return [{"epoch": i, "distance": d, "retain_drop": drop} for i, (d, drop) in enumerate(rows)]


def _twin_partitions() -> Partitions:
    """A forget set whose retain rows are its twins (the same inputs under other ids): ascent on
    D_f costs them accuracy."""
    forget = ia_batch(12, 1, ["a"])
    twins = dataclasses.replace(forget, sample_ids=[f"twin-{i}" for i in range(12)])
    return Partitions(
        forget=forget,
        retain_task=empty_batch(),
        retain_inst=twins,
        retain_clean=empty_batch(),
        forget_tasks=["a"],
        retain_tasks=["b"],
        anchor_sample_ids=twins.sample_ids,
    )


def test_checkpoint_selection_keeps_the_mia_closest_within_the_retain_tolerance() -> None:
    history = _checkpoints((0.30, 0.00), (0.20, 0.02), (0.05, 0.09), (0.10, 0.04))
    assert select_checkpoint(history, 1.0) == 2  # off: the paper's rule, MIA-closest
    assert select_checkpoint(history, 0.05) == 3  # epoch 2 lost 0.09 retain accuracy
    assert select_checkpoint(history, 0.03) == 1
    assert select_checkpoint(history, 0.0) == 0
    # none within the tolerance: the least damaged one; ties on the drop go to the MIA-closer
    assert select_checkpoint(_checkpoints((0.3, 0.20), (0.1, 0.08), (0.05, 0.08)), 0.05) == 2
    # no MIA at all (no forgotten task left): the earliest
    assert select_checkpoint(_checkpoints((None, 0.0), (None, 0.0)), 0.05) == 0


def test_the_retain_gate_reads_the_drop_less_its_noise_where_recorded() -> None:
    """``ia.retain_noise_z``: a checkpoint's ``retain_gate`` (its drop less the check rows' noise)
    is what the tolerance judges; ``retain_drop`` stays the drop as measured."""
    history = _checkpoints((0.30, 0.0), (0.05, 0.0547))
    assert select_checkpoint(history, 0.05) == 0  # 14 of 256 rows: over the tolerance alone
    history[1]["retain_gate"] = 0.0547 - 0.0393
    assert select_checkpoint(history, 0.05) == 1
    history[1]["retain_gate"] = 0.051  # noise too small to explain it
    assert select_checkpoint(history, 0.05) == 0
    # none within the gate: the least damaged as measured, not the one with the most noise
    # allowance (which grows with how many rows changed)
    history = _checkpoints((0.30, 0.20), (0.05, 0.30))
    history[0]["retain_gate"], history[1]["retain_gate"] = 0.16, 0.15
    assert select_checkpoint(history, 0.05) == 0


def test_retain_noise_z_keeps_a_checkpoint_whose_drop_is_within_the_rows_noise() -> None:
    """End to end through the update: the same run with z = 0 and z = 2 measures the same drops,
    and z = 2 records a gate below each nonzero drop and keeps a later checkpoint."""
    parts = _twin_partitions()
    torch.manual_seed(2)
    model = ia_model()
    runs = {}
    for z in (0.0, 2.0):
        cfg = IAConfig(lr=0.1, eta1=0.0, eta2=1.0, epochs=6, batch_size=12, orth_inst=False, projection=False,
                       retain_tolerance=0.1, check_size=64, retain_noise_z=z, patience=0)  # fmt: skip
        runs[z] = interference_aware_unlearn(
            copy.deepcopy(model), tasks=TASKS, partitions=parts, heldout=ia_batch(10, 7, ["a", "b"]), cfg=cfg,
            mia_target=0.0,
        )  # fmt: skip
    drops = [[h["retain_drop"] for h in runs[z]["history"]] for z in (0.0, 2.0)]
    assert drops[0] == drops[1]
    assert [h["retain_gate"] for h in runs[0.0]["history"]] == drops[0]
    assert any(d > 0.1 for d in drops[0])  # the tolerance alone binds somewhere
    for h in runs[2.0]["history"]:
        assert h["retain_gate"] < h["retain_drop"] or h["retain_drop"] <= 0
    # on 12 rows a drop of 2 is within 2 SE of the paired change: z = 2 keeps a later checkpoint
    assert runs[2.0]["best_epoch"] > runs[0.0]["best_epoch"]
    assert runs[2.0]["history"][runs[2.0]["best_epoch"]]["retain_drop"] > 0.1


def test_retain_tolerance_keeps_no_checkpoint_that_lost_more_retain_accuracy() -> None:
    """The retain rows are twins of the forget rows, and the stages that would protect them are
    off: ascent on D_f costs them accuracy. The paper's rule keeps the most forgetting checkpoint;
    with the tolerance, the kept one lost at most that much (here: none, epoch 0)."""
    parts = _twin_partitions()
    torch.manual_seed(2)  # ia_model's network init (one where the ascent costs the twins accuracy)
    model = ia_model()
    kept = {}
    for tolerance in (0.5, 0.1):
        cfg = IAConfig(lr=0.1, eta1=0.0, eta2=1.0, epochs=6, batch_size=12, orth_inst=False, projection=False,
                       retain_tolerance=tolerance, check_size=64)  # fmt: skip
        info = interference_aware_unlearn(
            copy.deepcopy(model), tasks=TASKS, partitions=parts, heldout=ia_batch(10, 7, ["a", "b"]), cfg=cfg,
            mia_target=0.0,
        )  # fmt: skip
        kept[tolerance] = info["history"][info["best_epoch"]]
        assert info["retain_baseline"] == info["history"][0]["retain_accuracy"]
    assert kept[0.5]["retain_drop"] > 0.1  # the paper's choice lost retain accuracy
    assert kept[0.1]["retain_drop"] <= 0.1
    assert kept[0.1]["distance"] > kept[0.5]["distance"]  # at the price of less forgetting


def test_checkpoint_heldout_is_a_seeded_subset_in_order_and_idempotent() -> None:
    """Issue 8 (default's wall on scenes): ``ia.checkpoint_heldout_rows`` bounds the held-out rows
    every checkpoint forwards; the subset is seeded, keeps the split's order and is drawn once."""
    heldout = ia_batch(20, 7, ["a", "b"])
    sub = checkpoint_heldout(heldout, 6, seed=3)
    assert len(sub) == 6
    assert sub.sample_ids == checkpoint_heldout(heldout, 6, seed=3).sample_ids  # seeded
    assert sub.sample_ids != checkpoint_heldout(heldout, 6, seed=4).sample_ids
    positions = [heldout.sample_ids.index(s) for s in sub.sample_ids]
    assert positions == sorted(positions)
    assert torch.equal(sub.inputs["x"], heldout.inputs["x"][positions])
    assert checkpoint_heldout(sub, 6, seed=9).sample_ids == sub.sample_ids  # idempotent
    assert checkpoint_heldout(heldout, 0, seed=3) is heldout  # 0: all
    assert checkpoint_heldout(heldout, 20, seed=3) is heldout


def test_every_checkpoint_measures_the_same_bounded_heldout_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoints' forget-vs-held-out statistics are measured on ``checkpoint_heldout_rows``
    seeded held-out rows, the same at every checkpoint of the request, and the info says how many
    of how many."""

    seen: list[list[str]] = []
    real = Monitor.__call__

    def spy(self: Monitor, model: torch.nn.Module) -> object:
        seen.append(list(self.heldout.sample_ids))
        return real(self, model)

    monkeypatch.setattr(Monitor, "__call__", spy)
    heldout = ia_batch(30, 7, ["a", "b"])
    cfg = IAConfig(lr=0.05, epochs=3, batch_size=6, checkpoint_heldout_rows=8)
    info = interference_aware_unlearn(
        ia_model(), tasks=TASKS, partitions=partial_partitions(), heldout=heldout, cfg=cfg, seed=5
    )
    assert info["heldout_rows"] == {"measured": 8, "of": 30}
    assert len(seen) == info["epochs_run"] + 1 >= 2
    assert all(ids == checkpoint_heldout(heldout, 8, seed=5).sample_ids for ids in seen)
    with pytest.raises(ValueError, match="checkpoint_heldout_rows"):
        IAConfig.from_settings({"checkpoint_heldout_rows": -1})


def test_a_task_is_past_its_reference_target_only_when_accuracy_and_auc_are_both_below_it() -> None:
    reference = ReferenceTarget(
        mia_auc={"a": 0.40, "b": 0.40}, accuracy={"a": 0.50, "b": 0.50}, accuracy_gap={"a": 0.0, "b": 0.0}
    )

    def entry(auc: dict[str, float], acc: dict[str, float]) -> dict[str, object]:
        return {"mia_auc": auc, "forget_accuracy": acc, "heldout_accuracy": {}}

    both_below = entry({"a": 0.30, "b": 0.30}, {"a": 0.40, "b": 0.60})
    assert past_target(both_below, 0.5, 0.5, reference) == {"a"}  # b's accuracy is still above
    assert past_target(entry({"a": 0.45}, {"a": 0.10}), 0.5, 0.5, reference) == frozenset()
    # without references: the AUC against the constant target (per task where it is a mapping)
    assert past_target(both_below, 0.5, 0.5) == {"a", "b"}
    assert past_target(both_below, {"a": 0.2}, 0.5) == {"b"}
