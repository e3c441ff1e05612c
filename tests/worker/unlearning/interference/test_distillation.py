"""The retain term's distilled targets (``ia.retain_distillation``)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.worker.unlearning.interference.toy import TASKS, ia_model, partial_partitions
from worker.unlearning.audit import model_outputs
from worker.unlearning.grads import partition_task_grads
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.distillation import distilled_partitions, distilled_targets
from worker.unlearning.interference.update import interference_aware_unlearn
from worker.unlearning.lora import param_groups
from worker.unlearning.types import IGNORE, Batch, ClassificationTask, RegressionTask, concat_batches


def test_classification_targets_mix_labels_and_predicted_probabilities() -> None:
    task = ClassificationTask("a", 3)
    labels = torch.tensor([2, IGNORE, 0])
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    probs = torch.softmax(logits, dim=-1)
    mixed = distilled_targets(task, labels, logits, 0.25)
    assert torch.allclose(mixed[0], 0.75 * torch.tensor([0.0, 0.0, 1.0]) + 0.25 * probs[0])
    assert torch.isnan(mixed[1]).all()  # no label stays no label
    assert torch.allclose(mixed[2], 0.75 * torch.tensor([1.0, 0.0, 0.0]) + 0.25 * probs[2])
    assert torch.allclose(mixed[[0, 2]].sum(-1), torch.ones(2))
    assert torch.equal(distilled_targets(task, labels, logits, 1.0)[0], probs[0])


def test_regression_targets_mix_labels_and_predictions() -> None:
    task = RegressionTask("r", 2)
    labels = torch.tensor([[1.0, 2.0], [math.nan, math.nan]])
    pred = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    mixed = distilled_targets(task, labels, pred, 0.5)
    assert torch.equal(mixed[0], torch.tensor([2.0, 1.0]))
    assert torch.isnan(mixed[1]).all()


def test_soft_targets_give_the_hard_loss_for_one_hot_rows_and_concatenate_with_hard_ones() -> None:
    task = ClassificationTask("a", 3)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    hard = torch.tensor([0, 2, IGNORE, 1])
    soft = distilled_targets(task, hard, logits, 0.0)  # β = 0: the labels as probabilities
    assert torch.allclose(task.per_sample_loss(logits, soft), task.per_sample_loss(logits, hard))
    assert task.metric(logits, soft) == task.metric(logits, hard)
    assert torch.equal(task.supervised(soft), task.supervised(hard))
    parts = partial_partitions()
    soft_inst = distilled_partitions(ia_model(), parts, TASKS, 0.5).retain_inst
    joined = concat_batches([parts.forget, soft_inst])
    assert joined.labels["a"].shape == (len(parts.forget) + len(soft_inst), 3)
    assert torch.equal(joined.labels["a"][: len(parts.forget)].argmax(-1), parts.forget.labels["a"])


def test_distillation_leaves_the_forget_partition_and_beta_zero_alone() -> None:
    model, parts = ia_model(), partial_partitions()
    assert distilled_partitions(model, parts, TASKS, 0.0) is parts
    distilled = distilled_partitions(model, parts, TASKS, 1.0)
    assert distilled.forget is parts.forget
    out = model_outputs(model, parts.retain_clean.inputs)
    assert torch.allclose(distilled.retain_clean.labels["b"], torch.softmax(out["b"], -1))
    assert torch.isnan(distilled.retain_clean.labels["a"]).all()  # "a" unsupervised in D_r^clean


def test_fully_distilled_retain_gradient_vanishes_at_the_pre_request_model() -> None:
    """β = 1 keeps the pre-request function: the retain term has nothing to pull back to (with the
    labels it pulls towards the labelled fit, which re-learns what an earlier round suppressed)."""
    model, parts = ia_model(), partial_partitions()
    groups = param_groups(model)
    names = [*groups.lora_a, *groups.lora_b, *groups.head_params(["a", "b"])]
    retain = [parts.retain_clean, parts.retain_inst, parts.retain_task]

    def retain_grad_norm(batches: list[Batch]) -> float:
        grads = partition_task_grads(model, names, batches, TASKS)
        return float(torch.cat([g.flatten() for g in grads.values()]).norm())

    distilled = distilled_partitions(model, parts, TASKS, 1.0)
    labelled = retain_grad_norm(retain)
    assert labelled > 1e-3
    kept = retain_grad_norm([distilled.retain_clean, distilled.retain_inst, distilled.retain_task])
    assert kept < 1e-6 * labelled


def test_update_with_distilled_targets_runs_and_differs_from_the_labels() -> None:
    outcomes = []
    for beta in (0.0, 1.0):
        model = ia_model()
        cfg = IAConfig(lr=1e-2, epochs=3, early_stopping=False, retain_distillation=beta)
        interference_aware_unlearn(model, tasks=TASKS, partitions=partial_partitions(),
                                   heldout=partial_partitions().retain_inst, cfg=cfg)  # fmt: skip
        outcomes.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.isfinite(outcomes[1]).all()
    assert not torch.allclose(outcomes[0], outcomes[1])


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_config_rejects_a_share_outside_zero_one(beta: float) -> None:
    with pytest.raises(ValueError, match="retain_distillation"):
        IAConfig.from_settings({"retain_distillation": beta})


def test_the_forgotten_tasks_anchor_rows_take_their_own_share() -> None:
    """``forgotten_task_distillation`` sets β of D_r^inst alone (labels elsewhere at β = 0); unset,
    D_r^inst follows ``retain_distillation``."""
    model, parts = ia_model(), partial_partitions()
    distilled = distilled_partitions(model, parts, TASKS, 0.0, inst_beta=1.0)
    assert distilled.retain_clean is parts.retain_clean
    assert distilled.retain_task is parts.retain_task
    out = model_outputs(model, parts.retain_inst.inputs)
    assert torch.allclose(distilled.retain_inst.labels["a"], torch.softmax(out["a"], -1))
    assert distilled_partitions(model, parts, TASKS, 0.0, inst_beta=0.0) is parts
    assert IAConfig(retain_distillation=0.75).inst_distillation == 0.75
    assert IAConfig(retain_distillation=0.75, forgotten_task_distillation=1.0).inst_distillation == 1.0
    with pytest.raises(ValueError, match="forgotten_task_distillation"):
        IAConfig.from_settings({"forgotten_task_distillation": 1.5})


def test_update_uses_the_forgotten_tasks_share() -> None:
    """``interference_aware_unlearn`` distils D_r^inst by ``forgotten_task_distillation`` (β = 0
    elsewhere): the model ends elsewhere than with the labels everywhere."""
    outcomes = []
    for inst in (None, 1.0):
        model = ia_model()
        cfg = IAConfig(lr=1e-2, epochs=3, early_stopping=False, forgotten_task_distillation=inst)
        interference_aware_unlearn(model, tasks=TASKS, partitions=partial_partitions(),
                                   heldout=partial_partitions().retain_inst, cfg=cfg)  # fmt: skip
        outcomes.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(outcomes[0], outcomes[1])
