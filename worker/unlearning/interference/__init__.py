"""Interference-aware LoRA updates (interference paper §4, Eqs. 6–11, Algorithm 1).

Per iteration, on mini-batches of D_f, D_r^clean, D_r^inst and D_r^task:

1. Gradients of every (partition, task) loss in one ``jacrev`` call
   (:func:`worker.unlearning.grads.partition_task_grads`).
2. Task-aware projection (Eqs. 7–8) on the LoRA rank space: task ``t`` has an orthonormal basis
   ``U_t ∈ R^{r×s}``, ``P_t = U_t U_tᵀ``. peft stores ``A`` as ``r × in`` and ``B`` as ``out × r``
   (the paper writes ``W + B Aᵀ`` with ``A ∈ R^{k×r}``), so ``∇_A^{(t)} = P_t ∇_A`` and
   ``∇_B^{(t)} = ∇_B P_t`` — the paper's right-multiplication in peft's layout.
   One basis per task, shared by all adapted layers and by A and B.
3. Sequential orthogonalisation of task ``t``'s forget gradient against the clean, then instance,
   then task retain gradients (Eqs. 9–10, with ε), per factor ``Z`` (each layer's A and B, each
   head tensor), all factors at once with segment sums.
4. The Eq. 11 direction ``η1·∇_r − η2·∇_f^⊥`` is the gradient handed to AdamW (descent on the
   retain loss, ascent on the orthogonalised forget loss); the base stays frozen.
5. The subspaces take a gradient step on ``Σ_{t≠t'} ||U_tᵀU_t'||²_F`` and are re-orthonormalised
   by QR (Algorithm 1 line 18).

Heads of forgotten tasks get the same rule without projection. After every epoch (a pass over
D_f) the forget-vs-held-out loss-MIA AUC is measured; the checkpoint whose AUC is closest to the
target (the retrain reference's when given, else ``mia_target``, default 0.5) is kept — epoch 0,
the model as given, included.

Choices the paper leaves open (also in docs/methods.md):

- which gradients enter step 3 for task ``t``: the forget gradient is D_f's loss *on task t*
  (zero for retained tasks); the retain gradients it is orthogonalised against are each retain
  partition's *whole* loss (all its tasks) projected by ``P_t`` — the directions the forget update
  could disturb inside task ``t``'s subspace. (Restricting them to task ``t`` too would make the
  clean and task retain gradients vanish for every forgotten task, and the ablations void.) The
  retain descent term of task ``t`` is the retain partitions' loss on task ``t`` projected by ``P_t``.
- the per-task updates of Algorithm 1 are summed into one AdamW step per iteration (one moment
  update per mini-batch, not ``|T|``).
- deviation: by default the three retain gradients are Gram–Schmidt-orthogonalised among
  themselves (in the order clean → inst → task) before Eq. 9 is applied with each; when they are
  mutually orthogonal this *is* Eq. 10, otherwise the literal Eq. 10 leaves the result orthogonal
  to the last gradient only. With ε = 0 the result is then orthogonal to every retain gradient.
  A retain gradient that is zero or (numerically) in the span of the earlier ones — e.g. B = 0 —
  is skipped instead of dividing by ~0. ``gram_schmidt=False`` gives the literal Eq. 10.

Modules, one step each: ``config`` (:class:`IAConfig`), ``subspaces`` (Eqs. 7–8), ``layout`` (the
flat LoRA factor layout), ``orthogonalisation`` (Eqs. 9–10), ``retain`` (the retain check of early
stopping), ``checkpoints`` (early stopping and the kept checkpoint), ``update`` (the Eq. 11 loop).
"""

from __future__ import annotations

from worker.unlearning.interference.checkpoints import Checkpoints, Monitor, mia_distance, select_checkpoint
from worker.unlearning.interference.config import IAConfig
from worker.unlearning.interference.layout import FlatLayout
from worker.unlearning.interference.orthogonalisation import orthogonalize, segment_dot
from worker.unlearning.interference.retain import (
    KEPT_OF_FORGOTTEN,
    OUTSIDE_ANCHOR,
    check_accuracy,
    retain_accuracy,
    retain_check,
    retain_drop,
    task_accuracy,
)
from worker.unlearning.interference.subspaces import (
    init_subspaces,
    orthonormalize,
    projectors,
    subspace_penalty,
    subspace_penalty_grad,
    subspace_step,
)
from worker.unlearning.interference.update import RETAIN_ORDER, interference_aware_unlearn, involved_tasks

__all__ = [
    "KEPT_OF_FORGOTTEN",
    "OUTSIDE_ANCHOR",
    "RETAIN_ORDER",
    "Checkpoints",
    "FlatLayout",
    "IAConfig",
    "Monitor",
    "check_accuracy",
    "init_subspaces",
    "interference_aware_unlearn",
    "involved_tasks",
    "mia_distance",
    "orthogonalize",
    "orthonormalize",
    "projectors",
    "retain_accuracy",
    "retain_check",
    "retain_drop",
    "segment_dot",
    "select_checkpoint",
    "subspace_penalty",
    "subspace_penalty_grad",
    "subspace_step",
    "task_accuracy",
]
