"""Audit: loss-MIA AUC, UIS (Eqs. 30–31) on hand-made inputs, the logistic attacker, the evidence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from tests.worker.unlearning.toy_nets import toy_batch, toy_model
from worker.unlearning.audit import (
    ModelMetrics,
    TaskMetrics,
    audit,
    evaluate_model,
    logistic_attack,
    loss_mia_auc,
    unl_split,
    unlearning_impact_score,
)
from worker.unlearning.types import Batch, ClassificationTask, Partitions


def test_loss_mia_auc_on_hand_made_losses() -> None:
    t = torch.tensor
    # members lower loss than every non-member: a perfect attack
    assert loss_mia_auc(t([0.1, 0.2]), t([0.5, 0.9])) == 1.0
    assert loss_mia_auc(t([0.5, 0.9]), t([0.1, 0.2])) == 0.0
    # scores -0.1, -0.2 vs -0.3, -0.05: 2 of 4 pairs ranked right
    assert loss_mia_auc(t([0.1, 0.2]), t([0.3, 0.05])) == 0.5
    # a tie counts one half: pairs (0.1 vs 0.1) = 0.5, (0.1 vs 0.4) = 1 -> 0.75
    assert loss_mia_auc(t([0.1]), t([0.1, 0.4])) == 0.75
    assert loss_mia_auc(t([0.1]), t([])) is None


def test_loss_mia_auc_equals_sklearn_roc_auc_with_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        members = torch.randint(
            0, 6, (int(torch.randint(1, 25, (1,), generator=gen)),), generator=gen
        ).float()
        others = torch.randint(0, 6, (int(torch.randint(1, 25, (1,), generator=gen)),), generator=gen).float()
        y = np.r_[np.ones(len(members)), np.zeros(len(others))]
        expected = roc_auc_score(y, -np.r_[members.numpy(), others.numpy()])
        assert loss_mia_auc(members, others) == pytest.approx(expected, abs=1e-12)


def _tm(ret: float, unl: float, val: float, mia: float) -> TaskMetrics:
    return TaskMetrics(ret=ret, unl=unl, val=val, mia_auc=mia, mia_auc_ret=0.6, mia_ap=None)


def test_uis_full_task_against_retrain_by_hand() -> None:
    method = ModelMetrics({"a": _tm(0.9, 0.6, 0.8, 0.55), "b": _tm(1.0, 0.5, 0.5, 0.5)})
    retrain = ModelMetrics({"a": _tm(1.0, 0.5, 0.8, 0.5), "b": _tm(1.0, 0.5, 0.5, 0.5)})
    uis = unlearning_impact_score(method, forget_tasks=["a", "b"], reference=retrain, original=None)
    # a: 0.1/1 + 0.1/0.5 + 0 + 0.05/0.5 = 0.4 ; b: 0 -> mean 0.2
    assert uis.value == pytest.approx(0.2)
    assert uis.per_task["a"] == pytest.approx(0.4)
    assert uis.task_reference == {"a": "retrain", "b": "retrain"}
    assert uis.reference == "retrain"
    assert uis.reason is None


def test_uis_partial_task_uses_original_for_retained_tasks() -> None:
    method = ModelMetrics({"a": _tm(0.9, 0.6, 0.8, 0.55), "b": _tm(0.8, 0.8, 0.8, 0.6)})
    retrain = ModelMetrics({"a": _tm(1.0, 0.5, 0.8, 0.5), "b": _tm(0.1, 0.1, 0.1, 0.1)})
    original = ModelMetrics({"a": _tm(0.0, 0.0, 0.0, 0.0), "b": _tm(1.0, 1.0, 0.8, 0.5)})
    uis = unlearning_impact_score(method, forget_tasks=["a"], reference=retrain, original=original)
    # a vs retrain: 0.4 ; b vs original: 0.2 + 0.2 + 0 + 0.2 = 0.6 -> mean 0.5
    assert uis.value == pytest.approx(0.5)
    assert uis.task_reference == {"a": "retrain", "b": "original"}
    missing = unlearning_impact_score(method, forget_tasks=["a"], reference=retrain, original=None)
    assert missing.value is None
    assert missing.reason is not None
    assert "original" in missing.reason


def test_uis_is_never_reported_without_a_retrain_reference() -> None:
    method = ModelMetrics({"a": _tm(0.9, 0.6, 0.8, 0.55)})
    uis = unlearning_impact_score(method, forget_tasks=["a"], reference=None, original=method)
    assert uis.value is None
    assert uis.reference is None
    assert uis.reason is not None
    assert "retrain" in uis.reason


def test_uis_skips_missing_terms_and_floors_zero_reference() -> None:
    method = ModelMetrics({"a": TaskMetrics(0.5, None, 0.5, 0.5, None, None)})
    retrain = ModelMetrics({"a": TaskMetrics(0.5, 0.4, 0.0, 0.5, None, None)})
    uis = unlearning_impact_score(method, forget_tasks=["a"], reference=retrain, original=None, floor=0.1)
    assert uis.terms["a"]["unl"] is None
    assert uis.value == pytest.approx(0.5 / 0.1)


def test_logistic_attacker_cross_validated_accuracy() -> None:
    rng = np.random.default_rng(0)
    forget = rng.normal(3.0, 0.1, size=(20, 3))
    retain = rng.normal(-3.0, 0.1, size=(60, 3))
    result = logistic_attack(forget, retain, folds=5, seed=0)
    assert result.accuracy == 1.0
    assert result.folds == 5
    same = logistic_attack(rng.normal(size=(20, 3)), rng.normal(size=(60, 3)), seed=0)
    assert same.accuracy is not None
    assert same.accuracy < 0.9
    tiny = logistic_attack(forget[:1], retain, seed=0)
    assert tiny.accuracy is None
    assert tiny.reason is not None


def _model() -> nn.Module:
    return toy_model(hidden=8, rank=4, num_subsets=3, b_scale=0.0)


def _batch(n: int, seed: int, tasks: list[str]) -> Batch:
    return toy_batch(n, seed, tasks)


def test_audit_evidence_is_json_and_names_its_reference() -> None:
    tasks = [ClassificationTask("a", 3), ClassificationTask("b", 2)]
    model = _model()
    parts = Partitions(
        forget=_batch(10, 1, ["a"]),
        retain_task=_batch(10, 1, ["b"]),
        retain_inst=_batch(4, 2, ["a"]),
        retain_clean=_batch(4, 2, ["b"]),
        forget_tasks=["a"],
        retain_tasks=["b"],
        anchor_sample_ids=[],
    )
    ret, val = _batch(30, 2, ["a", "b"]), _batch(12, 3, ["a", "b"])
    unl = unl_split(parts)
    assert len(unl) == 20
    ev = audit(model, tasks, ret=ret, unl=unl, val=val, forget_tasks=["a"])
    data = ev.to_json()
    json.dumps(data, allow_nan=False)
    assert data["uis"]["value"] is None
    assert data["reference"] is None
    assert data["tasks"]["a"]["n_unl"] == 10
    assert data["tasks"]["b"]["n_unl"] == 10
    assert ev.attacker.n_forget == 10  # the 10 instances once, though they appear in two partitions
    assert ev.attacker.accuracy is not None
    assert len(ev.attacker.features) == 3 + 2 + 3  # softmaxes of both task heads and the subset head
    ref = evaluate_model(model, tasks, ret=ret, unl=unl, val=val)
    ev2 = audit(model, tasks, ret=ret, unl=unl, val=val, forget_tasks=["a"], reference=ref, original=ref)
    assert ev2.uis.value == pytest.approx(0.0)  # the model is its own reference
    assert ev2.to_json()["reference"] == "retrain"
    assert ModelMetrics.from_json(ref.to_json()).to_json() == ref.to_json()
