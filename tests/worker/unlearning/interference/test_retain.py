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
    retain_level,
    retain_noise,
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


def test_retain_level_keeps_the_per_row_scores_behind_each_accuracy() -> None:
    parts = partial_partitions()
    check = retain_check(parts, size=256, seed=0)
    gen = torch.Generator().manual_seed(0)
    outputs = {task: torch.randn(len(check), k, generator=gen) for task, k in (("a", 3), ("b", 2))}
    level = retain_level(TASKS, outputs, check, parts.forget.sample_ids)
    assert level.accuracy == retain_accuracy(TASKS, outputs, check, parts.forget.sample_ids)
    assert set(level.rows) == set(level.accuracy)
    for key, rows in level.rows.items():
        assert float(rows.mean()) == pytest.approx(level.accuracy[key])
    assert len(level.rows[f"b{KEPT_OF_FORGOTTEN}"]) == len(parts.retain_task)


def test_the_retain_gate_s_noise_is_z_standard_errors_of_the_paired_change() -> None:
    """``ia.retain_noise_z``: 256 rows, 20 turned wrong and 6 turned right (a net drop of 14 rows,
    0.0547, the drop that discarded the scenes checkpoint): the per-row differences' standard
    deviation / 16 is 0.0197, so z = 2 allows 0.0393 more than the tolerance; rows that did not
    change allow nothing, and z = 0 is the tolerance alone."""
    before = torch.ones(256)
    before[:10] = 0.0
    after = before.clone()
    after[10:30] = 0.0  # 20 right -> wrong
    after[:6] = 1.0  # 6 wrong -> right
    diff = after - before
    se = float(diff.std() / 16)
    assert se == pytest.approx(0.0197, abs=1e-4)
    noise = retain_noise({"a": before, "b": before}, {"a": after, "b": before}, z=2.0)
    assert noise["a"] == pytest.approx(2 * se)
    assert noise["b"] == 0.0
    assert retain_noise({"a": before}, {"a": after}, z=0.0) == {}
    assert retain_noise({"a": before}, {"a": after[:100]}, z=2.0) == {}  # not the same rows: none
    acc, base = {"a": float(after.mean()), "b": 1.0}, {"a": float(before.mean()), "b": 1.0}
    assert retain_drop(acc, base) == pytest.approx(14 / 256)
    assert retain_drop(acc, base, noise=noise) == pytest.approx(14 / 256 - 2 * se)
