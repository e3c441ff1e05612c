"""The gradient baselines ``neggrad_plus``, ``orthograd``, ``gdr_gma``, ``uno``: the math each paper
states (on small tensors and a toy peft model), and one request of each on ``digits-clients``."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, cast

import pytest
import torch
from peft import PeftModel
from torch import nn
from torch.func import functional_call, grad

from tests.worker.unlearning.distributions import assert_distribution
from tests.worker.unlearning.toy_nets import toy_batch, toy_model
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import EngineInputs, apply_method, ensure_base, evaluate, request_context
from worker.unlearning.grads import per_sample_grads
from worker.unlearning.lora import trainable_head
from worker.unlearning.methods import MethodContext, available_methods, get_method
from worker.unlearning.methods.gdr_gma import (
    joint_gradient,
    magnitude_weight,
    rectify_against_bank,
    rectify_pair,
)
from worker.unlearning.methods.gradient_loop import (
    FlatSpace,
    loss_and_grad,
    per_sample_flat,
    supervised_pairs,
    updated_names,
)
from worker.unlearning.methods.neggrad_plus import neggrad_plus_direction
from worker.unlearning.methods.orthograd import orthograd_direction, project_out
from worker.unlearning.methods.uno import surgery_direction, uno_loss_grad
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import (
    SUBSET_HEAD,
    Batch,
    ClassificationTask,
    ForgetSpec,
    Partitions,
    concat_batches,
    main_task_loss,
)
from worker.unlearning.workload import load_workload

BASELINES = ["neggrad_plus", "orthograd", "gdr_gma", "uno"]
TASKS = [ClassificationTask("a", 3), ClassificationTask("b", 2)]


# ----------------------------------------------------------------------------------------------
# a toy peft model and a partial-task request on it
# ----------------------------------------------------------------------------------------------


def _model() -> nn.Module:
    return toy_model(hidden=6, rank=4, num_subsets=3)


def _batch(n: int, seed: int, tasks: list[str], subset: int = 0) -> Batch:
    return toy_batch(n, seed, tasks, subset=subset)


def _ctx(model: nn.Module, settings: Mapping[str, Any]) -> MethodContext:
    """Partial-task request: forget task ``a`` of 8 samples, keep ``b`` (all four partitions live)."""
    parts = Partitions(
        forget=_batch(8, 1, ["a"], subset=1),
        retain_task=_batch(8, 1, ["b"], subset=1),
        retain_inst=_batch(10, 2, ["a"]),
        retain_clean=_batch(10, 2, ["b"]),
        forget_tasks=["a"],
        retain_tasks=["b"],
        anchor_sample_ids=[],
    )
    retain = _batch(24, 2, ["a", "b"])
    return MethodContext(
        model=model,
        tasks=TASKS,
        partitions=parts,
        full=concat_batches([retain, parts.forget]),
        heldout=_batch(10, 3, ["a", "b"]),
        settings=settings,
        seed=0,
    )


def _space(model: nn.Module) -> FlatSpace:
    return FlatSpace(model, updated_names(model, TASKS, update_heads=True))


# ----------------------------------------------------------------------------------------------
# registry and the shared loop
# ----------------------------------------------------------------------------------------------


def test_baselines_are_registered_and_reject_unknown_settings() -> None:
    assert set(BASELINES) <= set(available_methods())
    for name in BASELINES:
        with pytest.raises(ValueError, match=f"unknown {name} setting 'nope'"):
            get_method(name)(_ctx(_model(), {name: {"nope": 1}}))


def test_per_sample_rows_sum_to_the_batch_gradient() -> None:
    """vmap(grad) rows / supervised pairs = the main-task loss gradient (what every baseline relies on)."""
    model = _model()
    space = _space(model)
    batch = concat_batches([_batch(6, 4, ["a"]), _batch(5, 5, ["a", "b"])])
    rows = per_sample_flat(model, space, batch, TASKS)
    loss, g = loss_and_grad(model, space, batch, TASKS)
    assert rows.shape == (11, space.size)
    assert supervised_pairs(batch, TASKS) == 16
    torch.testing.assert_close(rows.sum(0) / 16, g, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert loss == pytest.approx(
            float(main_task_loss(model(batch.inputs), batch.labels, TASKS)), rel=1e-6
        )


# ----------------------------------------------------------------------------------------------
# OrthoGrad (Algorithm 1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["gram", "qr"])
def test_orthograd_projection_is_orthogonal_to_every_retain_sample(solver: str) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 60, generator=gen, dtype=torch.float64)
    vec = torch.randn(60, generator=gen, dtype=torch.float64)
    out, rank = project_out(vec, rows, solver=solver)
    assert rank == 12
    assert float((rows @ out).abs().max()) < 1e-10 * float(rows.norm() * vec.norm())
    # the removed part lies in span(rows): out is the least-squares residual of vec on rows
    coef = torch.linalg.lstsq(rows.T, vec.unsqueeze(1)).solution
    torch.testing.assert_close(out, vec - (rows.T @ coef).squeeze(1))


@pytest.mark.parametrize("solver", ["gram", "qr"])
def test_orthograd_rank_deficient_retain_gradients_remove_only_their_span(solver: str) -> None:
    """Zero rows, duplicates and combinations (rank 5 of 14 rows): exactly span(rows) is removed."""
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(40, 5, generator=gen, dtype=torch.float64)).Q  # [40, 5]
    mix = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    rows = torch.cat([torch.zeros(2, 40, dtype=torch.float64), basis.T, mix @ basis.T, basis[:, :1].T * 3])
    rows = rows[torch.randperm(rows.shape[0], generator=gen)]
    outside = torch.randn(40, generator=gen, dtype=torch.float64)
    outside -= basis @ (basis.T @ outside)  # the part of the forget gradient that must stay
    vec = outside + basis @ torch.randn(5, generator=gen, dtype=torch.float64)
    out, rank = project_out(vec, rows, solver=solver)
    assert rank == 5
    torch.testing.assert_close(out, outside)


@pytest.mark.parametrize("solver", ["gram", "qr"])
def test_orthograd_zero_retain_gradients_leave_the_forget_gradient_intact(solver: str) -> None:
    """LoRA B = 0: every retain gradient on A is 0 — nothing may be removed from the A block."""
    gen = torch.Generator().manual_seed(2)
    vec = torch.randn(30, generator=gen)
    out, rank = project_out(vec, torch.zeros(7, 30), solver=solver)
    assert rank == 0
    assert torch.equal(out, vec)
    rows = torch.randn(7, 30, generator=gen)
    rows[:, :18] = 0.0  # the "A block" gets no retain gradient
    out, rank = project_out(vec, rows, solver=solver)
    assert rank == 7
    torch.testing.assert_close(out[:18], vec[:18], rtol=0, atol=1e-6)
    assert float((rows @ out).abs().max()) < 1e-5


def test_orthograd_direction_on_a_model_is_orthogonal_to_per_sample_retain_gradients() -> None:
    """α = 0: the update is g_u^⊥, orthogonal to each retain sample's gradient (from per_sample_grads)."""
    model = _model()
    space = _space(model)
    ctx = _ctx(model, {})
    retain = concat_batches([ctx.partitions.retain_task, ctx.partitions.retain_inst])
    rows = per_sample_flat(model, space, retain, TASKS)
    _, g_f = loss_and_grad(model, space, ctx.partitions.forget, TASKS)
    direction, rank = orthograd_direction(-g_f, rows, rows.mean(0), alpha=0.0, rank_tol=1e-6)
    independent = per_sample_grads(model, space.names, retain, TASKS)
    G = space.pack(independent, lead=1)
    assert rank == len(retain)
    cos = (G @ direction) / (G.norm(dim=1) * direction.norm())
    assert float(cos.abs().max()) < 1e-4
    assert float(direction.norm()) > 0.1 * float(g_f.norm())  # not everything was removed


