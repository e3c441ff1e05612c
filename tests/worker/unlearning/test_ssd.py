"""SSD dampening: hand-computed importances and dampening, reference semantics, cache."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from worker.unlearning.grads import per_sample_grads
from worker.unlearning.lora import lora_pairs
from worker.unlearning.methods import MethodContext, get_method
from worker.unlearning.model import wrap_lora
from worker.unlearning.ssd import (
    REFERENCE_DEFAULTS,
    SSDConfig,
    batch_importance,
    cache_path,
    dampen,
    dampening_factors,
    full_importance,
    importance_fingerprint,
    per_sample_importance,
    precompute_full_importance,
    ssd,
    weights_digest,
)
from worker.unlearning.types import IGNORE, SUBSET_HEAD, Batch, ClassificationTask, Partitions, concat_batches
from worker.unlearning.workloads.mlp import NetConfig, mlp_model


@dataclass(frozen=True)
class HalfSquare:
    """Regression task: loss ½(out − y)², so each sample's gradient is (w·x − y)·x by hand."""

    name: str = "reg"
    num_outputs: int = 1
    weight: float = 1.0

    def supervised(self, target: Tensor) -> Tensor:
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (output[:, 0] - target.to(output.dtype)) ** 2

    def metric(self, output: Tensor, target: Tensor) -> float:
        return float(-((output[:, 0] - target) ** 2).mean())


def _w(model: nn.Module) -> Tensor:
    heads = model.heads
    assert isinstance(heads, nn.ModuleDict)
    head = heads["reg"]
    assert isinstance(head, nn.Linear)
    return head.weight


