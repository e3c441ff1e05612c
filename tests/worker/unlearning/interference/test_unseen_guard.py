"""The unseen-data guard (``ia.unseen_guard``): which held-out rows it reads, and that the forget
term it leaves is orthogonal to each forgotten task's held-out gradient."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from tests.worker.unlearning.interference.toy import (
    TASKS,
    head_a_layout,
    ia_batch,
    ia_model,
    partial_partitions,
)
from worker.unlearning.grads import partition_task_grads
from worker.unlearning.interference import update
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.orthogonalisation import segment_dot
from worker.unlearning.interference.unseen_guard import guard_rows, scoring_rows
from worker.unlearning.interference.update import _direction, interference_aware_unlearn
from worker.unlearning.types import Batch, is_supervised


def test_the_guard_and_the_scoring_rows_split_the_heldout_rows() -> None:
    heldout = ia_batch(9, 3, ["a", "b"])
    guard, rest = guard_rows(heldout), scoring_rows(heldout)
    assert guard.sample_ids == heldout.sample_ids[0::2]
    assert rest.sample_ids == heldout.sample_ids[1::2]
    assert len(guard) + len(rest) == len(heldout)
    assert torch.equal(rest.labels["a"], heldout.labels["a"][1::2])


def test_the_guarded_forget_term_is_orthogonal_to_its_tasks_heldout_gradient() -> None:
    model = ia_model()
    layout = head_a_layout(model)
    flat = torch.randn(5, 2, layout.size, dtype=torch.float64)
    flat[0, 1] = 0.0  # task "b" is kept: only "a" has a forget gradient
    cfg = IAConfig(projection=False, eta1=0.0, eta2=1.0, epsilon=0.0)
    guarded, _ = _direction(flat, layout, None, cfg, cfg.retain_switches)
    plain, _ = _direction(flat[:4], layout, None, cfg, cfg.retain_switches)

    def dots(d: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
        return segment_dot(d, along, layout.segments, layout.n_segments)

    zero = torch.zeros(layout.n_segments, dtype=torch.float64)
    heldout_a = flat[4, 0]
    assert torch.allclose(dots(guarded, heldout_a), zero, atol=1e-8)
    assert float(dots(plain, heldout_a).abs().max()) > 1e-3  # without the guard it is not
    for k in range(1, 4):  # still orthogonal to every retain partition's gradient
        assert torch.allclose(dots(guarded, flat[k].sum(0)), zero, atol=1e-8)


def _relabel(batch: Batch, positions: slice) -> Batch:
    labels = {k: v.clone() for k, v in batch.labels.items()}
    labels["a"][positions] = (labels["a"][positions] + 1) % 3
    return Batch(inputs=batch.inputs, labels=labels, subset=batch.subset, sample_ids=batch.sample_ids)


def test_the_update_differentiates_the_guard_rows_and_never_the_scoring_rows() -> None:
    parts = partial_partitions()
    heldout = ia_batch(12, 7, ["a", "b"])
    # no early stopping: the checkpoints' held-out measurements cannot change which model is kept
    cfg = IAConfig.from_settings(
        {"lr": 5e-2, "epochs": 3, "batch_size": 4, "early_stopping": False, "unseen_guard": True}
    )
    start = ia_model()

    def updated(rows: Batch, config: IAConfig = cfg) -> list[torch.Tensor]:
        model = copy.deepcopy(start)
        info = interference_aware_unlearn(
            model, tasks=TASKS, partitions=parts, heldout=rows, cfg=config, seed=0
        )
        assert info["heldout_rows"].get("guard") == (6 if config.unseen_guard else None)
        return [p.detach().clone() for p in model.parameters()]

    base = updated(heldout)
    same = updated(_relabel(heldout, slice(1, None, 2)))  # the scoring rows' labels changed
    assert all(torch.equal(p, q) for p, q in zip(base, same, strict=True))
    moved = updated(_relabel(heldout, slice(0, None, 2)))  # the guard rows' labels changed
    assert not all(torch.equal(p, q) for p, q in zip(base, moved, strict=True))
    unguarded = updated(heldout, IAConfig.from_settings({**cfg.to_json(), "unseen_guard": False}))
    assert not all(torch.equal(p, q) for p, q in zip(base, unguarded, strict=True))


def _relabel_kept(batch: Batch, positions: slice) -> Batch:
    labels = {k: v.clone() for k, v in batch.labels.items()}
    labels["b"][positions] = (labels["b"][positions] + 1) % 3
    return Batch(inputs=batch.inputs, labels=labels, subset=batch.subset, sample_ids=batch.sample_ids)


def test_the_kept_tasks_heldout_labels_change_nothing() -> None:
    """A kept task's guard gradient would only meet a zero forget row (the guard's batches carry the
    forgotten tasks' labels alone: the next test)."""
    parts = partial_partitions()  # forgets "a", keeps "b"
    heldout = ia_batch(12, 7, ["a", "b"])
    cfg = IAConfig.from_settings(
        {"lr": 5e-2, "epochs": 3, "batch_size": 4, "early_stopping": False, "unseen_guard": True}
    )
    start = ia_model()

    def updated(rows: Batch) -> list[torch.Tensor]:
        model = copy.deepcopy(start)
        interference_aware_unlearn(model, tasks=TASKS, partitions=parts, heldout=rows, cfg=cfg, seed=0)
        return [p.detach().clone() for p in model.parameters()]

    base = updated(heldout)
    kept_relabelled = updated(_relabel_kept(heldout, slice(0, None, 2)))  # the guard rows' "b" labels
    assert all(torch.equal(p, q) for p, q in zip(base, kept_relabelled, strict=True))
    moved = updated(_relabel(heldout, slice(0, None, 2)))  # their "a" labels: read
    assert not all(torch.equal(p, q) for p, q in zip(base, moved, strict=True))


