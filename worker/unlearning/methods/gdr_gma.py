"""``gdr_gma``: Gradient Direction Rectification + Gradient Magnitude Adjustment (GDR-GMA paper,
Algorithms 1–2, Eqs. 3–7; settings key ``"gdr_gma"``).

Sign convention: both tasks are written as minimisations, ``g_f = ∇(−L_f)`` (the forgetting task's
gradient: descending it is the paper's ascent) and ``g_r = ∇L_r`` — the convention under which the
paper's conflict test ``cos φ < 0`` (Definition 2, after PCGrad) means "one task's step undoes the
other's", and the one its public code uses (``t_loss = −CE``). Eq. 7's ``ω + η[λ g_f − (1−λ) g_r]``
with ``g_f = ∇L_f`` is the same update.

Per iteration (Algorithm 2), on a forget mini-batch x_f and a retain mini-batch x_r:

1. GDR (Algorithm 1): if ``cos(g_f, g_r) < 0`` both are projected off each other (Eq. 4, each
   against the *other's original* gradient);
2. gradient bank (Eq. 3): the per-sample forgetting gradients of every D_f sample from the previous
   epoch (``vmap(grad)``; the bank is empty in epoch 1); ``g_joint`` (Eq. 5) = the mean of the bank
   entries that conflict with ``g_r``; if ``cos(ĝ_r, g_joint) < 0`` then ``ĝ_r`` is projected off
   ``g_joint``;
3. GMA (Eq. 6): ``λ = 1/(1 + exp(γ·(Δℓ − ε)))`` with ``Δℓ = |L_r(ω_t; x_r) − L_r(ω_0; D_r)|`` (the
   retain union's loss under the model as given);
4. update with the descent direction ``λ·ĝ_f + (1−λ)·ĝ_r`` (Eq. 7) through AdamW.

Choices and deviations (also in docs/methods.md, "Baselines"):

- the paper's Eq. 6 deviation ``Δℓ`` is used; the public code feeds the raw retain loss
  (``λ = 1/(1+exp(γ·(L_r − ε)))``), which on a model whose retain loss is above ε + a few/γ
  never lets the forget gradient in — ``loss_deviation: false`` selects that form;
- rectification, bank and joint gradient act on the whole (concatenated) adapter + head gradient
  as the paper writes ω; the public code rectifies per parameter tensor and banks only the last
  layer's per-batch gradient;
- the bank keeps the current batch's own previous-epoch entries (as the public code's bank does);
  the paper defines g_F over D_F = D_f \\ x_f, but a client's D_f fits in one mini-batch here, and
  excluding x_f would leave the bank empty for the whole run;
- Algorithm 1 line 6 prints ``g_r·g_r/||g_f||²``; the projection of Eq. 4 (``g_r·g_f``) is meant;
- defaults: γ 100, ε 0.02, AdamW lr 1e-4, batch 256, 10 epochs (paper §5.1 and its public code),
  all run (``patience`` 0, like the fixed epoch count), then the shared MIA model selection
  (``gradient_loop``) instead of the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import dataclasses as pydantic_dataclasses
from torch import Tensor

from worker.unlearning.config import SETTINGS, BatchSize, Count, Epochs, LearningRate, NonNegative
from worker.unlearning.grads import eval_mode
from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.methods.gradient_loop import (
    LoopConfig,
    LoopState,
    StepFn,
    StepInput,
    loss_and_grad,
    parse_config,
    per_sample_flat,
    run_updates,
    supervised_pairs,
)
from worker.unlearning.types import main_task_loss

NAME = "gdr_gma"


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class GdrGmaConfig(LoopConfig):
    """``settings["gdr_gma"]``: ``gamma`` (steepness γ), ``epsilon`` (ε), ``loss_deviation`` (Eq. 6's
    ``|L_r − L_r(ω_0)|``; false = the public code's raw ``L_r``), ``bank`` (Eqs. 3/5 on) + loop keys."""

    lr: LearningRate = 1e-4
    epochs: Epochs = 10
    patience: Count = 0
    batch_size: BatchSize = 256
    retain_batch_size: BatchSize = 256
    gamma: NonNegative = 100.0
    epsilon: NonNegative = 0.02
    loss_deviation: bool = True
    bank: bool = True


def magnitude_weight(deviation: float, gamma: float, epsilon: float) -> float:
    """Eq. 6: ``λ = 1/(1 + exp(γ·(Δℓ − ε)))`` (the logistic function, overflow-safe)."""
    return float(torch.sigmoid(torch.tensor(-gamma * (deviation - epsilon), dtype=torch.float64)))


def _cos(a: Tensor, b: Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _off(vec: Tensor, along: Tensor) -> Tensor:
    """Eq. 4: ``vec − (vec·along)/||along||²·along`` (``vec`` when ``along = 0``)."""
    sq = along @ along
    return vec - (vec @ along) / sq * along if float(sq) > 0 else vec


def rectify_pair(g_f: Tensor, g_r: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Algorithm 1 lines 4–7: on conflict (``cos < 0``) each projected off the other's original."""
    if _cos(g_f, g_r) < 0:
        return _off(g_f, g_r), _off(g_r, g_f), True
    return g_f, g_r, False


def joint_gradient(g_r: Tensor, bank: Tensor, usable: Tensor) -> Tensor | None:
    """Eq. 5: the mean of the ``usable`` bank rows (``[N, D]``) whose cosine with ``g_r`` is negative
    (``None`` when there is none)."""
    if bank.numel() == 0:
        return None
    norms = bank.norm(dim=1) * g_r.norm()
    conflict = usable & (norms > 0) & ((bank @ g_r) < 0)
    if not bool(conflict.any()):
        return None
    return bank[conflict].mean(0)


def rectify_against_bank(g_r_hat: Tensor, joint: Tensor | None) -> tuple[Tensor, bool]:
    """Algorithm 1 lines 8–10: project ``ĝ_r`` off ``g_joint`` if they conflict."""
    if joint is None or _cos(g_r_hat, joint) >= 0:
        return g_r_hat, False
    return _off(g_r_hat, joint), True


@dataclass
class _Bank:
    """Per-sample forgetting gradients of D_f: ``current`` (read: last epoch's) and ``next``."""

    current: Tensor
    current_valid: Tensor
    next: Tensor
    next_valid: Tensor
    epoch: int = 1

    def roll(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.current, self.current_valid = self.next.clone(), self.next_valid.clone()
            self.epoch = epoch


@dataclass
class _Stats:
    pair_conflicts: int = 0
    bank_conflicts: int = 0
    steps: int = 0
    lambdas: list[float] = field(default_factory=list)

    def to_json(self, initial_retain_loss: float | None) -> dict[str, Any]:
        lam = self.lambdas
        return {
            "steps": self.steps,
            "pair_conflicts": self.pair_conflicts,
            "bank_conflicts": self.bank_conflicts,
            "lambda_first_mean_last": [lam[0], sum(lam) / len(lam), lam[-1]] if lam else None,
            "initial_retain_loss": initial_retain_loss,
        }


@register(NAME, config=GdrGmaConfig)
def gdr_gma_method(ctx: MethodContext) -> MethodResult:
    cfg = parse_config(GdrGmaConfig, ctx.method_settings(NAME), NAME)
    stats = _Stats()
    initial: dict[str, float] = {}

    def make_step(state: LoopState) -> StepFn:
        with torch.no_grad(), eval_mode(state.model):
            # L_r(ω_0; D_r): the retain union's main-task loss under the model as given
            l0 = (
                main_task_loss(state.model(state.retain.inputs), state.retain.labels, state.tasks)
                if len(state.retain)
                else torch.zeros(())
            )
        initial["retain_loss"] = float(l0)
        n, d = len(state.forget), state.space.size
        zeros = torch.zeros((n if cfg.bank else 0, d), device=state.forget.device)
        valid = torch.zeros(zeros.shape[0], dtype=torch.bool, device=zeros.device)
        bank = _Bank(zeros, valid, zeros.clone(), valid.clone())

        def step(s: StepInput) -> Tensor:
            if cfg.bank:  # per-sample rows: the bank's entries, and their sum is the batch gradient
                rows = per_sample_flat(
                    state.model, state.space, s.forget, state.tasks, chunk_size=cfg.chunk_size
                )
                g_f = -rows.sum(0) / max(supervised_pairs(s.forget, state.tasks), 1)
            else:
                g_f = -loss_and_grad(state.model, state.space, s.forget, state.tasks)[1]
            loss_r, g_r = loss_and_grad(state.model, state.space, s.retain, state.tasks)
            f_hat, r_hat, conflict = rectify_pair(g_f, g_r)
            stats.pair_conflicts += int(conflict)
            if cfg.bank:
                bank.roll(s.epoch)
                r_hat, hit = rectify_against_bank(
                    r_hat, joint_gradient(g_r, bank.current, bank.current_valid)
                )
                stats.bank_conflicts += int(hit)
                bank.next[s.forget_index] = -rows  # per-sample forgetting gradients, for the next epoch
                bank.next_valid[s.forget_index] = True
            deviation = abs(loss_r - initial["retain_loss"]) if cfg.loss_deviation else loss_r
            lam = magnitude_weight(deviation, cfg.gamma, cfg.epsilon)
            stats.lambdas.append(lam)
            stats.steps += 1
            return lam * f_hat + (1.0 - lam) * r_hat

        return step

    info = run_updates(ctx, NAME, cfg, make_step, lambda: stats.to_json(initial.get("retain_loss")))
    return MethodResult(model=ctx.model, info=info)