class Linear2(nn.Module):
    """out["reg"] = w·x with w = (1, 1); a subset-ID head the main-task loss never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"reg": nn.Linear(2, 1, bias=False), SUBSET_HEAD: nn.Linear(2, 2)})
        with torch.no_grad():
            _w(self).copy_(torch.tensor([[1.0, 1.0]]))

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: head(inputs["x"]) for name, head in self.heads.items()}


def _batch(x: list[list[float]], y: list[float]) -> Batch:
    n = len(x)
    return Batch(
        inputs={"x": torch.tensor(x, dtype=torch.float32)},
        labels={"reg": torch.tensor(y, dtype=torch.float32)},
        subset=torch.zeros(n, dtype=torch.long),
        sample_ids=[f"s{i}" for i in range(n)],
    )


# D = {(1,0)->0, (0,1)->0, (1,0)->-2}; the last sample is the forget set.
# Per-sample gradients (w·x − y)·x: (1,0), (0,1), (3,0).
FULL = _batch([[1, 0], [0, 1], [1, 0]], [0, 0, -2])
FORGET = _batch([[1, 0]], [-2])
W = "heads.reg.weight"


def test_batch_importance_batch_size_one_is_mean_of_squared_sample_gradients() -> None:
    imp = batch_importance(Linear2(), FULL, [HalfSquare()], batch_size=1)
    assert torch.allclose(imp[W], torch.tensor([[10 / 3, 1 / 3]]))
    # the subset-ID head gets no gradient from the main-task loss: importance 0
    assert float(imp[f"heads.{SUBSET_HEAD}.weight"].abs().sum()) == 0.0


def test_batch_importance_squares_the_batch_mean_gradient() -> None:
    # one batch of 3: mean gradient (4/3, 1/3), squared (16/9, 1/9) — not the per-sample Fisher
    imp = batch_importance(Linear2(), FULL, [HalfSquare()], batch_size=3)
    assert torch.allclose(imp[W], torch.tensor([[16 / 9, 1 / 9]]))
    imp2 = batch_importance(Linear2(), FULL, [HalfSquare()], batch_size=2)
    # batches {(1,0),(0,1)}: mean grad (1/2, 1/2); {(1,0)->-2}: (3, 0) -> ((1/4+9)/2, (1/4)/2)
    assert torch.allclose(imp2[W], torch.tensor([[37 / 8, 1 / 8]]))


def test_per_sample_fisher_via_torch_func() -> None:
    imp = per_sample_importance(Linear2(), FULL, [HalfSquare()])
    assert torch.allclose(imp[W], torch.tensor([[10 / 3, 1 / 3]]))


def test_ssd_on_toy_matches_hand_computation() -> None:
    # batch_size 1, α = 2, λ = 1: I_D = (10/3, 1/3), I_f = (9, 0) -> select w0, β = (10/3)/9 = 10/27
    model = Linear2()
    info = ssd(
        model,
        full=FULL,
        forget=FORGET,
        tasks=[HalfSquare()],
        cfg=SSDConfig(alpha=2, lam=1, batch_size=1, shuffle=False),
    )
    assert torch.allclose(_w(model).detach(), torch.tensor([[10 / 27, 1.0]]))
    assert info["selected"] == 1
    # batch_size 3: I_D = (16/9, 1/9), I_f = (9, 0) -> β = (16/9)/9 = 16/81
    model = Linear2()
    ssd(model, full=FULL, forget=FORGET, tasks=[HalfSquare()], cfg=SSDConfig(alpha=2, lam=1, batch_size=3))
    assert torch.allclose(_w(model).detach(), torch.tensor([[16 / 81, 1.0]]))
    # reference default α = 10: 9 > 10·16/9 is false, nothing changes
    model = Linear2()
    info = ssd(model, full=FULL, forget=FORGET, tasks=[HalfSquare()], cfg=SSDConfig(batch_size=3))
    assert torch.equal(_w(model).detach(), torch.tensor([[1.0, 1.0]]))
    assert info["selected"] == 0


def test_dampen_rules_including_zero_full_importance() -> None:
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 3.0, 4.0, 5.0]]))
    full = {"weight": torch.tensor([[0.0, 1.0, 1.0, 0.0]])}
    forget = {"weight": torch.tensor([[5.0, 0.5, 20.0, 0.0]])}
    info = dampen(model, full, forget, alpha=10.0, lam=1.0)
    # I_D = 0 < I_f -> exactly 0; 0.5 > 10 false -> kept; 20 > 10 -> β = 1/20; 0 > 0 false -> kept
    assert torch.allclose(model.weight.detach(), torch.tensor([[0.0, 3.0, 4.0 / 20, 5.0]]))
    assert model.weight[0, 0].item() == 0.0
    assert info["selected"] == 2
    assert info["zeroed"] == 1
    selected, beta = dampening_factors(torch.tensor([1.0]), torch.tensor([20.0]), 10.0, 100.0)
    assert bool(selected.item())
    assert beta.item() == 1.0  # min(λ·I_D/I_f, 1) caps at 1


def _peft_model(
    hidden_dims: tuple[int, ...] = (6,), embed_dim: int = 6, tasks: tuple[str, ...] = ("a",), rank: int = 4
) -> nn.Module:
    outputs = {"a": 3, "b": 2}
    net = mlp_model(
        NetConfig(
            input_dim=5,
            hidden_dims=hidden_dims,
            embed_dim=embed_dim,
            task_outputs={t: outputs[t] for t in tasks},
            num_subsets=2,
        )
    )
    model = wrap_lora(net, rank=rank, seed=0)
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pair in lora_pairs(model):
            params[pair.b].copy_(torch.randn(params[pair.b].shape, generator=gen) * 0.3)
    return model


def _cls_batch(n: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={"x": torch.randn(n, 5, generator=gen)},
        labels={"a": torch.randint(0, 3, (n,), generator=gen)},
        subset=torch.full((n,), IGNORE, dtype=torch.long),
        sample_ids=[f"x{seed}-{i}" for i in range(n)],
    )


def test_peft_importance_covers_lora_factors_and_trainable_heads_only() -> None:
    model = _peft_model()
    imp = batch_importance(model, _cls_batch(8, 0), [ClassificationTask("a", 3)], batch_size=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(imp) == trainable
    assert any(".lora_A." in n for n in imp)
    assert any(".lora_B." in n for n in imp)
    assert all(float(imp[n].sum()) > 0 for n in imp if ".lora_" in n or ".heads.a." in n)
    assert all(float(imp[n].sum()) == 0 for n in imp if f".heads.{SUBSET_HEAD}." in n)
    assert model.training  # mode restored after the eval-mode computation


def test_full_importance_cache_per_adapter_digest(tmp_path: Path) -> None:
    model = _peft_model()
    data = _cls_batch(8, 0)
    tasks = [ClassificationTask("a", 3)]
    cfg = SSDConfig(batch_size=4)
    imp, hit = full_importance(model, data, tasks, cfg, cache_dir=tmp_path, adapter_digest="abc123")
    assert not hit
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    path = cache_path(tmp_path, "abc123", importance_fingerprint(data, cfg, names, 0))
    assert path.exists()
    # a hit returns the stored tensors even if the model changed (the digest says it did not)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    again, hit = full_importance(model, data, tasks, cfg, cache_dir=tmp_path, adapter_digest="abc123")
    assert hit
    assert all(torch.equal(again[n], imp[n]) for n in imp)
    _, hit_other = full_importance(model, data, tasks, cfg, cache_dir=tmp_path, adapter_digest="other")
    assert not hit_other
    path.write_bytes(b"torn")
    _, hit_torn = full_importance(model, data, tasks, cfg, cache_dir=tmp_path, adapter_digest="abc123")
    assert not hit_torn
    _, hit_other_data = full_importance(
        model, _cls_batch(9, 1), tasks, cfg, cache_dir=tmp_path, adapter_digest="abc123"
    )
    assert not hit_other_data


def test_config_rejects_unknown_and_accepts_lambda_key() -> None:
    assert SSDConfig.from_settings({"alpha": 5, "lambda": 0.5}).lam == 0.5
    with pytest.raises(ValueError, match="unknown SSD setting"):
        SSDConfig.from_settings({"alhpa": 1})
    with pytest.raises(ValueError, match="fisher"):
        SSDConfig.from_settings({"fisher": "exact"})


def test_per_sample_fisher_on_peft_model_equals_batches_of_one() -> None:
    model = _peft_model()
    data = _cls_batch(6, 2)
    tasks = [ClassificationTask("a", 3)]
    vmapped = per_sample_importance(model, data, tasks, chunk_size=4)
    looped = batch_importance(model, data, tasks, batch_size=1)
    assert set(vmapped) == set(looped)
    assert all(torch.allclose(vmapped[n], looped[n], atol=1e-7, rtol=1e-4) for n in looped)


def test_full_importance_does_not_depend_on_the_row_order(tmp_path: Path) -> None:
    """The engine computes the next request's I_D from the retain set, whose rows come in another
    order than the next request's training data: the same data must give the same I_D and key."""
    model = _peft_model()
    data = _cls_batch(12, 3)
    shuffled = data.select(torch.randperm(12, generator=torch.Generator().manual_seed(0)))
    cfg, tasks = SSDConfig(batch_size=5), [ClassificationTask("a", 3)]
    first, _ = full_importance(model, data, tasks, cfg, seed=4, cache_dir=tmp_path, adapter_digest="k")
    again, hit = full_importance(model, shuffled, tasks, cfg, seed=4, cache_dir=tmp_path, adapter_digest="k")
    assert hit
    fresh, _ = full_importance(model, shuffled, tasks, cfg, seed=4)
    assert all(torch.equal(first[n], again[n]) and torch.equal(first[n], fresh[n]) for n in first)


