"""The Eq. 11 direction and Algorithm 1 on a toy model."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.worker.unlearning.interference.toy import (
    TASKS,
    head_a_layout,
    ia_batch,
    ia_model,
    layout_pairs,
    partial_partitions,
)
from worker.unlearning.grads import partition_task_grads
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.orthogonalisation import segment_dot
from worker.unlearning.interference.subspaces import init_subspaces, projectors
from worker.unlearning.interference.update import _direction, interference_aware_unlearn
from worker.unlearning.types import SUBSET_HEAD


def test_direction_with_all_stages_off_is_plain_eq11() -> None:
    model = ia_model()
    layout = head_a_layout(model)
    flat = torch.randn(4, 2, layout.size, dtype=torch.float64)
    cfg = IAConfig(projection=False, orth_clean=False, orth_inst=False, orth_task=False, eta1=1.0, eta2=0.1)
    d, _ = _direction(flat, layout, None, cfg, cfg.retain_switches)
    expected = (flat[1:].sum(0) - 0.1 * flat[0]).sum(0)
    assert torch.allclose(d, expected)
    # with orthogonalisation on and eta1 = 0, the update is orthogonal to each retain partition's
    # gradient (per factor), since every task's forget part is
    cfg2 = IAConfig(projection=False, eta1=0.0, eta2=1.0, epsilon=0.0)
    d2, _ = _direction(flat, layout, None, cfg2, cfg2.retain_switches)
    for k in range(1, 4):
        dots = segment_dot(d2, flat[k].sum(0), layout.segments, layout.n_segments)
        assert torch.allclose(dots, torch.zeros_like(dots), atol=1e-8)


def test_direction_with_projection_stays_in_task_subspaces() -> None:
    model = ia_model()
    layout = head_a_layout(model)
    U = init_subspaces(2, 4, 1, seed=0, mode="orthogonal")
    flat = torch.randn(4, 2, layout.size, dtype=torch.float64)
    cfg = IAConfig()
    d, _ = _direction(flat, layout, U, cfg, cfg.retain_switches)
    span = projectors(U).sum(0)  # P_0 + P_1: the rank-space span the update may use
    g = layout.unpack(d)
    for a, b in layout_pairs(model):
        assert torch.allclose(span @ g[a], g[a], atol=1e-10)
        assert torch.allclose(g[b] @ span, g[b], atol=1e-10)
        assert float(g[a].abs().sum()) > 0


def test_a_held_task_contributes_no_forget_gradient() -> None:
    model = ia_model()
    layout = head_a_layout(model)
    flat = torch.randn(4, 2, layout.size, dtype=torch.float64)
    cfg = IAConfig(projection=False, eta2=0.5, forget_balance="per_task")
    zeroed = flat.clone()
    zeroed[0, 0] = 0.0
    held, _ = _direction(flat, layout, None, cfg, cfg.retain_switches, held=[True, False])
    expected, _ = _direction(zeroed, layout, None, cfg, cfg.retain_switches)
    assert torch.equal(held, expected)
    unheld, _ = _direction(flat, layout, None, cfg, cfg.retain_switches, held=[False, False])
    assert not torch.allclose(held, unheld)
    # every task held: the retain term alone
    retain_only, norms = _direction(flat, layout, None, cfg, cfg.retain_switches, held=[True, True])
    assert norms[1] == 0.0
    assert float(retain_only.norm()) == pytest.approx(norms[0])


def test_hold_past_target_runs_the_retain_term_alone_while_the_forget_set_is_past_the_target() -> None:
    parts = partial_partitions()
    heldout = ia_batch(10, 7, ["a", "b"])
    base = {"lr": 5e-2, "epochs": 3, "batch_size": 4, "early_stopping": False}
    cfg = IAConfig.from_settings({**base, "hold_past_target": True})
    start = ia_model()
    # an AUC target of 1 is above every checkpoint's AUC: the forget term is held at every step
    held = copy.deepcopy(start)
    info = interference_aware_unlearn(held, tasks=TASKS, partitions=parts, heldout=heldout, cfg=cfg,
                                      seed=0, mia_target=1.0)  # fmt: skip
    assert info["held_steps"] == dict.fromkeys(info["forget_tasks"], info["steps"])
    assert info["term_norms"]["forget"] == 0.0
    plain = copy.deepcopy(start)
    free = interference_aware_unlearn(plain, tasks=TASKS, partitions=parts, heldout=heldout,
                                      cfg=IAConfig.from_settings(base), seed=0, mia_target=1.0)  # fmt: skip
    assert free["held_steps"] is None
    assert free["term_norms"]["forget"] > 0
    assert not all(torch.equal(p, q) for p, q in zip(held.parameters(), plain.parameters(), strict=True))
    # a target of 0 is below every AUC: nothing is held and the run is the plain one
    never = copy.deepcopy(start)
    none_held = interference_aware_unlearn(never, tasks=TASKS, partitions=parts, heldout=heldout, cfg=cfg,
                                           seed=0, mia_target=0.0)  # fmt: skip
    assert none_held["held_steps"] == dict.fromkeys(none_held["forget_tasks"], 0)
    assert all(torch.equal(p, q) for p, q in zip(never.parameters(), plain.parameters(), strict=True))


def test_each_ablation_switch_changes_the_update_in_a_partial_task_request() -> None:
    model = ia_model()
    layout = head_a_layout(model)
    p = partial_partitions()
    G = partition_task_grads(
        model, layout.names, [p.forget, p.retain_clean, p.retain_inst, p.retain_task], TASKS
    )
    flat = layout.pack(G, lead=2).double()
    U = init_subspaces(2, 4, 2, seed=0)
    full = IAConfig(epsilon=0.0)
    base, _ = _direction(flat, layout, U, full, full.retain_switches)
    for switch in ("projection", "orth_clean", "orth_inst", "orth_task"):
        cfg = IAConfig.from_settings({"epsilon": 0.0, switch: False})
        d, _ = _direction(flat, layout, None if switch == "projection" else U, cfg, cfg.retain_switches)
        assert not torch.allclose(d, base, atol=1e-9), switch


def test_unlearn_updates_only_lora_and_forgotten_task_heads_and_keeps_best_checkpoint() -> None:
    torch.manual_seed(0)
    model = ia_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heldout = ia_batch(10, 7, ["a", "b"])
    cfg = IAConfig(lr=5e-2, epochs=4, batch_size=4)
    info = interference_aware_unlearn(
        model, tasks=TASKS, partitions=partial_partitions(), heldout=heldout, cfg=cfg, seed=0
    )
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    allowed = set(info["updated_parameters"])
    assert changed <= allowed
    assert not any(".heads.b." in n or f".heads.{SUBSET_HEAD}." in n for n in allowed)
    assert any(".heads.a." in n for n in allowed)
    assert all(".lora_" in n or ".heads.a." in n for n in allowed)
    history = info["history"]
    assert [h["epoch"] for h in history] == list(range(5))
    best = min(h["distance"] for h in history)
    assert info["best_distance"] == best
    assert history[info["best_epoch"]]["distance"] == best
    assert info["subspace_dim"] == 2  # rank 4, two involved tasks
    if info["best_epoch"] > 0:
        assert changed
    else:
        assert not changed


def test_unlearn_moves_the_model_and_mia_target_steers_early_stopping() -> None:
    parts = partial_partitions()
    heldout = ia_batch(10, 7, ["a", "b"])
    cfg = IAConfig(lr=5e-2, epochs=3, batch_size=4, early_stopping=False)
    m1 = ia_model()
    start = copy.deepcopy(m1)
    info = interference_aware_unlearn(m1, tasks=TASKS, partitions=parts, heldout=heldout, cfg=cfg, seed=0)
    assert info["best_epoch"] == 3
    diff = sum(
        float((p - q).detach().abs().sum())
        for (n, p), (_, q) in zip(m1.named_parameters(), start.named_parameters(), strict=True)
        if ".lora_" in n
    )
    assert diff > 0
    # a target equal to the starting AUC makes epoch 0 (the model as given) the best checkpoint
    m2 = ia_model()
    m2_start = copy.deepcopy(m2)
    probe = interference_aware_unlearn(
        copy.deepcopy(m2), tasks=TASKS, partitions=parts, heldout=heldout, cfg=IAConfig(epochs=0), seed=0
    )
    assert probe["epochs_run"] == 0
    start_auc = interference_aware_unlearn(
        copy.deepcopy(m2),
        tasks=TASKS,
        partitions=parts,
        heldout=heldout,
        cfg=IAConfig(lr=5e-2, epochs=1),
        seed=0,
    )["history"][0]["mia_auc"]
    kept = interference_aware_unlearn(
        m2,
        tasks=TASKS,
        partitions=parts,
        heldout=heldout,
        cfg=IAConfig(lr=5e-2, epochs=2),
        seed=0,
        mia_target=start_auc,
    )
    assert kept["best_epoch"] == 0
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), m2_start.parameters(), strict=True))


def test_fresh_adapter_with_zero_b_runs_without_nan() -> None:
    model = ia_model(trained=False)  # B = 0: every A gradient and every retain A-gradient is 0
    cfg = IAConfig(lr=1e-2, epochs=1, batch_size=4, epsilon=0.0, early_stopping=False)
    interference_aware_unlearn(
        model,
        tasks=TASKS,
        partitions=partial_partitions(),
        heldout=ia_batch(6, 9, ["a", "b"]),
        cfg=cfg,
        seed=0,
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
