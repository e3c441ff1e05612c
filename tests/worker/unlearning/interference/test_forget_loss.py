"""The forget term's unlikelihood loss (``ia.forget_loss``): its value, its gradient, and where the
update uses it."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from tests.worker.unlearning.interference.toy import TASKS, ia_batch, ia_model, partial_partitions
from worker.unlearning.grads import partition_task_grads
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.forget_loss import Unlikelihood, forget_loss_tasks, log_unlikelihood
from worker.unlearning.interference.update import interference_aware_unlearn
from worker.unlearning.lora import fast_forward, joint_grads
from worker.unlearning.types import IGNORE, ClassificationTask, RegressionTask, TaskSpec, soft_targets


def test_log_unlikelihood_is_log_one_minus_p_y_and_stays_finite_when_p_y_nears_one() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [0.3, -0.2, 1.1]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    p = torch.softmax(logits, -1)[torch.arange(3), labels]
    got = log_unlikelihood(logits, soft_targets(labels, 3).double())
    assert torch.allclose(got, torch.log1p(-p))
    # p_y = 1 − 2e^{−60} rounds to 1 in float32: the naive log(1 − p_y) is −inf, this is −60 + log 2
    confident = log_unlikelihood(torch.tensor([[60.0, 0.0, 0.0]]), soft_targets(torch.tensor([0]), 3))
    assert float(confident) == pytest.approx(-60.0 + torch.log(torch.tensor(2.0)).item(), abs=1e-4)


def test_its_gradient_is_largest_on_the_confident_samples_where_cross_entropys_vanishes() -> None:
    task = ClassificationTask("a", 3)
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.0]], requires_grad=True)  # confident, unsure
    labels = torch.tensor([0, 0])
    (ce_grad,) = torch.autograd.grad(task.per_sample_loss(logits, labels).sum(), logits)
    (ul_grad,) = torch.autograd.grad(Unlikelihood(task).per_sample_loss(logits, labels).sum(), logits)
    p_y = torch.softmax(logits.detach(), -1)[:, 0]
    assert torch.allclose(ce_grad[:, 0], -(1 - p_y))  # ascent moves the unsure sample most
    assert torch.allclose(ul_grad[:, 0], -p_y)  # unlikelihood the confident one
    assert abs(ce_grad[0, 0]) < abs(ce_grad[1, 0])
    assert abs(ul_grad[0, 0]) > abs(ul_grad[1, 0])


def test_log_odds_pulls_every_sample_alike() -> None:
    task = ClassificationTask("a", 3)
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.0], [-1.0, 2.0, 0.5]], requires_grad=True)
    labels = torch.tensor([0, 0, IGNORE])
    odds = Unlikelihood(task, plus_cross_entropy=True).per_sample_loss(logits, labels)
    p_y = torch.softmax(logits.detach(), -1)[:2, 0]
    assert torch.allclose(odds[:2].detach(), torch.log((1 - p_y) / p_y), atol=1e-5)
    (grad,) = torch.autograd.grad(odds.sum(), logits)
    assert torch.allclose(grad[:2, 0], torch.tensor([-1.0, -1.0]), atol=1e-6)
    assert float(grad[2].abs().sum()) == 0.0


def test_unlabelled_rows_add_nothing_and_one_hot_rows_equal_class_indices() -> None:
    task = Unlikelihood(ClassificationTask("a", 3))
    logits = torch.tensor([[80.0, 0.0, 0.0], [1.0, 2.0, 0.0]], requires_grad=True)
    labels = torch.tensor([IGNORE, 1])
    loss = task.per_sample_loss(logits, labels)
    assert float(loss[0].detach()) == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(grad).all()
    assert float(grad[0].abs().sum()) == 0.0
    assert torch.equal(task.per_sample_loss(logits, soft_targets(labels, 3)), loss)


def test_forget_loss_tasks_wrap_classification_and_keep_regression() -> None:
    tasks: list[TaskSpec] = [ClassificationTask("a", 3), RegressionTask("r", 1)]
    assert forget_loss_tasks(tasks, "cross_entropy") is None
    wrapped = forget_loss_tasks(tasks, "unlikelihood")
    assert wrapped is not None
    assert isinstance(wrapped[0], Unlikelihood)
    assert wrapped[0].name == "a"
    assert wrapped[1] is tasks[1]
    odds = forget_loss_tasks(tasks, "log_odds")
    assert odds is not None
    assert isinstance(odds[0], Unlikelihood)
    assert odds[0].plus_cross_entropy
    with pytest.raises(ValueError, match="unknown forget loss"):
        forget_loss_tasks(tasks, "hinge")


@pytest.mark.parametrize("backend", ["autograd", "func", "joint"])
def test_partition_grads_differentiate_the_first_partition_with_its_own_losses(backend: str) -> None:
    """On each path: per partition (autograd), torch.func, and the MLP view's joint forward (the
    path the update takes on an MLP)."""
    model = ia_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parts = [ia_batch(5, 1, ["a"]), ia_batch(6, 2, ["a", "b"])]
    swapped = forget_loss_tasks(TASKS, "unlikelihood")
    assert swapped is not None
    view = fast_forward(model) if backend == "joint" else None
    if view is not None:
        assert joint_grads(view, model)
    path = "autograd" if backend == "joint" else backend
    plain = partition_task_grads(model, names, parts, TASKS, backend=path, forward=view)
    mixed = partition_task_grads(model, names, parts, TASKS, backend=path, forward=view, first_tasks=swapped)
    own = partition_task_grads(model, names, parts[:1], swapped, backend=path, forward=view)
    for n in names:
        assert torch.allclose(mixed[n][1], plain[n][1], atol=1e-6)  # the retain partition: unchanged
        assert torch.allclose(mixed[n][0], own[n][0], atol=1e-6)  # D_f: the unlikelihood's gradient
    assert any(not torch.allclose(mixed[n][0], plain[n][0], atol=1e-4) for n in names)


def test_the_update_ascends_the_unlikelihood_when_asked_and_names_it_in_the_evidence() -> None:
    parts = partial_partitions()
    heldout = ia_batch(10, 7, ["a", "b"])
    base = {"lr": 5e-2, "epochs": 3, "batch_size": 4, "early_stopping": False}
    start = ia_model()
    runs = {}
    for loss in ("cross_entropy", "unlikelihood", "log_odds"):
        model = copy.deepcopy(start)
        cfg = IAConfig.from_settings({**base, "forget_loss": loss})
        info = interference_aware_unlearn(
            model, tasks=TASKS, partitions=parts, heldout=heldout, cfg=cfg, seed=0
        )
        runs[loss] = (model, info)
    assert runs["cross_entropy"][1]["forget_term"] == "ascend on the labels"
    assert runs["unlikelihood"][1]["forget_term"] == "ascend log(1 − p_y) on the labels"
    assert runs["log_odds"][1]["forget_term"] == "ascend log((1 − p_y) / p_y) on the labels"
    for a, b in itertools.combinations([model for model, _ in runs.values()], 2):
        assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_the_unlikelihood_applies_to_the_labels_forget_term_only() -> None:
    with pytest.raises(ValueError, match="forget_loss applies to the labels"):
        IAConfig.from_settings({"forget_loss": "unlikelihood", "forget_targets": "references"})
    with pytest.raises(ValueError, match="forget_loss"):
        IAConfig.from_settings({"forget_loss": "hinge"})
