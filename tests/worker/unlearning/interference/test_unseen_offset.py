"""``ia.target_offset: "unseen_clients"``: the reference target moved by the references' offset from
the version's model, measured on the held-out split's unseen clients (no retrain anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.unlearning.round_guards import ia_info_of_round
from worker.unlearning.engine import prepare
from worker.unlearning.interference.targets import ReferenceTarget, offset_target
from worker.unlearning.interference.unseen_offset import MIN_CLIENT_ROWS, client_statistics
from worker.unlearning.types import IGNORE, ClassificationTask
from worker.unlearning.workloads.toy import ToyWorkload


def _logits(correct: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose true class (label 0) has margin ``confidence`` where ``correct``."""
    margin = torch.where(correct, confidence, -confidence)
    return torch.stack([margin, torch.zeros_like(margin)], dim=1)


def test_client_statistics_per_unseen_client() -> None:
    task = ClassificationTask("c", 2)
    n = MIN_CLIENT_ROWS
    # client "a": right and very confident (the lowest losses); "b": too few rows; the rest (no
    # client and client "c"): right on half of their rows, with less confidence
    groups: list[str | None] = ["a"] * (n + 2) + ["b"] * (n - 1) + ["c"] * n + [None] * n
    rows = len(groups)
    correct = torch.tensor([g == "a" or i % 2 == 0 for i, g in enumerate(groups)])
    confidence = torch.tensor([5.0 if g == "a" else 1.0 + 0.01 * i for i, g in enumerate(groups)])
    labels = torch.zeros(rows, dtype=torch.long)
    # two of a's rows are unlabelled and badly wrong: they must count nowhere (a keeps n labelled)
    labels[:2] = IGNORE
    correct[:2] = False
    stats = client_statistics(task, _logits(correct, confidence), labels, groups)
    assert sorted(stats) == ["a", "c"]  # b has fewer than MIN_CLIENT_ROWS rows
    a = stats["a"]
    assert a["mia_auc"] == 1.0  # every labelled row of a has a lower loss than every other row
    assert a["accuracy"] == 1.0
    rest = correct[labels != IGNORE][n:]
    assert a["accuracy_gap"] == pytest.approx(1.0 - float(rest.float().mean()))
    assert 0.0 < stats["c"]["mia_auc"] < 1.0


def test_offset_target_moves_each_task_and_clamps_the_auc() -> None:
    target = ReferenceTarget(
        mia_auc={"t": 0.6, "u": 0.98, "v": 0.55},
        accuracy={"t": 0.5, "u": 0.9, "v": 0.4},
        accuracy_gap={"t": -0.2, "u": 0.1, "v": -0.1},
        auc_spread={"t": 0.05},
        accuracy_spread={"t": 0.1},
    )
    offsets = {
        "t": {"mia_auc": -0.04, "accuracy": 0.1, "accuracy_gap": 0.03},
        "u": {"mia_auc": 0.05, "accuracy": -0.2, "accuracy_gap": -0.01},
    }
    moved = offset_target(target, offsets)
    assert moved.mia_auc == pytest.approx({"t": 0.56, "u": 1.0, "v": 0.55})
    assert moved.accuracy == pytest.approx({"t": 0.6, "u": 0.7, "v": 0.4})
    assert moved.accuracy_gap == pytest.approx({"t": -0.17, "u": 0.09, "v": -0.1})
    assert (moved.auc_spread, moved.accuracy_spread) == (target.auc_spread, target.accuracy_spread)
    assert offset_target(target, {}) == target


class _UnseenClients(ToyWorkload):
    """The toy with its held-out rows drawn, round robin, from ``clients`` unseen clients."""

    def __init__(self, clients: int) -> None:
        super().__init__(0, num_clients=4, per_client=10, heldout=30 * clients)
        self.unseen = clients

    def heldout_clients(self) -> dict[str, str]:
        return {f"h{i:03d}": f"n{i % self.unseen}" for i in range(self.n_heldout)}


def _round(tmp_path: Path, unseen: int, offset: str) -> dict[str, Any]:
    settings = {
        "audit": {"reference_adapters": 2},
        "ia": {"target": "references", "target_offset": offset, "checkpoint_heldout_rows": 0},
    }
    wl = _UnseenClients(unseen)
    prepare(wl, data_dir=tmp_path / "data", base_dir=tmp_path / "base", adapter_dir=tmp_path / "v1",
            settings=settings, seed=0, references_dir=tmp_path / "refs")  # fmt: skip
    return dict(ia_info_of_round(wl, tmp_path, settings, refs=tmp_path / "refs", out="v2")["target"])


def test_a_round_aims_at_the_references_target_plus_the_unseen_clients_offset(tmp_path: Path) -> None:
    target = _round(tmp_path, unseen=3, offset="unseen_clients")
    offset = target["offset"]
    assert offset["source"] == "unseen_clients"
    assert offset["applied"] == sorted(target["tasks"]) == ["kind", "side"]
    assert offset["wall_s"] > 0
    for task, references in target["tasks"].items():
        measured = offset["tasks"][task]
        assert sorted(measured["clients"]) == ["n0", "n1", "n2"]
        per_client = [c["mia_auc"] for c in measured["clients"].values()]
        assert measured["offset"]["mia_auc"] == pytest.approx(sorted(per_client)[1])  # the median
        aimed = min(1.0, max(0.0, references["mia_auc"] + measured["offset"]["mia_auc"]))
        assert offset["target"]["mia_auc"][task] == pytest.approx(aimed)
        assert offset["target"]["accuracy"][task] == pytest.approx(
            references["accuracy"] + measured["offset"]["accuracy"]
        )


def test_too_few_unseen_clients_leave_the_references_target(tmp_path: Path) -> None:
    target = _round(tmp_path, unseen=2, offset="unseen_clients")
    assert target["offset"]["applied"] == []
    assert "fewer than 3 unseen clients" in target["offset"]["reason"]
    assert target["offset"]["target"]["mia_auc"] == {t: v["mia_auc"] for t, v in target["tasks"].items()}


def test_the_offset_is_off_by_default(tmp_path: Path) -> None:
    assert "offset" not in _round(tmp_path, unseen=3, offset="none")
