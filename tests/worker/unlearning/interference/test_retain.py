"""The retain check rows and the accuracy on each of their sources."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.worker.unlearning.interference.toy import TASKS, ia_batch, partial_partitions
from worker.unlearning.audit import merge_rows
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.retain import (
    KEPT_OF_FORGOTTEN,
    retain_accuracy,
    retain_check,
    retain_drop,
)
from worker.unlearning.types import IGNORE, concat_batches


def test_retain_check_merges_the_retain_partitions_per_sample() -> None:
    parts = partial_partitions()  # retain_inst / retain_clean: the same 8 samples, tasks a / b
    check = retain_check(parts, size=256, seed=0)
    assert len(check) == 8 + 6  # 8 anchor samples (both labels) + 6 X_f samples (task b)
    anchor = check.select(torch.tensor([i for i, s in enumerate(check.sample_ids) if s.startswith("2-")]))
    assert bool((anchor.labels["a"] != IGNORE).all())
    assert bool((anchor.labels["b"] != IGNORE).all())
    # ``size`` bounds the retained instances; X_f's kept tasks are always all there
    small = retain_check(parts, size=5, seed=0)
    assert sum(s.startswith("2-") for s in small.sample_ids) == 5
    assert [s for s in small.sample_ids if s.startswith("1-")] == parts.retain_task.sample_ids
    assert len(retain_check(parts, size=0, seed=0)) == 0


def test_retain_check_outside_the_anchor_takes_the_rows_the_update_does_not_see() -> None:
    parts = dataclasses.replace(partial_partitions(), anchor_sample_ids=[f"2-{i}" for i in range(8)])
    retain = concat_batches([merge_rows(concat_batches([parts.retain_inst, parts.retain_clean])),
                             ia_batch(5, 3, ["a", "b"]), parts.retain_task])  # fmt: skip
    check = retain_check(parts, size=256, seed=0, retain=retain, rows="outside_anchor")
    assert sorted(check.sample_ids) == sorted([f"3-{i}" for i in range(5)] + parts.retain_task.sample_ids)
    with pytest.raises(ValueError, match="needs the retain set"):
        retain_check(parts, size=256, seed=0, rows="outside_anchor")
    with pytest.raises(ValueError, match="check_rows"):
        IAConfig.from_settings({"check_rows": "everything"})


def test_retain_accuracy_reports_the_kept_tasks_of_the_forgotten_samples_on_their_own() -> None:
    """A per-task request's promise (X_f keeps its other tasks) is checked on X_f's rows alone, so
    that losing it cannot hide in the anchor's average."""
    parts = partial_partitions()
    check = retain_check(parts, size=256, seed=0)
    on_xf = torch.tensor([s in set(parts.forget.sample_ids) for s in check.sample_ids])
    # outputs right on every anchor row, wrong on every X_f row
    outputs = {}
    for task, k in (("a", 3), ("b", 2)):
        y = check.labels[task].clamp(min=0)
        right = torch.nn.functional.one_hot(y, k).float()
        outputs[task] = torch.where(on_xf[:, None], right.roll(1, dims=1), right)
    acc = retain_accuracy(TASKS, outputs, check, parts.forget.sample_ids)
    assert acc == {"a": 1.0, "b": 1.0, f"b{KEPT_OF_FORGOTTEN}": 0.0}
    assert retain_drop(acc, {"a": 1.0, "b": 1.0, f"b{KEPT_OF_FORGOTTEN}": 1.0}) == 1.0