def test_precomputed_full_importance_is_keyed_by_the_weights(tmp_path: Path) -> None:
    model = _peft_model()
    data, tasks = _cls_batch(8, 0), [ClassificationTask("a", 3)]
    key, seconds = precompute_full_importance(
        model, data, tasks, {"batch_size": 4}, seed=1, cache_dir=tmp_path
    )
    assert key == weights_digest(model)
    assert seconds > 0.0
    _, hit = full_importance(
        model, data, tasks, SSDConfig(batch_size=4), seed=1, cache_dir=tmp_path, adapter_digest=key
    )
    assert hit
    assert precompute_full_importance(model, data, tasks, {}, seed=1, cache_dir=None) == (None, 0.0)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1e-3)
    assert weights_digest(model) != key  # any change of the weights: another key


def test_per_sample_fisher_from_one_backward_equals_vmapped_sample_gradients() -> None:
    """LoraMLPView.sample_grad_squares (the path per_sample_importance takes on the core's model)
    against torch.func per-sample gradients, with a second task that some samples lack."""
    model = _peft_model(hidden_dims=(6, 7), embed_dim=4, tasks=("a", "b"), rank=3)
    gen = torch.Generator().manual_seed(5)
    tasks = [ClassificationTask("a", 3), ClassificationTask("b", 2, weight=0.5)]
    data = _cls_batch(11, 4)
    b = torch.randint(0, 2, (11,), generator=gen)
    b[::4] = IGNORE
    data.labels["b"] = b
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    got = per_sample_importance(model, data, tasks, names=names)
    grads = per_sample_grads(model, names, data, tasks)
    for n in names:
        want = grads[n].pow(2).sum(0) / len(data)
        assert torch.allclose(got[n], want, rtol=1e-5, atol=1e-9), n
    assert any(float(got[n].sum()) > 0 for n in names if SUBSET_HEAD not in n)