def test_the_guard_batch_and_period_set_what_is_differentiated(monkeypatch: pytest.MonkeyPatch) -> None:
    """``unseen_guard_batch`` rows per guard mini-batch, labelled for the forgotten tasks only; their
    gradient is recomputed every ``unseen_guard_every`` steps and reused in between, so every step's
    forget term is guarded."""
    differentiated: list[int] = []  # per step: the guard mini-batch's rows (0: none)
    kept_labels: list[int] = []  # per guard mini-batch: its supervised labels of the kept task
    guarded: list[int] = []  # per step: the partitions the direction saw
    grads, direction = partition_task_grads, update._direction

    def spy_grads(model: Any, names: Any, batches: list[Batch], *args: Any, **kwargs: Any) -> Any:
        differentiated.append(len(batches[4]) if len(batches) == 5 else 0)
        kept_labels.extend(int(is_supervised(b.labels["b"]).sum()) for b in batches[4:])
        return grads(model, names, batches, *args, **kwargs)

    def spy_direction(flat: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        guarded.append(int(flat.shape[0]))
        return direction(flat, *args, **kwargs)

    monkeypatch.setattr(update, "partition_task_grads", spy_grads)
    monkeypatch.setattr(update, "_direction", spy_direction)
    settings = {"lr": 5e-2, "epochs": 3, "batch_size": 4, "early_stopping": False, "unseen_guard": True}
    cfg = IAConfig.from_settings({**settings, "unseen_guard_batch": 3, "unseen_guard_every": 2})
    interference_aware_unlearn(
        ia_model(), tasks=TASKS, partitions=partial_partitions(), heldout=ia_batch(12, 7, ["a", "b"]),
        cfg=cfg, seed=0,
    )  # fmt: skip
    assert len(differentiated) == 6  # 3 passes of 2 steps over the 6 forget rows
    assert differentiated == [3, 0, 3, 0, 3, 0]
    assert guarded == [5] * 6
    assert kept_labels == [0, 0, 0]
