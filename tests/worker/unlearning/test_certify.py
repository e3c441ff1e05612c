"""Certification off the request path (issue 8 part 5): the pure function on the toy workload."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from worker.unlearning.audit import ModelMetrics
from worker.unlearning.certify import (
    CertifyConfig,
    CertifyRequest,
    certify_version,
    forget_sets,
    load_snapshot,
    save_snapshot,
)
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import EngineInputs, ForgetSpec, RoundOutcome, prepare, run_round
from worker.unlearning.workloads.toy import ToyWorkload

SETTINGS: dict[str, object] = {}


def _version(root: Path, method: str, spec: ForgetSpec) -> RoundOutcome:
    """v1 of the toy model, then v2 = ``method`` on ``spec`` (snapshot of X_f taken before the purge)."""
    prepare(ToyWorkload(), data_dir=root / "data", base_dir=root / "base", adapter_dir=root / "v1",
            settings={}, seed=0)  # fmt: skip
    outcome = run_round(
        ToyWorkload(), data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1",
        adapter_out=root / "v2", requests=[spec], method=method, settings=SETTINGS, seed=0,
    )  # fmt: skip
    store = DataStore(root / "data")
    save_snapshot(root / "snap", forget_sets(store, [spec]))
    store.purge([spec])
    return outcome


def _inputs(root: Path, settings: Mapping[str, Any]) -> EngineInputs:
    return EngineInputs.load(
        ToyWorkload(), data_dir=root / "data", base_dir=root / "base", settings=settings, seed=0
    )


def test_certify_compares_the_version_with_a_retrain_and_says_if_it_is_within_bounds(tmp_path: Path) -> None:
    """The ``original`` method forgets nothing: against the retrain of the same retain set its
    forget-set accuracy / MIA differ, so a tight tolerance flags it and a loose one certifies it;
    UIS is computed against the real retrain. Without the snapshot (purged data) the forget-set
    terms are reported unavailable and the verdict is incomplete."""
    spec = ForgetSpec("r1", "client", "u1", None, [])
    outcome = _version(tmp_path, "original", spec)
    snapshot = load_snapshot(tmp_path / "snap")
    assert snapshot is not None
    assert len(snapshot["r1"]) == 12  # the client's samples, kept after the purge
    assert DataStore(tmp_path / "data").client_samples("u1") is None  # purged
    original = ModelMetrics.from_json(outcome.evidence["r1"]["original_metrics"])
    request = CertifyRequest("r1", ["kind", "side"], snapshot["r1"], original)

    tight = certify_version(
        _inputs(tmp_path, {**SETTINGS, "certify": {"tolerance": 0.0}}),
        adapter_dir=tmp_path / "v2",
        requests=[request],
    )
    doc = tight.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["verdict"] == "out_of_bounds"
    assert doc["within_bounds"] is False
    assert doc["version"] == 2
    assert doc["retain_set"] == {
        "size": 24,
        "exact": True,
        "purged_beyond_version": {"clients": 0, "samples": 0, "pairs": 0},
    }
    r1 = doc["requests"]["r1"]
    diffs = [r1["tasks"][t]["unl_diff"] for t in ("kind", "side")] + [
        r1["tasks"][t]["mia_diff"] for t in ("kind", "side")
    ]
    assert all(d is not None for d in diffs)
    assert max(diffs) > 0.0
    assert r1["uis"]["value"] is not None
    assert r1["uis"]["reference"] == "retrain"
    assert tight.retrain_wall_s > 0.0

    loose = certify_version(
        _inputs(tmp_path, {**SETTINGS, "certify": {"tolerance": 1.0}}),
        adapter_dir=tmp_path / "v2",
        requests=[request],
    )
    assert loose.verdict == "within_bounds"
    assert loose.within_bounds is True

    purged = certify_version(
        _inputs(tmp_path, SETTINGS),
        adapter_dir=tmp_path / "v2",
        requests=[CertifyRequest("r1", ["kind", "side"], None)],
    )
    assert purged.verdict == "incomplete"
    assert purged.within_bounds is None
    p1 = purged.to_json()["requests"]["r1"]
    assert p1["forget_set"] == "unavailable"
    assert p1["uis"]["value"] is None
    assert "unavailable" in p1["uis"]["reason"]
    assert p1["tasks"]["kind"]["ret_diff"] is not None  # what it can: Ret and Val still compared
    assert p1["tasks"]["kind"]["unl_diff"] is None


def test_certify_config_rejects_bad_settings() -> None:
    assert CertifyConfig.from_settings({}).tolerance == 0.05
    with pytest.raises(ValueError, match="unknown certify settings"):
        CertifyConfig.from_settings({"certify": {"tol": 1}})
    with pytest.raises(ValueError, match="tolerance"):
        CertifyConfig.from_settings({"certify": {"tolerance": -1}})
