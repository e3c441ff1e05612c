"""The unseen-data guard (``ia.unseen_guard``): which held-out rows it reads, and that the forget
term it leaves is orthogonal to each forgotten task's held-out gradient."""

from __future__ import annotations

import copy

import torch

from tests.worker.unlearning.interference.toy import (
    TASKS,
    head_a_layout,
    ia_batch,
    ia_model,
    partial_partitions,
)
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.orthogonalisation import segment_dot
from worker.unlearning.interference.unseen_guard import guard_rows, scoring_rows
from worker.unlearning.interference.update import _direction, interference_aware_unlearn
from worker.unlearning.types import Batch


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