# ----------------------------------------------------------------------------------------------
# the ssd method's defaults against the public reference (issue 8 part 4)
# ----------------------------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    def __init__(self, batch: Batch, task: str) -> None:
        self.x, self.y = batch.inputs["x"], batch.labels[task]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def _reference_perturber(
    model: nn.Module, retain: Batch, forget: Batch, *, task: str, alpha: float, lam: float, batch_size: int
) -> None:
    """The public SSD reference (Foster et al., ``ParameterPerturber``: ``calc_importance`` and
    ``modify_weight`` with exponent 1, lower bound 1), re-implemented from its description: the
    model in eval mode, ``CrossEntropyLoss()`` per mini-batch, ``imp += grad²`` for every parameter
    with a gradient, divided by the number of batches; D =
    ``DataLoader(ConcatDataset((retain, forget)), batch_size)`` and the forget set's own
    ``DataLoader(forget, batch_size)``, both unshuffled."""
    from torch.utils.data import ConcatDataset, DataLoader

    def calc_importance(loader: DataLoader[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        criterion = nn.CrossEntropyLoss()
        imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for x, y in loader:
            for p in model.parameters():
                p.grad = None
            loss = criterion(model({"x": x})[task], y)
            loss.backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    imp[n].data += p.grad.data.clone().pow(2)
        for v in imp.values():
            v.data /= float(len(loader))
        return imp

    model.eval()
    forget_ds, retain_ds = _Rows(forget, task), _Rows(retain, task)
    forget_imp = calc_importance(DataLoader(forget_ds, batch_size=batch_size))
    full_imp = calc_importance(DataLoader(ConcatDataset((retain_ds, forget_ds)), batch_size=batch_size))
    with torch.no_grad():
        for n, p in model.named_parameters():
            oimp, fimp = full_imp[n], forget_imp[n]
            locations = torch.where(fimp > oimp.mul(alpha))
            update = oimp.mul(lam).div(fimp)[locations]
            update[update > 1.0] = 1.0
            p[locations] = p[locations].mul(update)
    model.train()


def _exposed_split(model: nn.Module, n_retain: int, n_forget: int) -> tuple[Batch, Batch]:
    """Retain rows labelled as the model predicts (small gradients), forget rows with 3× the input
    scale labelled with its least likely class (large gradients): SSD at the reference's α = 10
    selects weights on every CPU kernel path (at 1× it selected none on AVX2, some on the portable
    path: the comparison was vacuous on one of them)."""
    data = _cls_batch(n_retain + n_forget, 7)
    data.inputs["x"][n_retain:] *= 3.0
    with torch.no_grad():
        logits = model(data.inputs)["a"]
    labels = torch.cat([logits[:n_retain].argmax(-1), logits[n_retain:].argmin(-1)])
    data.labels["a"] = labels
    idx = torch.arange(n_retain + n_forget)
    return data.select(idx[:n_retain]), data.select(idx[n_retain:])


def _ssd_ctx(model: nn.Module, retain: Batch, forget: Batch, settings: dict[str, Any]) -> MethodContext:
    empty = forget.select(torch.zeros(0, dtype=torch.long))
    parts = Partitions(
        forget=forget,
        retain_task=empty,
        retain_inst=empty,
        retain_clean=empty,
        forget_tasks=["a"],
        retain_tasks=[],
        anchor_sample_ids=[],
    )
    return MethodContext(
        model=model,
        tasks=[ClassificationTask("a", 3)],
        partitions=parts,
        full=concat_batches([retain, forget]),
        heldout=empty,
        settings=settings,
        retain=retain,
    )


def test_ssd_method_defaults_are_bitwise_the_reference() -> None:
    """Issue 8 part 4: the ``ssd`` method's *defaults* (no settings) give bitwise the reference's
    adapter — α = 10, λ = 1, eval mode, D = retain then forget, unshuffled (600 retain rows: the
    last mini-batch holds retain and forget rows, as the reference's ConcatDataset loader makes it).
    Failed before: the defaults shuffled D and sorted it by sample id. With 150 retain rows the
    forget set's share of D's squared batch means left SSD at α = 10 selecting 0–3 weights, by CPU
    kernel path and thread count (a vacuous comparison); with 600 it selects 39–92 on each."""
    reference = _peft_model(tasks=("a",))
    retain, forget = _exposed_split(reference, 600, 40)
    ours, shuffled = copy.deepcopy(reference), copy.deepcopy(reference)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    _reference_perturber(reference, retain, forget, task="a", alpha=10.0, lam=1.0, batch_size=64)
    result = get_method("ssd")(_ssd_ctx(ours, retain, forget, {}))
    info = result.info["ssd"]
    assert info["config"]["shuffle"] is False
    assert info["config"]["layout"] == "reference"
    assert (info["config"]["alpha"], info["config"]["lam"]) == (10.0, 1.0)
    assert info["selected"] > 0  # the comparison is not vacuous
    changed = [n for n, p in ours.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed
    ref_params = dict(reference.named_parameters())
    for n, p in ours.named_parameters():
        assert torch.equal(p.detach(), ref_params[n].detach()), n
    # shuffling is a named option, and it is not the reference
    get_method("ssd")(_ssd_ctx(shuffled, retain, forget, {"ssd": {"shuffle": True}}))
    assert any(
        not torch.equal(p, q) for p, q in zip(shuffled.parameters(), reference.parameters(), strict=True)
    )


def test_ssd_method_reference_layout_needs_the_retain_set() -> None:
    model = _peft_model(tasks=("a",))
    retain, forget = _exposed_split(model, 20, 5)
    ctx = _ssd_ctx(model, retain, forget, {})
    ctx.retain = None
    with pytest.raises(ValueError, match="needs the retain set"):
        get_method("ssd")(ctx)
    with pytest.raises(ValueError, match="layout"):
        SSDConfig.from_settings({"layout": "shuffled"})
    with pytest.raises(ValueError, match="normalise"):
        SSDConfig.from_settings({"normalise": "task"})


def test_per_task_forget_set_is_compared_per_sample_not_per_pair() -> None:
    """Issue 8 part 4, the α/4 quirk: with two tasks, a per-task forget set (X_f × {a}) has half the
    supervised pairs per row of D. Normalised per pair its ``I_f`` grew 4× against ``I_D`` (α
    effectively 4× smaller); normalised per sample (the ``ssd`` method's default) the same rows
    give the same importance on task a's head. Failed before: batch importance was per pair only."""
    model = _peft_model(tasks=("a", "b"))
    tasks = [ClassificationTask("a", 3), ClassificationTask("b", 2)]
    data = _cls_batch(16, 9)
    data.labels["b"] = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(3))
    forget = Batch(
        inputs=data.inputs,
        labels={"a": data.labels["a"], "b": torch.full((16,), IGNORE, dtype=torch.long)},
        subset=data.subset,
        sample_ids=data.sample_ids,
    )
    head = next(n for n in trainable_names_of(model) if ".heads.a." in n and n.endswith("weight"))
    by_sample = [
        batch_importance(model, b, tasks, batch_size=16, normalise="sample")[head] for b in (data, forget)
    ]
    by_pair = [
        batch_importance(model, b, tasks, batch_size=16, normalise="pair")[head] for b in (data, forget)
    ]
    assert torch.allclose(by_sample[1], by_sample[0])
    assert torch.allclose(by_pair[1], 4 * by_pair[0])
    assert SSDConfig.from_settings(REFERENCE_DEFAULTS).normalise == "sample"


def trainable_names_of(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_default_stage_keeps_its_settings_and_reference_layout_is_not_precomputed(tmp_path: Path) -> None:
    """``default``'s SSD stage still runs shuffled, merged and per pair (its owner's settings); the
    ``ssd`` method's reference layout cannot be computed ahead (its D ends with the next forget set)."""
    cfg = SSDConfig.from_settings({})
    assert (cfg.shuffle, cfg.layout, cfg.normalise) == (True, "merged", "pair")
    model = _peft_model()
    data, tasks = _cls_batch(8, 0), [ClassificationTask("a", 3)]
    assert precompute_full_importance(model, data, tasks, REFERENCE_DEFAULTS, seed=0, cache_dir=tmp_path) == (
        None,
        0.0,
    )
