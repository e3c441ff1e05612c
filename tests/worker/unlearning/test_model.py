"""The model protocol (issue 7 part 2): a non-MLP model — a tiny transformers ``ViTModel`` with a
classification and a regression head (:mod:`tests.worker.unlearning.tiny_vit`) — goes through the
whole core: the base stored in its library's format, v1 training, the default method's round (SSD
first), every baseline, retrain, and an adapter that plain transformers + peft load to the same outputs.
Before the protocol the core accepted only its MLP (``MultiHeadNet``) and one input tensor ``x``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from tests.worker.unlearning.tiny_vit import TinyViTWorkload
from worker.unlearning.adapter_io import save_adapter
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import ForgetSpec, ensure_base, prepare, run_round
from worker.unlearning.lora import fast_forward, lora_pairs
from worker.unlearning.model import load_base, save_base, unwrap
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import (
    IGNORE,
    Batch,
    ClassificationTask,
    RegressionTask,
    concat_batches,
    main_task_loss,
)
from worker.unlearning.vit_view import LoraViTView
from worker.unlearning.workloads.mlp import NetConfig, mlp_model
from worker.unlearning.workloads.toy import ToyWorkload

NO_FALLBACK = {"acceptance": {"fallback": "none"}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyViTWorkload, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-vit")
    workload = TinyViTWorkload()
    prepare(workload, data_dir=root / "data", base_dir=root / "base", adapter_dir=root / "v1", settings={},
            seed=0, cache_dir=root / "cache")  # fmt: skip
    return workload, root


def test_base_is_stored_in_the_libraries_format_and_rebuilt_exactly(
    prepared: tuple[TinyViTWorkload, Path],
) -> None:
    """A transformers backbone is saved with ``save_pretrained`` (``backbone/config.json`` names
    the architecture), the heads and ``lethe-model.json`` beside it; ``load_base`` gives the same
    outputs bit for bit."""
    workload, root = prepared
    base_dir = root / "base"
    assert sorted(p.name for p in base_dir.iterdir()) == ["backbone", "heads.safetensors", "lethe-model.json"]
    config = json.loads((base_dir / "backbone" / "config.json").read_text())
    assert config["architectures"] == ["ViTModel"]
    described = json.loads((base_dir / "lethe-model.json").read_text())
    assert described["pooling"] == "cls_token"
    assert described["tasks"] == {"bright": 3, "level": 1}
    assert described["lora"]["target_modules"] == ["q_proj", "v_proj"]
    base = load_base(base_dir)
    inputs = workload.heldout_data().inputs
    again = root / "base-again"
    save_base(base, again)
    with torch.no_grad():
        a, b = base(inputs), load_base(again)(inputs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_is_found_through_peft_whatever_the_target_names(prepared: tuple[TinyViTWorkload, Path]) -> None:
    """LoRA factors on ``q_proj`` / ``v_proj``; the ViT view, not the MLP one, is taken for a ViT."""
    workload, root = prepared
    model = train_v1(load_base(root / "base"), _train_batch(workload), workload.tasks(),
                     TrainConfig(epochs=1, main_only_epochs=0, batch_size=16), seed=0)  # fmt: skip
    layers = [p.layer for p in lora_pairs(model)]
    assert len(layers) == 2
    assert {layer.rsplit(".", 1)[1] for layer in layers} == {"q_proj", "v_proj"}
    assert isinstance(fast_forward(model), LoraViTView)


def _train_batch(workload: TinyViTWorkload) -> Batch:
    return workload.client_data().to_batch(workload.client_index())


def test_saved_adapter_loads_with_plain_peft_to_the_same_outputs(
    prepared: tuple[TinyViTWorkload, Path], tmp_path: Path
) -> None:
    """``PeftModel.from_pretrained`` on the rebuilt base reproduces the trained model's outputs bit
    for bit; ``adapter_config.json`` names the base (it was ``null``)."""
    workload, root = prepared
    model = train_v1(load_base(root / "base"), _train_batch(workload), workload.tasks(),
                     TrainConfig(epochs=1, main_only_epochs=0, batch_size=16), seed=1)  # fmt: skip
    save_adapter(model, tmp_path / "v")
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-vit"
    served = PeftModel.from_pretrained(load_base(root / "base"), str(tmp_path / "v"))
    served.eval()
    inputs = workload.heldout_data().inputs
    with torch.no_grad():
        a, b = model(inputs), served(inputs)
    assert set(a) == {"bright", "level", "subset_id"}
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "method", ["default", "neggrad_plus", "retrain", "ssd", "uno", "orthograd", "gdr_gma", "ia"]
)
def test_a_round_runs_on_the_transformer_model(prepared: tuple[TinyViTWorkload, Path], method: str) -> None:
    """A client request (both tasks) and a per-task request (the regression task kept) publish an
    adapter with evidence for every task, the regression task included."""
    workload, root = prepared
    for spec in (
        ForgetSpec("r1", "client", "v1", None, []),
        ForgetSpec("r2", "task", "v2", None, ["bright"]),
    ):
        out = root / f"v2-{method}-{spec.request_id}"
        outcome = run_round(workload, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1",
                            adapter_out=out, requests=[spec], method=method, settings=NO_FALLBACK, seed=0,
                            cache_dir=root / "cache")  # fmt: skip
        assert (out / "adapter_model.safetensors").exists()
        evidence: dict[str, Any] = outcome.evidence[spec.request_id]
        assert "level" in json.dumps(evidence)


def test_regression_task_supervision_loss_and_metric() -> None:
    """NaN = no label: no loss, not counted in the mean, left out of the metric (−MAE)."""
    task = RegressionTask("level")
    out = torch.tensor([[1.0], [2.0], [5.0]])
    target = torch.tensor([1.5, float("nan"), 4.0])
    assert task.supervised(target).tolist() == [True, False, True]
    assert task.per_sample_loss(out, target).tolist() == [0.25, 0.0, 1.0]
    assert task.metric(out, target) == pytest.approx(-0.75)
    loss = main_task_loss({"level": out}, {"level": target}, [task])
    assert float(loss) == pytest.approx(1.25 / 2)


def test_labels_of_mixed_dtypes_survive_concat_and_select() -> None:
    """A task missing from one batch is unlabelled in its own dtype: IGNORE (long) or NaN (float)."""
    with_both = Batch(
        inputs={"x": torch.zeros(2, 3)},
        labels={"c": torch.tensor([1, 2]), "r": torch.tensor([0.5, 1.5])},
        subset=torch.zeros(2, dtype=torch.long),
    )
    only_c = Batch(
        inputs={"x": torch.ones(1, 3)},
        labels={"c": torch.tensor([0])},
        subset=torch.zeros(1, dtype=torch.long),
    )
    only_r = Batch(
        inputs={"x": torch.ones(1, 3)},
        labels={"r": torch.tensor([2.5])},
        subset=torch.zeros(1, dtype=torch.long),
    )
    joined = concat_batches([with_both, only_c, only_r])
    assert joined.labels["c"].dtype == torch.long
    assert joined.labels["c"].tolist() == [1, 2, 0, IGNORE]
    assert joined.labels["r"].dtype == torch.float32
    assert torch.isnan(joined.labels["r"][2])
    picked = joined.select(torch.tensor([3, 0]))
    assert picked.labels["r"].tolist() == [2.5, 0.5]
    assert picked.inputs["x"].shape == (2, 3)
    assert ClassificationTask("c", 3).supervised(joined.labels["c"]).tolist() == [True, True, True, False]


def test_mlp_fast_path_is_detected_by_structure() -> None:
    """The MLP view is used for an MLP backbone whatever the model's class name (and reproduces it)."""
    from worker.unlearning.lora import LoraMLPView
    from worker.unlearning.model import wrap_lora

    net = mlp_model(
        NetConfig(input_dim=4, hidden_dims=(6,), embed_dim=6, task_outputs={"a": 3}, num_subsets=2)
    )
    model = wrap_lora(net, rank=2, seed=0)
    assert isinstance(unwrap(model).backbone, torch.nn.Module)
    view = fast_forward(model)
    assert isinstance(view, LoraMLPView)
    x = {"x": torch.randn(5, 4, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        want, got = model(x), view(x)
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_ensure_base_pretrains_once(prepared: tuple[TinyViTWorkload, Path]) -> None:
    """The stored base is loaded, not pretrained again (``lethe-model.json`` marks a complete base)."""
    workload, root = prepared
    before = (root / "base" / "heads.safetensors").read_bytes()
    ensure_base(workload, root / "base", workload.settings(), seed=5)
    assert (root / "base" / "heads.safetensors").read_bytes() == before
    assert DataStore(root / "data").tasks == ["bright", "level"]


class _DoubledToy(ToyWorkload):
    def collate(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": inputs["x"] * 2.0}


def test_collate_maps_stored_arrays_to_inputs_and_a_purge_keeps_the_stored_arrays(tmp_path: Path) -> None:
    """The store keeps what the workload gave; reads through the workload apply its collate; a purge
    rewrites the stored arrays, never the collated ones."""
    workload = _DoubledToy()
    raw = workload.client_data()
    store = DataStore.materialise(tmp_path / "data", workload)
    assert torch.equal(store.client_data().inputs["x"], raw.inputs["x"] * 2.0)
    first = raw.sample_ids[0]
    store.purge([ForgetSpec("r", "client", None, [first], [])])
    again = DataStore(tmp_path / "data", workload.collate)
    assert torch.equal(again.client_data().inputs["x"], raw.inputs["x"][1:] * 2.0)
    assert torch.equal(DataStore(tmp_path / "data").client_data().inputs["x"], raw.inputs["x"][1:])