# ----------------------------------------------------------------------------------------------
# GDR-GMA (Algorithms 1–2, Eqs. 4–6)
# ----------------------------------------------------------------------------------------------


def test_gdr_gma_magnitude_weight_is_eq6() -> None:
    for dev in (0.0, 0.01, 0.02, 0.05, 0.3):
        assert magnitude_weight(dev, 100.0, 0.02) == pytest.approx(1 / (1 + math.exp(100 * (dev - 0.02))))
    assert magnitude_weight(0.02, 100.0, 0.02) == pytest.approx(0.5)
    assert magnitude_weight(0.0, 100.0, 0.02) > 0.88  # State I: forgetting gets the large weight
    assert magnitude_weight(1e6, 100.0, 0.02) == 0.0  # State III, no overflow


def test_gdr_gma_rectification_removes_the_conflicting_component() -> None:
    g_r = torch.tensor([1.0, 0.0, 1.0])
    g_f = torch.tensor([-1.0, 2.0, 0.0])  # cos < 0: a conflict
    f_hat, r_hat, conflict = rectify_pair(g_f, g_r)
    assert conflict
    assert float(f_hat @ g_r) == pytest.approx(0.0, abs=1e-6)  # Eq. 4 against the other's original
    assert float(r_hat @ g_f) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(f_hat, torch.tensor([-0.5, 2.0, 0.5]))
    same_f, same_r, conflict = rectify_pair(torch.tensor([1.0, 1.0, 0.0]), g_r)  # cos > 0: unchanged
    assert not conflict
    assert torch.equal(same_f, torch.tensor([1.0, 1.0, 0.0]))
    assert same_r is g_r


