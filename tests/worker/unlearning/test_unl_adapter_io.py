"""Adapter I/O through peft: a reloaded adapter (and a rebuilt base) reproduce outputs exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.utils.other import ModulesToSaveWrapper

from worker.unlearning.adapter_io import load_adapter, save_adapter
from worker.unlearning.model import MultiTaskModel, load_base, save_base, wrap_lora
from worker.unlearning.state import RoundState
from worker.unlearning.types import SUBSET_HEAD
from worker.unlearning.workloads.toy import ToyWorkload


def _perturbed(base: MultiTaskModel) -> torch.nn.Module:
    model = wrap_lora(base, rank=4, alpha=4, seed=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model.eval()
    return model


def test_base_round_trip(tmp_path: Path) -> None:
    workload = ToyWorkload()
    net = workload.untrained_model(seed=3)
    save_base(net, tmp_path / "base")
    described = json.loads((tmp_path / "base" / "lethe-model.json").read_text())
    assert described["pooling"] == "identity"
    assert described["tasks"] == {"kind": 4, "side": 2}
    config = json.loads((tmp_path / "base" / "backbone" / "config.json").read_text())
    assert config["class"] == "worker.unlearning.workloads.mlp:Trunk"
    rebuilt = load_base(tmp_path / "base")
    x = workload.client_data().inputs
    out_a, out_b = net.eval()(x), rebuilt(x)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert not any(p.requires_grad for p in rebuilt.parameters())


def test_reloaded_adapter_reproduces_outputs_exactly(tmp_path: Path) -> None:
    workload = ToyWorkload()
    base = workload.untrained_model(seed=0)
    save_base(base, tmp_path / "base")
    model = _perturbed(base)
    assert isinstance(model.heads["kind"], ModulesToSaveWrapper)  # type: ignore[index]
    files = save_adapter(model, tmp_path / "v1", RoundState())  # type: ignore[arg-type]
    assert sorted(f.name for f in files) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "unlearning_state.json",
    ]
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == sorted(f.name for f in files)
    assert (
        json.loads((tmp_path / "v1" / "adapter_config.json").read_text())["base_model_name_or_path"] == "toy"
    )
    x = workload.heldout_data().inputs
    for trainable in (False, True):
        reloaded = load_adapter(tmp_path / "base", tmp_path / "v1", trainable=trainable)
        with torch.no_grad():
            a, b = model(x), reloaded(x)
        assert set(a) == set(b) == {"kind", "side", SUBSET_HEAD}
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(p.requires_grad for p in reloaded.parameters()) == trainable


def test_load_adapter_leaves_given_base_untouched(tmp_path: Path) -> None:
    workload = ToyWorkload()
    base = workload.untrained_model(seed=0)
    model = _perturbed(base)
    save_adapter(model, tmp_path / "v1")  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    load_adapter(base, tmp_path / "v1")
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
