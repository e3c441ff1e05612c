"""``neggrad_plus``: descent on ``β·L_r − (1−β)·L_f`` (settings key ``"neggrad_plus"``).

NegGrad+ as Kurmanji et al. define it ("Towards Unbounded Machine Unlearning", NeurIPS 2023, the
SCRUB paper's baselines; also a baseline of the OrthoGrad paper): fine-tune on a weighted
combination of the retain loss and the *negated* forget loss. The direction of one iteration is
``β·∇L_r(B_r) − (1−β)·∇L_f(B_f)`` on a retain and a forget mini-batch (main-task losses, the masked
partitions of the request), applied by AdamW through the shared loop (``gradient_loop``).

Defaults: ``beta`` 0.9 — a choice (Kurmanji et al. tune β per experiment and state no default);
0.9 is also OrthoGrad's tuned retain weight α for image classification (its App. A.1), the
analogous trade-off. ``lr`` 1e-3, batches 128/128: OrthoGrad's App. A.1 NegGrad+ optimum (ViT).
``epochs`` 30: the OrthoGrad paper's budget for every method (App. A.1), with the shared MIA model
selection instead of its accuracy threshold (see ``gradient_loop``).
"""

from __future__ import annotations

from typing import Any

from pydantic import dataclasses as pydantic_dataclasses
from torch import Tensor

from worker.unlearning.config import SETTINGS, Epochs, Fraction, LearningRate
from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.methods.gradient_loop import (
    LoopConfig,
    LoopState,
    StepFn,
    StepInput,
    loss_and_grad,
    parse_config,
    run_updates,
)

NAME = "neggrad_plus"


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class NegGradPlusConfig(LoopConfig):
    """``settings["neggrad_plus"]``: ``beta`` (retain weight) + the shared loop keys."""

    lr: LearningRate = 1e-3
    epochs: Epochs = 30
    beta: Fraction = 0.9


def neggrad_plus_direction(g_retain: Tensor, g_forget: Tensor, beta: float) -> Tensor:
    """The descent direction of ``β·L_r − (1−β)·L_f``."""
    return beta * g_retain - (1.0 - beta) * g_forget


@register(NAME, config=NegGradPlusConfig)
def neggrad_plus_method(ctx: MethodContext) -> MethodResult:
    cfg = parse_config(NegGradPlusConfig, ctx.method_settings(NAME), NAME)
    if not 0.0 <= cfg.beta <= 1.0:
        raise ValueError("neggrad_plus beta must be in [0, 1]")
    losses: dict[str, list[float]] = {"retain": [], "forget": []}

    def make_step(state: LoopState) -> StepFn:
        def step(s: StepInput) -> Tensor:
            loss_r, g_r = loss_and_grad(state.model, state.space, s.retain, state.tasks)
            loss_f, g_f = loss_and_grad(state.model, state.space, s.forget, state.tasks)
            losses["retain"].append(loss_r)
            losses["forget"].append(loss_f)
            return neggrad_plus_direction(g_r, g_f, cfg.beta)

        return step

    def stats() -> dict[str, Any]:
        return {f"{k}_loss_first_last": [v[0], v[-1]] if v else None for k, v in losses.items()}

    info = run_updates(ctx, NAME, cfg, make_step, stats)
    return MethodResult(model=ctx.model, info=info)