def test_gdr_gma_joint_gradient_of_the_bank() -> None:
    g_r = torch.tensor([1.0, 0.0])
    bank = torch.tensor([[-1.0, 1.0], [-3.0, -1.0], [2.0, 0.0], [-5.0, 0.0], [0.0, 0.0]])
    usable = torch.tensor([True, True, True, False, True])  # row 3: no entry from the last epoch
    joint = joint_gradient(g_r, bank, usable)
    assert joint is not None
    torch.testing.assert_close(joint, torch.tensor([-2.0, 0.0]))  # mean of the conflicting rows 0, 1
    r_hat, hit = rectify_against_bank(torch.tensor([1.0, 1.0]), joint)
    assert hit
    assert float(r_hat @ joint) == pytest.approx(0.0, abs=1e-6)
    assert joint_gradient(g_r, bank[2:3], usable[2:3]) is None  # no conflict: no joint gradient
    kept, hit = rectify_against_bank(torch.tensor([-1.0, 1.0]), joint)  # cos(ĝ_r, joint) > 0
    assert not hit
    assert torch.equal(kept, torch.tensor([-1.0, 1.0]))


# ----------------------------------------------------------------------------------------------
# UNO (Eq. 3, surgery step) and NegGrad+
# ----------------------------------------------------------------------------------------------


