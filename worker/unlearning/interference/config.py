"""``settings["ia"]``: the interference-aware update's configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

from pydantic import dataclasses as pydantic_dataclasses

from worker.unlearning.config import (
    SETTINGS,
    AdapterRank,
    BatchSize,
    Count,
    Epochs,
    Fraction,
    LearningRate,
    NonNegative,
    Period,
    Shrink,
    SignedHalf,
    parse_settings,
)


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class IAConfig:
    """``settings["ia"]``. Stage switches: ``projection``, ``orth_clean``, ``orth_inst``,
    ``orth_task`` (the paper's Table 3 ablations), ``update_heads``, ``early_stopping``."""

    # Eq. 11 through AdamW (paper: lr 1e-4, η1 = 1, η2 = 0.1, at most 20 epochs)
    lr: LearningRate = 1e-4
    eta1: NonNegative = 1.0
    eta2: NonNegative = 0.1
    epochs: Epochs = 20
    # the mini-batch of each partition per iteration; AdamW's decoupled weight decay
    batch_size: BatchSize = 32
    weight_decay: NonNegative = 0.0
    # deviation (docs/methods.md): Eq. 11's orthogonalised forget term rescaled every step —
    # "none" (paper: η2·∇_f^⊥), "total" (‖forget term‖ = η2·‖retain term‖) or "per_task" (each
    # forgotten task's ∇_f^⊥ to η2·‖retain term‖ / #forgotten tasks, so neither term vanishes and
    # an easy task cannot drown a hard one)
    forget_balance: Literal["none", "total", "per_task"] = "none"
    # Eqs. 9–10: ε, and the residual below which a retain gradient is dropped from the basis
    epsilon: NonNegative = 1e-12
    rank_tol: NonNegative = 1e-8
    # task subspaces (Eqs. 7–8)
    subspace_dim: AdapterRank = 0  # 0: rank // number of involved tasks (at least 1)
    # "random" (overlapping, the regulariser separates) | "orthogonal" (disjoint random) |
    # "gradient" (disjoint, each task's from its own gradient's leading rank-space directions)
    subspace_init: Literal["random", "orthogonal", "gradient"] = "random"
    subspace_lr: NonNegative = 0.1
    # the stages (the paper's Table 3 ablations) and the Eq. 10 variant
    projection: bool = True
    orth_clean: bool = True
    orth_inst: bool = True
    orth_task: bool = True
    gram_schmidt: bool = True
    # forgotten tasks' heads follow the same rule (without projection)
    update_heads: bool = True
    # early stopping: the checkpoint whose forget-vs-held-out MIA AUC is closest to the target
    early_stopping: bool = True
    mia_target: Fraction = 0.5
    # what early stopping aims at: "constant" (``mia_target``, paper) or "references" (per client:
    # the OUT reference adapters' median forget-set accuracy and MIA AUC, ``interference.targets``;
    # without references the constant, recorded in the evidence)
    target: Literal["constant", "references"] = "constant"
    # deviation (docs/methods.md, "The forget term towards the references' predictions"): what
    # Eq. 11's forget term does on D_f — "labels" (paper: ascend the loss on the labels) or
    # "references" (descend the loss towards the mean prediction of the reference adapters that
    # never saw the row's client; without such references, the labels, recorded in the evidence)
    forget_targets: Literal["labels", "references"] = "labels"
    # deviation (docs/methods.md, "The forget term's loss"): what the forget term
    # ascends on D_f's labels — "cross_entropy" (paper: the task loss) or "unlikelihood"
    # (log(1 − p_y) for a classification task, whose gradient is largest on the samples the model
    # is most confident of) or "log_odds" (log((1 − p_y) / p_y): the same pull on every sample);
    # a regression task keeps its loss
    forget_loss: Literal["cross_entropy", "unlikelihood", "log_odds"] = "cross_entropy"
    # the accuracy part of a reference target: the references' forget-set accuracy ("absolute") or
    # the checkpoint's held-out accuracy + the references' forget − held-out gap ("relative")
    target_accuracy: Literal["absolute", "relative"] = "absolute"
    # deviation (docs/methods.md, "The accuracy target from the best reference"): what the accuracy
    # target takes of the OUT references' metrics (or a relative target's gaps) — "median" (as the
    # AUC) or "best" (their highest). A retrain trains on every client that any OUT reference
    # trained on, and on the other half too, so on the client's rows it is about as accurate as the
    # best of them: on scenes the median sat a median 0.023 below the retrain's `shape` accuracy
    target_accuracy_reference: Literal["median", "best"] = "median"
    # budgets in optimiser steps (checkpoints are still measured after every pass over D_f):
    # patience = steps without a change of the kept checkpoint before stopping (0: run the budget);
    # patience never stops a run before ``min_steps``; ``max_steps`` caps the run (0: ``epochs``)
    patience: Count = 0
    min_steps: Count = 0
    max_steps: Count = 0
    # a checkpoint also every this many optimiser steps within a pass over D_f (0: after every pass
    # only); on a large forget set a pass is many steps (scenes' full pool: 24) between checkpoints
    checkpoint_every: Count = 0
    # deviation: the same for a per-task request, where it is set (0: ``checkpoint_every``). On
    # scenes a pass over a per-task D_f moved the forget set's accuracy by up to 0.5, so its
    # checkpoints are too coarse to stop near a target (docs/methods.md, "Per-task requests: the
    # OUT target's shifts"); a per-client request keeps its own
    per_task_checkpoint_every: Count = 0
    # deviation (docs/methods.md): stop as soon as the kept checkpoint's distance to the target is
    # at most this (never before ``min_steps``): closer than the target's own error is no nearer
    # the retrain, only longer (0: off, patience and the budget alone end a run)
    stop_within: NonNegative = 0.0
    # deviation (docs/methods.md, "Stopping inside the references' spread"): with a reference
    # target, also stop once the kept checkpoint is, per forgotten task and on both AUC and
    # accuracy, within max(stop_within, this × the OUT references' spread) of it: where the
    # models that never saw the client disagree, walking on towards their median is not nearer a
    # retrain (0: off)
    stop_within_spread: NonNegative = 0.0
    # how the forgotten tasks' MIA distances to the target combine: "mean" | "max" (the worst task)
    task_distance: Literal["mean", "max"] = "mean"
    # early stopping prefers checkpoints whose every forgotten task's forget-set accuracy is at the
    # unseen-data level: held-out accuracy + z standard errors over the forget set's n (the
    # acceptance check's bound); 0 = off (the MIA distance alone, paper)
    forget_accuracy_z: NonNegative = 0.0
    # which of those: "closest" (MIA-closest to the target) | "earliest" (the least update)
    forget_accuracy_pick: Literal["closest", "earliest"] = "closest"
    # stop at the first checkpoint after the model as given whose forget set is at that level
    # (needs forget_accuracy_z > 0) and keep it, whatever the target; the model as given is never
    # kept: the acceptance check's continuation (``acceptance.continue_steps``) runs the update on
    # from a model that failed the check's forget bound
    stop_at_unseen_level: bool = False
    # deviation (docs/methods.md): early stopping only among the checkpoints whose accuracy on the
    # retain check rows dropped by at most this much from the pre-request model; 1 = off (paper)
    retain_tolerance: NonNegative = 1.0
    # the scale of that drop: "absolute" (metric points; a regression task's −MAE of about 0.1 then
    # admits a 45 % larger error at 0.05) | "relative" (a share of the pre-request metric's
    # magnitude, each task on its own scale)
    retain_tolerance_scale: Literal["absolute", "relative"] = "absolute"
    # deviation (docs/methods.md, "The retain gate's noise"): each task's drop may also exceed the
    # tolerance by this many standard errors of its paired change over the check rows (the
    # acceptance check's held-out bound has the same term): on 256 rows a drop of 14 rows (0.0547)
    # discarded the checkpoint that a drop of 13 would have kept; 0 = the tolerance alone
    retain_noise_z: NonNegative = 0.0
    check_size: Count = 256  # retain check rows (a seeded subset, see ``check_rows``)
    # where they come from: "anchor" (the retain partitions, which the update trains on),
    # "outside_anchor" (retained instances outside the anchor and X_f: training data of the model
    # that the update does not see, so a drop there is damage the retain term did not repair) or
    # "both" (each checked on its own)
    check_rows: Literal["anchor", "outside_anchor", "both"] = "anchor"
    # X_f's kept tasks (a per-task request) must stay at their pre-request level: a *rise* beyond
    # the tolerance counts like a drop (rising memorisation of the forgotten samples is a leak too)
    kept_two_sided: bool = False
    # deviation (docs/methods.md, "The retain term's targets"): the retain partitions' targets are
    # (1 − β)·label + β·the pre-request model's prediction (class probabilities; a regression's
    # value), so that the retain term keeps the pre-request function instead of re-learning what
    # an earlier round suppressed; 0 = the labels (paper), 1 = the pre-request model's outputs
    retain_distillation: Fraction = 0.0
    # β for D_r^inst (the anchor's rows under the *forgotten* tasks; all of the anchor in a
    # per-client request); None = retain_distillation. At 1 the forgotten tasks' retain term only
    # repairs what the forget term breaks: their labels were what pulled a later round back
    # towards the original fit (docs/methods.md, "The retain term's targets")
    forgotten_task_distillation: Fraction | None = None
    # per-(partition, task) gradients: "autograd" (batched VJPs) | "func" (torch.func.jacrev)
    grad_backend: Literal["autograd", "func"] = "autograd"
    # a per-task request's reference target (``target: "references"``): "out" (the references that
    # never saw the client) or "task_withheld" (those trained on the client without the forgotten
    # tasks' labels, as a per-task retrain is; ``audit.reference_withhold_tasks``; none: "out")
    per_task_target: Literal["out", "task_withheld"] = "out"
    # deviation (docs/methods.md, "Per-task requests: the OUT target's shifts"): added to the
    # OUT references' forget-set AUC target of a per-task request. A per-task retrain still trains
    # on the client's inputs with its kept tasks, so its forget-set AUC is not an unseen client's;
    # the shift is a workload's constant, chosen on tuning seeds (their retrains score it there,
    # off every request's path); 0 = the OUT references' value
    per_task_auc_shift: SignedHalf = 0.0
    # deviation (docs/methods.md, "Per-task requests: the OUT target's shifts"): the same for the
    # accuracy part of that target (added to the references' forget-set accuracy, or to their
    # forget − held-out gap with ``target_accuracy: "relative"``); 0 = the OUT references' value
    per_task_accuracy_shift: SignedHalf = 0.0
    # deviation (docs/methods.md, "The references' offset, measured on unseen clients"): a reference
    # target moved by the median over the held-out split's unseen clients of (the version's model −
    # the references' median) on the client's AUC and metric (``interference/unseen_offset.py``):
    # the references train on half of the clients, a retrain on all the others; "none" = the
    # references' values
    target_offset: Literal["none", "unseen_clients"] = "none"
    # X_f's kept tasks aimed at their pre-request level (issue 8 part 2): early stopping's distance
    # is the larger of the forget distance and |kept-task accuracy on X_f − pre-request accuracy|,
    # so the kept checkpoint neither raises nor lowers them where another is as close to the target
    kept_level: bool = False
    # deviation (docs/methods.md, "Holding the forget term past the target"): a forgotten task's
    # forget term is off while the last checkpoint has it past its target (forget-set accuracy and
    # MIA AUC both below the reference target's; the AUC below ``mia_target`` without references),
    # so the retain term repairs what SSD and earlier steps broke without pushing the forget set
    # further from the target; the paper ascends every step
    hold_past_target: bool = False
    # the held-out rows of the checkpoints' forget-vs-held-out AUC and held-out accuracy: a seeded
    # subset of at most this many (the same rows at every checkpoint of a request, and for the
    # per-client target); 0 = all. Forward passes of the held-out rows were over half of a scenes
    # checkpoint (1,800 rows); digits' 449 held-out rows are under it (docs/benchmarks.md)
    checkpoint_heldout_rows: Count = 600
    # deviation (docs/methods.md, "The unseen-data guard"; ``interference/unseen_guard.py``): each
    # task's forget gradient is also made orthogonal to that task's loss gradient on held-out rows
    # (half of the split; the other half is never differentiated), so a step leaves the unseen
    # population's loss where it was to first order; the paper orthogonalises against retain only
    unseen_guard: bool = False
    # the guard's cost (the 1.42x of a scenes update, docs/benchmarks.md): its held-out rows per
    # mini-batch (0 = ia.batch_size), and every how many steps their gradient is recomputed (in
    # between, the last one is reused: the held-out loss's gradient moves slowly over a few steps)
    unseen_guard_batch: Count = 0
    unseen_guard_every: Period = 1
    # deviation (docs/methods.md, "Going back on patience"): when patience would end a run, the
    # update goes back to the kept checkpoint with its learning rate times ``refine_lr_factor`` and
    # a fresh AdamW, at most this many times (a line search: the distance to the target is U-shaped
    # over steps and rises within a pass or two past its minimum, docs/benchmarks.md); 0 = stop
    refine_rounds: Count = 0
    refine_lr_factor: Shrink = 0.5
    # deviation (docs/methods.md, "A cheaper return"; measured, not a default): after a return, a
    # checkpoint every this many steps counted from the return (0: the run's own grid), and patience
    # in steps (0: ``patience``). On scenes 69 of 103 returns found no better checkpoint and still
    # cost a whole pass; 27 of the other 34 found it at the first pass's end
    refine_checkpoint_every: Count = 0
    refine_patience: Count = 0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> IAConfig:
        # the bounds of each number are in its type (worker.unlearning.config), so in the API's schema
        cfg = parse_settings(cls, settings, "interference-aware")
        if cfg.stop_at_unseen_level and cfg.forget_accuracy_z <= 0:
            raise ValueError("interference-aware update: stop_at_unseen_level needs forget_accuracy_z > 0")
        if cfg.forget_loss != "cross_entropy" and cfg.forget_targets != "labels":
            raise ValueError(
                "interference-aware update: forget_loss applies to the labels' forget term "
                "(forget_targets: labels); the references' targets are descended with the task loss"
            )
        return cfg

    @property
    def inst_distillation(self) -> float:
        """β of D_r^inst's targets (``forgotten_task_distillation``, else ``retain_distillation``)."""
        beta = self.forgotten_task_distillation
        return self.retain_distillation if beta is None else beta

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def checks_retain(self) -> bool:
        """Whether early stopping checks the retain rows (a tolerance of 1 admits any accuracy drop)."""
        return self.early_stopping and self.retain_tolerance < 1.0 and self.check_size > 0

    @property
    def retain_switches(self) -> dict[str, bool]:
        return {"clean": self.orth_clean, "inst": self.orth_inst, "task": self.orth_task}
