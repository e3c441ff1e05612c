"""The scenes gap measurement's LiRA (worker/unlearning/workloads/scenes/gaps.py): the audit's attack,
with the references' confidences computed once for every model and client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.unlearning.audit import model_outputs
from worker.unlearning.engine import ensure_base
from worker.unlearning.likelihood_ratio import likelihood_ratio_audit
from worker.unlearning.reference_adapters import load_references, train_references
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.workloads.scenes.gaps import LiraGap
from worker.unlearning.workloads.toy import ToyWorkload


def test_lira_gap_scores_each_client_as_the_audit_does(tmp_path: Path) -> None:
    """Per task, the AUC and TPR of LiraGap on a client's rows equal those of the round's
    likelihood-ratio audit on the same model, references and rows (the same φ, μ_out and σ_out),
    for a model that saw the client and one that did not (whether the toy memorises the client is
    test_likelihood_ratio's business); ``combined`` (the per-task z-values summed) is scored too."""
    torch.set_num_threads(1)
    wl = ToyWorkload(0, num_clients=4, per_client=12)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci, tasks = wl.client_index(), wl.tasks()
    data = wl.client_data().to_batch(ci)
    unseen = wl.heldout_data().to_batch(ci)
    cfg = TrainConfig(epochs=8, main_only_epochs=1, batch_size=8, lr=1e-2)
    train_references(base, data, tasks, cfg, client_index=ci, k=4, seed=1, directory=tmp_path / "refs",
                     workload="toy")  # fmt: skip
    loaded = load_references(base, tmp_path / "refs")
    assert loaded is not None
    gap = LiraGap(loaded, tasks, data, unseen, ci)
    names = [t.name for t in tasks]
    rows = (data.subset == ci["u1"]).nonzero().reshape(-1)
    forget = data.select(rows)
    seen = train_v1(base, data, tasks, cfg, seed=5)
    never = train_v1(base, data.select(data.subset != ci["u1"]), tasks, cfg, seed=5)
    for model in (seen, never):
        got = gap.attack(rows, model_outputs(model, forget.inputs), model_outputs(model, unseen.inputs))
        audit = likelihood_ratio_audit(
            model, loaded, tasks, forget=forget, unseen=unseen, forget_tasks=names, client_index=ci
        )
        assert set(got) == {*names, "combined"}
        for name in names:
            assert got[name]["auc"] == pytest.approx(audit["auc"][name], abs=1e-4)
            assert got[name]["tpr_at_1pct_fpr"] == pytest.approx(audit["tpr_at_1pct_fpr"][name], abs=1e-4)
        assert 0.0 <= float(got["combined"]["auc"] or -1) <= 1.0