def test_uno_gradient_is_the_gradient_of_eq3() -> None:
    """∇(L_r + β_o·cos²(g_r, g_f)) of the method (double backward) = nested ``torch.func.grad``."""
    model = _model()
    space = _space(model)
    ctx = _ctx(model, {})
    retain = concat_batches([ctx.partitions.retain_task, ctx.partitions.retain_inst])
    forget, beta_o = ctx.partitions.forget, 3.0
    g, l_r, cos = uno_loss_grad(model, space, retain, forget, TASKS, beta_o)

    def loss(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        out = cast(dict[str, torch.Tensor], functional_call(model, params, (batch.inputs,)))
        return main_task_loss(out, batch.labels, TASKS)

    def uno(params: dict[str, torch.Tensor]) -> torch.Tensor:
        gr = space.pack(grad(loss)(params, retain))
        gf = space.pack(grad(loss)(params, forget))
        c = (gr @ gf) / (gr.norm() * gf.norm())
        total: torch.Tensor = loss(params, retain) + beta_o * c**2
        return total

    params = {n: p.detach() for n, p in model.named_parameters() if n in space.names}
    reference = space.pack(grad(uno)(params))
    torch.testing.assert_close(g, reference, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert l_r == pytest.approx(
            float(main_task_loss(model(retain.inputs), retain.labels, TASKS)), rel=1e-6
        )
    _, g_r = loss_and_grad(model, space, retain, TASKS)
    _, g_f = loss_and_grad(model, space, forget, TASKS)
    assert cos == pytest.approx(float((g_r @ g_f) / (g_r.norm() * g_f.norm())), rel=1e-4)
    assert abs(cos) > 1e-3  # the regulariser is live on this model


def test_uno_surgery_step_has_no_forget_component() -> None:
    gen = torch.Generator().manual_seed(3)
    g_r, g_f = torch.randn(20, generator=gen), torch.randn(20, generator=gen)
    assert float(surgery_direction(g_r, g_f) @ g_f) == pytest.approx(0.0, abs=1e-5)
    assert torch.equal(surgery_direction(g_r, torch.zeros(20)), g_r)


def test_neggrad_plus_first_adam_step_follows_its_loss() -> None:
    """One AdamW step moves every parameter by −lr·sign(β∇L_r − (1−β)∇L_f) (Adam's first step)."""
    model = _model()
    space = _space(model)
    lr, beta = 1e-3, 0.7
    settings = {
        "neggrad_plus": {
            "epochs": 1, "lr": lr, "beta": beta, "batch_size": 64, "retain_batch_size": 64,
            "early_stopping": False,
        }
    }  # fmt: skip
    ctx = _ctx(model, settings)
    retain = concat_batches(
        [ctx.partitions.retain_task, ctx.partitions.retain_inst, ctx.partitions.retain_clean]
    )
    _, g_r = loss_and_grad(model, space, retain, TASKS)
    _, g_f = loss_and_grad(model, space, ctx.partitions.forget, TASKS)
    expected = neggrad_plus_direction(g_r, g_f, beta)
    before = space.pack({n: p.detach().clone() for n, p in model.named_parameters() if n in space.names})
    info = get_method("neggrad_plus")(ctx).info
    after = space.pack({n: p.detach() for n, p in model.named_parameters() if n in space.names})
    assert info["steps"] == 1
    big = expected.abs() > 1e-4  # Adam's ε blurs the sign of tiny gradients
    torch.testing.assert_close((after - before)[big], -lr * torch.sign(expected[big]), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_on_the_toy_request_moves_only_adapter_and_heads(method: str) -> None:
    model = _model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    subset_head = trainable_head(model, SUBSET_HEAD).weight.detach().clone()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = get_method(method)(_ctx(model, {method: {"epochs": 3, "lr": 1e-2, "early_stopping": False}}))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert torch.equal(trainable_head(model, SUBSET_HEAD).weight.detach(), subset_head)
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    assert result.info["epochs_run"] == 3
    json.dumps(result.info, allow_nan=False)  # the evidence records it


# ----------------------------------------------------------------------------------------------
# one request on digits-clients
# ----------------------------------------------------------------------------------------------

CLIENT = "c3"


def _unl(value: float | None) -> float:
    assert value is not None
    return value


SEEDS = tuple(range(10))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[EngineInputs, dict[int, PeftModel]]:
    """One frozen base; a v1 per seed (the distribution the quality assertions judge)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("digits-baselines")
    workload = load_workload("digits-clients")
    DataStore.materialise(root / "data", workload)
    ensure_base(workload, root / "base", workload.settings(), seed=0)
    inputs = EngineInputs.load(workload, data_dir=root / "data", base_dir=root / "base", settings={}, seed=0)
    cfg = TrainConfig.from_settings(inputs.settings)
    train = inputs.full_train_set()
    return inputs, {seed: train_v1(inputs.base, train, inputs.tasks, cfg, seed=seed) for seed in SEEDS}


# Measured over seeds 0–9 on two kernel paths (ATEN_CPU_CAPABILITY=default / avx2; 2026-12-01; per
# method and setting in docs/benchmarks.md, "Quality tests over seeds"). A seed passes when the method
# kept an updated model (epoch ≥ 1), the forget-set accuracy of a forgotten task fell by ≥ 0.05 and
# none rose. Passing seeds, default / avx2: neggrad_plus FU 9 / 9, PU 10 / 10; orthograd FU 10 / 9,
# PU 10 / 10; gdr_gma FU 8 / 9, PU 7 / 9 (median drop 0.068 / 0.083); uno FU 10 / 10, PU 10 / 9. The
# bound is the worst (7/10) less one seed, so that a kernel path cannot flip the verdict while a rule
# that stopped forgetting (median drop < 0.05, or most seeds keeping epoch 0) fails.
BASELINE_PASS_FRACTION = {"FU": 0.6, "PU-digit": 0.6}
MIN_DROP = 0.05


@dataclasses.dataclass(frozen=True)
class SeedDrop:
    largest: float  # the largest forget-set accuracy drop over the forgotten tasks
    smallest: float
    best_epoch: int  # the epoch the method's model selection kept (0: none after the original)

    @property
    def forgets(self) -> bool:
        return self.best_epoch >= 1 and self.largest >= MIN_DROP and self.smallest >= 0.0


def baseline_drops(
    inputs: EngineInputs, v1s: dict[int, PeftModel], method: str, forget_tasks: list[str]
) -> list[SeedDrop]:
    """Per seed, the forget-set accuracy drops and the kept epoch; on every seed, the invariants: finite
    weights, and only the adapter and the task heads moved (never the base or the subset-ID head)."""
    kind = "client" if not forget_tasks else "task"
    spec = ForgetSpec(f"{method}-{kind}", kind, CLIENT, None, forget_tasks)  # type: ignore[arg-type]
    settings = {**inputs.settings, method: {"early_stopping": False}} if forget_tasks else inputs.settings
    out = []
    for seed in SEEDS:
        seeded = dataclasses.replace(inputs, seed=seed)
        ctx = dataclasses.replace(
            request_context(seeded, spec, RoundState(), stage=1, cache_key=None), settings=settings
        )
        model = copy.deepcopy(v1s[seed])
        before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
        before = evaluate(model, ctx)
        model, info, _, _ = apply_method(method, model, ctx)
        after = evaluate(model, ctx)
        drop = [_unl(before.tasks[t].unl) - _unl(after.tasks[t].unl) for t in ctx.partitions.forget_tasks]
        out.append(SeedDrop(max(drop), min(drop), int(info["best_epoch"])))
        params = dict(model.named_parameters())
        assert all(bool(torch.isfinite(p).all()) for p in params.values())
        changed = {n for n, v in before_params.items() if not torch.equal(params[n], v)}
        assert all(("lora_" in n or "modules_to_save" in n) and SUBSET_HEAD not in n for n in changed), (
            changed
        )
    return out


@pytest.mark.quality
@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("forget_tasks", [[], ["digit"]], ids=["FU", "PU-digit"])
def test_digits_request_lowers_forget_accuracy(
    digits: tuple[EngineInputs, dict[int, PeftModel]], method: str, forget_tasks: list[str]
) -> None:
    """A client request (FU) with the method's defaults (paper defaults, MIA model selection towards
    0.5); a partial-task request (PU: the client's ``digit`` labels) with the last epoch kept — on PU
    ``uno``'s forget-set MIA first rises above the original's, so its model selection keeps epoch 0
    (docs/methods.md, "Baselines"); the test checks the update rule itself there. Judged over
    seeds: the median drop and the fraction of seeds that forget (see BASELINE_PASS_FRACTION)."""
    inputs, v1s = digits
    drops = baseline_drops(inputs, v1s, method, forget_tasks)
    setting = "PU-digit" if forget_tasks else "FU"
    assert_distribution(
        f"{method} {setting}: forget-set accuracy drop",
        [d.largest for d in drops],
        median_at_least=MIN_DROP,
        passes=[d.forgets for d in drops],
        fraction_at_least=BASELINE_PASS_FRACTION[setting],
    )
