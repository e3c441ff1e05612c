"""The written-out ViT forward (:mod:`worker.unlearning.vit_view`): what ``lora.fast_forward``
returns for a peft-wrapped transformers ViT with CLS pooling, its outputs and gradients against the
model's own, and the cases where it must not be used."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel

from tests.worker.unlearning.tiny_vit import TinyViTWorkload, _vit_config
from tests.worker.unlearning.toy_nets import toy_model
from worker.unlearning.grads import partition_task_grads
from worker.unlearning.lora import LoraMLPView, fast_forward, joint_grads, lora_pairs, param_groups
from worker.unlearning.model import MultiTaskModel, make_heads, wrap_lora
from worker.unlearning.types import Batch
from worker.unlearning.vit_view import LoraViTView


def _model(
    layers: int = 2, attention: str = "eager", targets: tuple[str, ...] = ("q_proj", "v_proj")
) -> PeftModel:
    """A tiny ViT (``layers`` layers) with LoRA on ``targets``, every adapter factor non-zero (peft's
    B starts at 0, which would hide a wrong B path), heads perturbed off their init."""
    from transformers import ViTModel

    config = _vit_config()
    config.num_hidden_layers = layers
    config._attn_implementation = attention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        heads = make_heads(32, {"bright": 3, "level": 1}, 3)
        net = MultiTaskModel(ViTModel(config), heads, pooling="cls_token")
    net.lora_template = TinyViTWorkload().lora_config()
    net.lora_template.target_modules = list(targets)
    model = wrap_lora(net, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pair in lora_pairs(model):
            b = dict(model.named_parameters())[pair.b]
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.eval()
    return model


def _batch(n: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    level = torch.rand(n, generator=gen)
    level[::3] = float("nan")  # some rows without the regression label
    return Batch(
        inputs={"pixel_values": torch.rand(n, 1, 8, 8, generator=gen)},
        labels={"bright": torch.randint(0, 3, (n,), generator=gen), "level": level},
        subset=torch.zeros(n, dtype=torch.long),
    )


@pytest.mark.parametrize(
    ("layers", "targets"),
    [(1, ("q_proj", "v_proj")), (2, ("q_proj", "v_proj")), (2, ("q_proj", "k_proj", "v_proj", "o_proj"))],
)
def test_view_reproduces_the_models_outputs(layers: int, targets: tuple[str, ...]) -> None:
    """Every token through every layer: bit for bit the model's ops. The shipped view (the last
    layer on the CLS token only) agrees to float rounding. With LoRA on every attention projection
    (the scenes workload's targets) as on q / v."""
    model = _model(layers, targets=targets)
    assert len(lora_pairs(model)) == len(targets) * layers
    view = fast_forward(model)
    assert isinstance(view, LoraViTView)
    assert view.cls_only
    inputs = _batch(9, 2).inputs
    with torch.no_grad():
        want = model(inputs)
        every_token = dataclasses.replace(view, cls_only=False)(inputs)
        got = view(inputs)
    assert set(got) == set(want) == {"bright", "level", "subset_id"}
    assert all(torch.equal(want[k], every_token[k]) for k in want)
    assert all(torch.allclose(want[k], got[k], atol=1e-6, rtol=1e-5) for k in want)


def test_gradients_through_the_view_are_the_models() -> None:
    """``partition_task_grads`` through the view (per partition, as through the model: the view is
    not an MLP) gives the model's per-(partition, task) gradients of the LoRA factors and heads."""
    model = _model(2)
    view = fast_forward(model)
    assert isinstance(view, LoraViTView)
    assert not joint_grads(view, model)
    groups = param_groups(model)
    names = [*groups.lora_a, *groups.lora_b, *groups.head_params(["bright", "level"])]
    parts = [_batch(6, 3), _batch(0, 4), _batch(5, 5)]
    tasks = TinyViTWorkload().tasks()
    want = partition_task_grads(model, names, parts, tasks)
    got = partition_task_grads(model, names, parts, tasks, forward=view)
    assert all(float(want[n].abs().sum()) > 0 for n in groups.lora_a)  # the test can fail
    assert all(torch.allclose(want[n], got[n], atol=1e-6, rtol=1e-4) for n in names)


def test_the_view_is_not_used_where_it_would_compute_something_else() -> None:
    """SDPA attention (a different kernel) and a merged adapter (B·A inside the base weight) fall
    back to the model."""
    sdpa = _model(2, attention="sdpa")
    assert fast_forward(sdpa) is sdpa
    merged = _model(2)
    merged.merge_adapter()
    assert fast_forward(merged) is merged


def test_the_mlp_view_keeps_the_joint_gradient_pass() -> None:
    model = toy_model(hidden=5, rank=2, num_subsets=2)
    view = fast_forward(model)
    assert isinstance(view, LoraMLPView)
    assert joint_grads(view, model)
    assert not joint_grads(model, model)


def test_the_views_fisher_is_the_per_sample_gradients_squared() -> None:
    """SSD's per-sample importance through the view (one backward, per-row token sums) equals the
    mean of the squared ``vmap`` per-sample gradients of every LoRA factor and head."""
    from worker.unlearning.grads import per_sample_grads
    from worker.unlearning.ssd import per_sample_importance, trainable_names

    model = _model(2)
    batch = _batch(7, 6)
    tasks = TinyViTWorkload().tasks()
    names = trainable_names(model)
    view = fast_forward(model)
    assert isinstance(view, LoraViTView)
    params = dict(model.named_parameters())
    assert {id(params[n]) for n in names} <= view.tensor_ids()  # the squares path is the one taken
    got = per_sample_importance(model, batch, tasks, names=names, chunk_size=4)
    grads = per_sample_grads(model, names, batch, tasks)
    assert all(float(grads[n].abs().sum()) > 0 for n in names if "lora_" in n)  # the test can fail
    for n in names:  # (the subset-ID head has no main-task gradient: 0 on both sides)
        assert torch.allclose(got[n], grads[n].pow(2).mean(0), rtol=1e-4, atol=1e-9), n
