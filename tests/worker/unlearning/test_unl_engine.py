"""engine.prepare / engine.run_round on the toy workload: files, evidence, progress, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.unlearning.engine import ForgetSpec, prepare, run_round
from worker.unlearning.workloads.toy import ToyWorkload


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    prepare(
        ToyWorkload(),
        data_dir=tmp_path / "data",
        base_dir=tmp_path / "base",
        adapter_dir=tmp_path / "v1",
        settings={},
        seed=0,
    )
    return tmp_path


def test_prepare_writes_base_store_and_v1(prepared: Path) -> None:
    assert sorted(p.name for p in (prepared / "base").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (prepared / "v1").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "unlearning_state.json",
    ]
    assert (prepared / "data" / "store.json").exists()


def test_run_round_writes_adapter_and_json_evidence(prepared: Path) -> None:
    progress: list[tuple[int, int, str]] = []
    outcome = run_round(
        ToyWorkload(),
        data_dir=prepared / "data",
        base_dir=prepared / "base",
        adapter_in=prepared / "v1",
        adapter_out=prepared / "v2",
        requests=[
            ForgetSpec("r1", "client", "u1", None, []),
            ForgetSpec("r2", "task", "u2", ["t02000", "t02001"], ["kind"]),
        ],
        method="original",
        settings={"audit": {"retrain_reference": False}},
        seed=1,
        on_progress=lambda done, total, msg: progress.append((done, total, msg)),
    )
    assert list(outcome.evidence) == ["r1", "r2"]
    json.dumps(outcome.evidence, allow_nan=True)
    assert outcome.evidence["r1"]["stage"] == 1
    assert outcome.evidence["r2"]["stage"] == 2
    assert outcome.evidence["r2"]["forget_tasks"] == ["kind"]
    assert progress[-1][:2] == (2, 2)
    assert (prepared / "v2" / "adapter_model.safetensors").exists()
    assert outcome.state.forgotten_clients == ["u1"]


def test_unknown_method_is_rejected(prepared: Path) -> None:
    with pytest.raises(KeyError, match="unknown unlearning method"):
        run_round(
            ToyWorkload(),
            data_dir=prepared / "data",
            base_dir=prepared / "base",
            adapter_in=prepared / "v1",
            adapter_out=prepared / "v2",
            requests=[ForgetSpec("r1", "client", "u1", None, [])],
            method="no-such-method",
            settings={},
            seed=0,
        )
    assert not (prepared / "v2").exists()


def test_repeated_request_is_a_no_op(prepared: Path) -> None:
    outcome = run_round(
        ToyWorkload(),
        data_dir=prepared / "data",
        base_dir=prepared / "base",
        adapter_in=prepared / "v1",
        adapter_out=prepared / "v2",
        requests=[
            ForgetSpec("r1", "client", "u1", None, []),
            ForgetSpec("r1-again", "client", "u1", None, []),
        ],
        method="ssd",
        settings={},
        seed=0,
    )
    again = outcome.evidence["r1-again"]
    assert again["method_info"]["skipped"] == "nothing left to forget"
    assert again["forget_samples"] == 0
    assert again["uis"]["value"] is None
    assert outcome.state.forgotten_clients == ["u1"]
    assert outcome.state.requests == ["r1", "r1-again"]


@pytest.mark.parametrize("reference", [True, False])
def test_retrain_method_trains_on_the_retain_set(prepared: Path, reference: bool) -> None:
    outcome = run_round(
        ToyWorkload(),
        data_dir=prepared / "data",
        base_dir=prepared / "base",
        adapter_in=prepared / "v1",
        adapter_out=prepared / "v2",
        requests=[ForgetSpec("r1", "client", "u2", None, [])],
        method="retrain",
        settings={"audit": {"retrain_reference": reference}},
        seed=0,
    )
    ev = outcome.evidence["r1"]
    assert ev["method"] == "retrain"
    assert ev["pruned_subset_outputs"] == [2]
    assert ev["partition_sizes"]["retain_set"] == 24  # 3 clients × 12 samples, minus u2's
    if reference:  # the reference is the retrain itself: reused, UIS 0
        assert ev["method_info"]["reused_reference"] is True
        assert ev["uis"]["value"] == pytest.approx(0.0)
    else:
        assert ev["method_info"]["retain_samples"] == 24
        assert ev["uis"]["value"] is None
