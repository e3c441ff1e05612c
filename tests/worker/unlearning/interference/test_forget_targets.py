"""``ia.forget_targets: "references"``: the forget term descends towards the mean prediction of
the reference adapters that never saw each forgotten row's client (docs/methods.md, "The forget
term towards the references' predictions")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.worker.unlearning.interference.toy import TASKS, ia_batch, ia_model, partial_partitions
from tests.worker.unlearning.round_guards import forbid_training, ia_info_of_round, prepared_toy
from worker.unlearning.audit import model_outputs
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.forget_targets import mean_prediction, reference_forget_targets
from worker.unlearning.interference.update import interference_aware_unlearn
from worker.unlearning.reference_adapters import LoadedReferences, ReferenceSet
from worker.unlearning.types import Batch, ClassificationTask, RegressionTask

CLIENTS = {"c0": 0, "c1": 1, "c2": 2}


def _references(models: list[nn.Module]) -> LoadedReferences:
    """Three references: 0 saw c0, 1 saw c1 and c2, 2 saw c0 and c1."""
    refs = ReferenceSet(
        clients=list(CLIENTS), members={0: ["c0"], 1: ["c1", "c2"], 2: ["c0", "c1"]}, k=3, seed=0,
        workload="toy", recipe={}, recipe_digest="-", train_s=0.0,
    )  # fmt: skip
    return LoadedReferences(refs=refs, models=models)


def _forget_rows() -> Batch:
    """Four rows of c0, then four of c2, labelled for task "a" only."""
    batch = ia_batch(8, 3, ["a"])
    batch.subset = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])
    return batch


def test_the_mean_prediction_is_over_the_out_references_of_each_row_and_nan_without_one() -> None:
    outputs = torch.randn(3, 4, 5)
    out = torch.tensor([[True, False, False, True], [True, True, False, False], [False, True, False, True]])
    probs = mean_prediction(ClassificationTask("a", 5), outputs, out)
    soft = torch.softmax(outputs, dim=-1)
    assert torch.allclose(probs[0], (soft[0, 0] + soft[1, 0]) / 2)
    assert torch.allclose(probs[1], (soft[1, 1] + soft[2, 1]) / 2)
    assert torch.isnan(probs[2]).all()  # no reference is OUT for row 2: unlabelled
    assert torch.allclose(probs[3], (soft[0, 3] + soft[2, 3]) / 2)
    assert torch.allclose(probs[[0, 1, 3]].sum(-1), torch.ones(3))
    values = mean_prediction(RegressionTask("r"), outputs[..., :1], out)  # a regression: the values
    assert torch.allclose(values[0], (outputs[0, 0, :1] + outputs[1, 0, :1]) / 2)
    assert torch.isnan(values[2]).all()


def test_each_forgotten_row_gets_the_mean_of_the_references_that_never_saw_its_client() -> None:
    models = [ia_model(seed=s) for s in (11, 12, 13)]
    forget = _forget_rows()
    targets, evidence = reference_forget_targets(
        _references(models), TASKS, forget=forget, forget_tasks=["a"], client_index=CLIENTS
    )
    assert targets is not None
    soft = [torch.softmax(model_outputs(m, forget.inputs)["a"], dim=-1) for m in models]
    # c0's rows: only reference 1 never saw c0; c2's rows: references 0 and 2
    assert torch.allclose(targets.labels["a"][:4], soft[1][:4], atol=1e-6)
    assert torch.allclose(targets.labels["a"][4:], (soft[0][4:] + soft[2][4:]) / 2, atol=1e-6)
    assert torch.equal(targets.labels["b"], forget.labels["b"])  # a kept task is left as it is
    assert torch.equal(targets.inputs["x"], forget.inputs["x"])
    assert targets.sample_ids == forget.sample_ids
    assert evidence == {"source": "references", "references": 3, "rows_with_target": {"a": 8}, "rows": 8}


def test_without_a_reference_that_never_saw_the_client_the_forget_term_keeps_the_labels() -> None:
    forget = _forget_rows()
    forget.subset = torch.zeros(8, dtype=torch.long)  # every row is c0's
    seen_by_all = _references([ia_model(seed=s) for s in (11, 12, 13)])
    seen_by_all.refs.members[1] = ["c0", "c1", "c2"]
    none, why = reference_forget_targets(
        seen_by_all, TASKS, forget=forget, forget_tasks=["a"], client_index=CLIENTS
    )
    assert none is None
    assert why["source"] == "labels"
    assert "never saw" in why["reason"]
    none, why = reference_forget_targets(None, TASKS, forget=forget, forget_tasks=["a"], client_index=CLIENTS)
    assert none is None
    assert "no reference adapters" in why["reason"]


def _forget_loss(model: nn.Module, batch: Batch) -> float:
    return float(TASKS[0].per_sample_loss(model_outputs(model, batch.inputs)["a"], batch.labels["a"]).mean())


def test_the_forget_term_descends_towards_the_targets_where_the_paper_ascends_the_labels() -> None:
    """With the retain term off, the update with targets lowers D_f's loss to them; on the labels
    (paper) it raises D_f's loss on the labels. The evidence says which the update did."""
    parts = partial_partitions()
    gen = torch.Generator().manual_seed(5)
    soft = torch.softmax(torch.randn(len(parts.forget), 3, generator=gen), dim=-1)
    towards = Batch(inputs=parts.forget.inputs, labels={**parts.forget.labels, "a": soft},
                    subset=parts.forget.subset, sample_ids=parts.forget.sample_ids)  # fmt: skip
    cfg = IAConfig.from_settings({"lr": 5e-2, "epochs": 5, "batch_size": 2, "eta1": 0.0, "eta2": 1.0,
                                  "early_stopping": False})  # fmt: skip

    def run(targets: Batch | None) -> tuple[nn.Module, dict[str, Any]]:
        model = ia_model()
        info = interference_aware_unlearn(
            model, tasks=TASKS, partitions=parts, heldout=ia_batch(10, 7, ["a", "b"]), cfg=cfg, seed=0,
            forget_targets=targets,
        )  # fmt: skip
        return model, info

    before = ia_model()
    descended, info = run(towards)
    assert info["forget_term"] == "descend towards the references' predictions"
    assert _forget_loss(descended, towards) < _forget_loss(before, towards) - 0.05
    ascended, info = run(None)
    assert info["forget_term"] == "ascend on the labels"
    assert _forget_loss(ascended, parts.forget) > _forget_loss(before, parts.forget) + 0.05
    # early stopping's measurements read D_f's labels either way
    assert not math.isnan(info["history"][-1]["mia_auc"]["a"])


def test_a_round_descends_towards_the_out_references_without_training_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``default`` round with ``ia.forget_targets: "references"`` reads the prepared references'
    predictions (those that never saw the forgotten client: half of them) with every way to train a
    retrain or a reference made to fail; without references the forget term keeps the labels and
    the evidence says why."""
    settings: dict[str, dict[str, Any]] = {
        "audit": {"reference_adapters": 4, "bootstrap": 0},
        "acceptance": {"fallback": "none"},
        "ia": {"target": "references", "forget_targets": "references", "epochs": 2},
    }
    wl = prepared_toy(tmp_path, settings)
    forbid_training(monkeypatch)
    ia = ia_info_of_round(wl, tmp_path, settings, refs=tmp_path / "refs", out="v2")
    assert ia["forget_targets"]["source"] == "references"
    assert ia["forget_targets"]["references"] == 2  # K = 4 halves: two never saw u2
    assert ia["forget_term"] == "descend towards the references' predictions"
    plain = ia_info_of_round(wl, tmp_path, settings, refs=None, out="v2b")
    assert plain["forget_targets"]["source"] == "labels"
    assert "no reference adapters" in plain["forget_targets"]["reason"]
    assert plain["forget_term"] == "ascend on the labels"
