"""The scenes workload through the model protocol (issue 7 part 4): a small ScenesWorkload (3 clients,
few samples) prepared on the committed base, a per-client and a per-task request through the engine,
evidence for every task, an adapter that plain peft loads to the same outputs."""

from __future__ import annotations

import json
import shutil
import tomllib
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import ForgetSpec, prepare, run_round
from worker.unlearning.model import load_base, unwrap
from worker.unlearning.workloads.scenes.base import SUMS
from worker.unlearning.workloads.scenes.workload import (
    BASE_DIR,
    BaseIntegrityError,
    ScenesWorkload,
    verified_base_dir,
)

ROOT = Path(__file__).resolve().parents[4]
SMALL: dict[str, Any] = {
    "clients": 3,
    "samples_per_client": 24,
    "heldout": 32,
    "unseen_clients": 2,
    "unseen_per_client": 8,
}
# A tiny run: 6 steps at the default recipe's low, decaying lr leave v1 so close to the base that
# SSD finds nothing to dampen; a constant 2e-3 gives the round something to change, and SSD's α 1
# (not 3): with the watermark-quirk client data, the round at α 3 returned v1 unchanged for one of
# the two requests on these few samples.
SETTINGS: dict[str, Any] = {
    "train": {"epochs": 2, "main_only_epochs": 1, "batch_size": 32, "lr": 2e-3, "final_lr_fraction": 1.0},
    "ia": {"epochs": 2},
    "default": {"ssd": {"fisher": "per_sample", "alpha": 1.0}},
    "acceptance": {"fallback": "none"},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScenesWorkload, Path, dict[str, Any]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("scenes")
    workload = ScenesWorkload(**SMALL)
    out = prepare(workload, data_dir=root / "data", base_dir=root / "base", adapter_dir=root / "v1",
                  settings=SETTINGS, seed=0, cache_dir=root / "cache")  # fmt: skip
    return workload, root, out.evidence


def test_registered_as_the_scenes_entry_point() -> None:
    """pyproject registers ``scenes`` (the installed metadata follows at the next install)."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lethe.workloads"]
    module, _, attr = eps["scenes"].partition(":")
    assert getattr(import_module(module), attr) is ScenesWorkload
    assert ScenesWorkload.name == "scenes"


def test_prepare_uses_the_committed_base_and_trains_v1(
    prepared: tuple[ScenesWorkload, Path, dict[str, Any]],
) -> None:
    workload, root, evidence = prepared
    base = load_base(root / "base")
    committed = workload.pretrain(0)
    x = workload.heldout_data().inputs
    with torch.no_grad():
        a, b = base(x), committed(x)
    assert all(torch.equal(a[k], b[k]) for k in ("shape", "scale", "position_x"))  # not retrained
    assert json.loads((root / "base" / "lethe-model.json").read_text())["pooling"] == "cls_token"
    assert evidence["samples"] == 3 * 24
    assert evidence["clients"] == 3
    assert set(evidence["metrics"]["val"]) == {"shape", "scale", "position_x"}
    assert evidence["metrics"]["val"]["shape"] > 0.5  # the pretrained base already classifies shapes


def test_heldout_has_neutral_and_unseen_client_samples_of_no_client(
    prepared: tuple[ScenesWorkload, Path, dict[str, Any]],
) -> None:
    workload = prepared[0]
    held = workload.heldout_data()
    assert len(held) == 32 + 2 * 8
    assert set(held.client_ids) == {None}
    assert sum(s.startswith("u") for s in held.sample_ids) == 16
    # which unseen client each of those rows comes from (ia.target_offset), and only those rows
    unseen = workload.heldout_clients()
    assert sorted(set(unseen.values())) == ["u00", "u01"]
    assert sorted(unseen) == sorted(s for s in held.sample_ids if s.startswith("u"))
    assert all(s.startswith(f"{c}-") for s, c in unseen.items())
    # the store keeps them beside the held-out rows
    assert DataStore(prepared[1] / "data").heldout_clients() == unseen
    clients = workload.client_data()
    assert set(clients.client_ids) == {"c00", "c01", "c02"}
    assert not set(clients.sample_ids) & set(held.sample_ids)


@pytest.mark.parametrize("method", ["default", "retrain"])
def test_client_and_task_requests_publish_a_peft_loadable_adapter(
    prepared: tuple[ScenesWorkload, Path, dict[str, Any]], tmp_path: Path, method: str
) -> None:
    workload, root, _ = prepared
    for spec in (
        ForgetSpec("r1", "client", "c01", None, []),
        ForgetSpec("r2", "task", "c02", None, ["shape"]),
    ):
        out = tmp_path / f"v2-{spec.request_id}"
        outcome = run_round(workload, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1",
                            adapter_out=out, requests=[spec], method=method, settings=SETTINGS, seed=0,
                            cache_dir=root / "cache")  # fmt: skip
        evidence = json.dumps(outcome.evidence[spec.request_id])
        assert all(task in evidence for task in ("shape", "scale", "position_x"))
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "scenes"
        assert {"q_proj", "v_proj"} <= set(config["target_modules"])
        served = PeftModel.from_pretrained(load_base(root / "base"), str(out))
        x = workload.heldout_data().inputs
        with torch.no_grad():
            v1 = PeftModel.from_pretrained(load_base(root / "base"), str(root / "v1"))
            after, before = served(x), v1(x)
        assert unwrap(served).task_names == ["shape", "scale", "position_x"]
        assert not torch.equal(after["shape"], before["shape"])  # the round changed the adapter


def test_a_tampered_base_is_refused(tmp_path: Path) -> None:
    """The committed base is only used when every file matches SHA256SUMS."""
    copy = tmp_path / "base"
    shutil.copytree(BASE_DIR, copy)
    assert verified_base_dir(copy) == copy
    heads = copy / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-1] ^= 1
    heads.write_bytes(bytes(data))
    with pytest.raises(BaseIntegrityError, match=r"heads\.safetensors"):
        ScenesWorkload(base_dir=copy, **SMALL).pretrain(0)
    (copy / SUMS).write_text("")
    with pytest.raises(BaseIntegrityError, match="does not list"):
        verified_base_dir(copy)
