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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from worker.unlearning.audit import merge_rows, mia_from_outputs, model_outputs
from worker.unlearning.config import typed_kwargs
from worker.unlearning.grads import Cycler, eval_mode, partition_task_grads
from worker.unlearning.lora import Forward, LoraPair, fast_forward, param_groups, restore
from worker.unlearning.partitions import id_mask
from worker.unlearning.types import Batch, Partitions, TaskSpec, cat_inputs, concat_batches, inputs_to

RETAIN_ORDER = ("clean", "inst", "task")


@dataclass(frozen=True)
class IAConfig:
    """``settings["ia"]``. Stage switches: ``projection``, ``orth_clean``, ``orth_inst``,
    ``orth_task`` (the paper's Table 3 ablations), ``update_heads``, ``early_stopping``."""

    # Eq. 11 through AdamW (paper: lr 1e-4, η1 = 1, η2 = 0.1, at most 20 epochs)
    lr: float = 1e-4
    eta1: float = 1.0
    eta2: float = 0.1
    epochs: int = 20
    # the mini-batch of each partition per iteration; AdamW's decoupled weight decay
    batch_size: int = 32
    weight_decay: float = 0.0
    # Eqs. 9–10: ε, and the residual below which a retain gradient is dropped from the basis
    epsilon: float = 1e-12
    rank_tol: float = 1e-8
    # task subspaces (Eqs. 7–8)
    subspace_dim: int = 0  # 0: rank // number of involved tasks (at least 1)
    subspace_init: str = "random"  # "random" (overlapping, the regulariser separates) | "orthogonal"
    subspace_lr: float = 0.1
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
    mia_target: float = 0.5
    patience: int = 0  # epochs without a change of the kept checkpoint before stopping; 0 = run all
    # deviation (docs/methods.md): early stopping only among the checkpoints whose accuracy on the
    # retain check rows dropped by at most this much from the pre-request model; 1 = off (paper)
    retain_tolerance: float = 1.0
    check_size: int = 256  # retain check rows (a seeded subset, see ``check_rows``)
    # where they come from: "anchor" (the retain partitions, which the update trains on),
    # "outside_anchor" (retained instances outside the anchor and X_f: training data of the model
    # that the update does not see, so a drop there is damage the retain term did not repair) or
    # "both" (each checked on its own)
    check_rows: str = "anchor"
    # per-(partition, task) gradients: "autograd" (batched VJPs) | "func" (torch.func.jacrev)
    grad_backend: str = "autograd"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> IAConfig:
        cfg = cls(**typed_kwargs(cls, settings, "interference-aware"))
        if cfg.grad_backend not in ("autograd", "func"):
            raise ValueError("grad_backend must be 'autograd' or 'func'")
        if cfg.check_rows not in ("anchor", "outside_anchor", "both"):
            raise ValueError("check_rows must be 'anchor', 'outside_anchor' or 'both'")
        if cfg.subspace_init not in ("random", "orthogonal"):
            raise ValueError("subspace_init must be 'random' or 'orthogonal'")
        if cfg.epochs < 0 or cfg.batch_size < 1 or cfg.epsilon < 0:
            raise ValueError("interference-aware update needs epochs >= 0, batch_size >= 1, epsilon >= 0")
        if cfg.retain_tolerance < 0 or cfg.check_size < 0:
            raise ValueError("interference-aware update needs retain_tolerance >= 0, check_size >= 0")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def checks_retain(self) -> bool:
        """Whether early stopping checks the retain rows (a tolerance of 1 admits any accuracy drop)."""
        return self.early_stopping and self.retain_tolerance < 1.0 and self.check_size > 0

    @property
    def retain_switches(self) -> dict[str, bool]:
        return {"clean": self.orth_clean, "inst": self.orth_inst, "task": self.orth_task}


# ----------------------------------------------------------------------------------------------
# task subspaces and projectors (Eqs. 7–8)
# ----------------------------------------------------------------------------------------------


def orthonormalize(U: Tensor) -> Tensor:
    """QR of each ``[r, s]`` basis in ``U`` (``[..., r, s]``), signs fixed so that diag(R) ≥ 0."""
    Q, R = torch.linalg.qr(U)
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    out: Tensor = Q * sign.unsqueeze(-2)
    return out


def init_subspaces(num_tasks: int, rank: int, dim: int, *, seed: int, mode: str = "random") -> Tensor:
    """``[T, r, s]`` orthonormal bases: independent random ones, or disjoint columns of one random
    orthogonal matrix (``mode="orthogonal"``, needs ``T·s ≤ r``)."""
    if not 1 <= dim <= rank:
        raise ValueError(f"subspace dimension {dim} must be in [1, {rank}]")
    gen = torch.Generator().manual_seed(seed)
    if mode == "orthogonal":
        if num_tasks * dim > rank:
            raise ValueError("orthogonal subspaces need num_tasks * dim <= rank")
        Q = orthonormalize(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
        return Q[:, : num_tasks * dim].reshape(rank, num_tasks, dim).permute(1, 0, 2).contiguous()
    return orthonormalize(torch.randn(num_tasks, rank, dim, generator=gen, dtype=torch.float64))


def projectors(U: Tensor) -> Tensor:
    """``P_t = U_t U_tᵀ`` for every task: ``[T, r, r]``."""
    return U @ U.transpose(-1, -2)


def subspace_penalty(U: Tensor) -> Tensor:
    """``Σ_{t≠t'} ||U_tᵀ U_t'||²_F`` (ordered pairs)."""
    G = torch.einsum("tri,urj->tuij", U, U)  # [T, T, s, s]
    sq = (G**2).sum(dim=(-1, -2))
    total: Tensor = sq.sum() - torch.diagonal(sq).sum()
    return total


def subspace_penalty_grad(U: Tensor) -> Tensor:
    """The gradient of :func:`subspace_penalty` in closed form: ``4·(Σ_{t'} P_t' − P_t)·U_t``
    (each unordered pair is counted twice and ``∂||U_tᵀU_t'||²_F/∂U_t = 2·U_t'U_t'ᵀU_t``)."""
    P = projectors(U)
    return 4.0 * (P.sum(0, keepdim=True) - P) @ U


def subspace_step(U: Tensor, lr: float) -> Tensor:
    """One gradient step on :func:`subspace_penalty`, then QR re-orthonormalisation."""
    if U.shape[0] < 2 or lr == 0:
        return orthonormalize(U)
    U = U.detach()
    return orthonormalize(U - lr * subspace_penalty_grad(U))


# ----------------------------------------------------------------------------------------------
# flat layout of the updated parameters: LoRA A (rank rows), LoRA B (rank columns), heads
# ----------------------------------------------------------------------------------------------


class FlatLayout:
    """Packs ``{name: [*lead, *shape]}`` gradients into ``[*lead, D]``: all A factors as one
    ``[r, ΣK]`` block, all B factors as one ``[ΣD, r]`` block, then the head tensors flat.

    ``segments`` ([D], long) numbers the factors ``Z`` of Eq. 9: one per layer's A, one per layer's
    B, one per head tensor.
    """

    def __init__(self, shapes: Mapping[str, torch.Size], pairs: Sequence[LoraPair], heads: Sequence[str]):
        self.a_names = [p.a for p in pairs]
        self.b_names = [p.b for p in pairs]
        self.h_names = list(heads)
        ranks = {p.rank for p in pairs}
        if len(ranks) > 1:
            raise ValueError("all LoRA layers must share one rank")
        self.rank = ranks.pop() if ranks else 0
        self.a_cols = [int(shapes[n][1]) for n in self.a_names]
        self.b_rows = [int(shapes[n][0]) for n in self.b_names]
        self.h_shapes = [tuple(shapes[n]) for n in self.h_names]
        self.h_sizes = [math.prod(s) for s in self.h_shapes]
        self.n_a = self.rank * sum(self.a_cols)
        self.n_b = sum(self.b_rows) * self.rank
        self.n_h = sum(self.h_sizes)
        L = len(pairs)
        col_layer = torch.repeat_interleave(torch.arange(L), torch.tensor(self.a_cols, dtype=torch.long))
        row_layer = torch.repeat_interleave(torch.arange(L), torch.tensor(self.b_rows, dtype=torch.long))
        head_seg = torch.repeat_interleave(
            torch.arange(len(self.h_names)), torch.tensor(self.h_sizes, dtype=torch.long)
        )
        self.segments = torch.cat(
            [col_layer.repeat(self.rank), L + row_layer.repeat_interleave(self.rank), 2 * L + head_seg]
        )
        self.n_segments = 2 * L + len(self.h_names)
        self._matrices: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def segment_matrix(self, like: Tensor) -> Tensor:
        """The ``[D, S]`` segment indicator with ``like``'s dtype and device (built once each)."""
        key = (like.dtype, like.device)
        if key not in self._matrices:
            onehot = torch.nn.functional.one_hot(self.segments.to(like.device), self.n_segments)
            self._matrices[key] = onehot.to(like.dtype)
        return self._matrices[key]

    @property
    def names(self) -> list[str]:
        return [*self.a_names, *self.b_names, *self.h_names]

    @property
    def size(self) -> int:
        return self.n_a + self.n_b + self.n_h

    def pack(self, g: Mapping[str, Tensor], lead: int) -> Tensor:
        parts: list[Tensor] = []
        if self.a_names:
            a = torch.cat([g[n] for n in self.a_names], dim=-1)  # [*lead, r, ΣK]
            parts.append(a.reshape(*a.shape[:lead], -1))
            b = torch.cat([g[n] for n in self.b_names], dim=-2)  # [*lead, ΣD, r]
            parts.append(b.reshape(*b.shape[:lead], -1))
        for n in self.h_names:
            parts.append(g[n].reshape(*g[n].shape[:lead], -1))
        return torch.cat(parts, dim=-1)

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        """``[D]`` → ``{name: tensor}`` (views into ``flat``)."""
        out: dict[str, Tensor] = {}
        a, b, h = torch.split(flat, [self.n_a, self.n_b, self.n_h])
        if self.a_names:
            a_blocks = torch.split(a.reshape(self.rank, -1), self.a_cols, dim=1)
            b_blocks = torch.split(b.reshape(-1, self.rank), self.b_rows, dim=0)
            out.update(zip(self.a_names, a_blocks, strict=True))
            out.update(zip(self.b_names, b_blocks, strict=True))
        for n, piece, shape in zip(self.h_names, torch.split(h, self.h_sizes), self.h_shapes, strict=True):
            out[n] = piece.reshape(shape)
        return out

    def project(self, flat: Tensor, P: Tensor) -> Tensor:
        """Apply ``P_t`` to task ``t``'s row: ``flat`` is ``[..., T, D]``, ``P`` is ``[T, r, r]``.

        A block: ``P_t ∇_A`` (rank rows); B block: ``∇_B P_t`` (rank columns); heads unchanged.
        """
        if not self.a_names:
            return flat
        lead = flat.shape[:-1]
        a, b, h = torch.split(flat, [self.n_a, self.n_b, self.n_h], dim=-1)
        a = a.reshape(*lead, self.rank, -1)
        b = b.reshape(*lead, -1, self.rank)
        P = P.to(device=flat.device, dtype=flat.dtype)
        a = torch.einsum("tij,...tjk->...tik", P, a)
        b = torch.einsum("...tdi,tij->...tdj", b, P)
        return torch.cat([a.reshape(*lead, -1), b.reshape(*lead, -1), h], dim=-1)


# ----------------------------------------------------------------------------------------------
# Eqs. 9–10
# ----------------------------------------------------------------------------------------------


def segment_dot(a: Tensor, b: Tensor, segments: Tensor | None, n_segments: int) -> Tensor:
    """Per-segment inner products along the last dim: ``[..., D] × [..., D] → [..., S]``."""
    prod = a * b
    if segments is None:
        return prod.sum(-1, keepdim=True)
    return prod @ _onehot(segments, n_segments, prod)


def _onehot(segments: Tensor, n_segments: int, like: Tensor) -> Tensor:
    """``[D, S]`` indicator of the segments (dense: S is small, so segment sums are one matmul)."""
    return torch.nn.functional.one_hot(segments.to(like.device), n_segments).to(like.dtype)


class _Segments:
    """Segment sums (one matmul with the ``[D, S]`` indicator, given or built once) and broadcasts
    (an index gather: ≈ 3× cheaper than the transposed matmul)."""

    def __init__(
        self, segments: Tensor | None, n_segments: int, like: Tensor, matrix: Tensor | None = None
    ) -> None:
        if matrix is not None:
            self.M: Tensor | None = matrix.to(device=like.device, dtype=like.dtype)
        else:
            self.M = None if segments is None else _onehot(segments, n_segments, like)
        self.index = None if segments is None else segments.to(like.device)

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        prod = a * b
        return prod.sum(-1, keepdim=True) if self.M is None else prod @ self.M

    def expand(self, coef: Tensor) -> Tensor:
        return coef if self.index is None else coef.index_select(-1, self.index)

    def remove(self, vec: Tensor, along: Tensor, eps: float, sq: Tensor | None = None) -> Tensor:
        """``vec − <vec, along>/(||along||² + ε)·along`` per segment; 0 where ``||along|| = 0``.
        ``sq``: ``||along||²`` per segment when already known."""
        dot = self.dot(vec, along)
        sq = self.dot(along, along) if sq is None else sq
        denom = torch.where(sq > 0, sq + eps, torch.ones_like(sq))
        coef = torch.where(sq > 0, dot / denom, torch.zeros_like(dot))
        return vec - self.expand(coef) * along


def orthogonalize(
    forget: Tensor,
    retains: Sequence[Tensor],
    *,
    segments: Tensor | None = None,
    n_segments: int = 1,
    eps: float = 0.0,
    gram_schmidt: bool = True,
    rank_tol: float = 1e-8,
    segment_matrix: Tensor | None = None,
) -> Tensor:
    """``∇_f^⊥`` of Eq. 10: the forget gradient with the retain gradients removed in order.

    Shapes ``[..., D]``; ``segments`` ([D]) splits the last dim into the factors ``Z`` that are
    orthogonalised separately (None: one factor). With ``gram_schmidt`` the retain gradients are
    first made mutually orthogonal (in the given order; a gradient whose residual has squared norm
    ≤ ``rank_tol``·its own is dropped for that factor), so that with ``eps = 0`` the result is
    orthogonal to every one of them. Without it, the literal Eq. 10 sequence.
    ``segment_matrix``: the ``[D, S]`` indicator of ``segments`` if already built.
    """
    seg = _Segments(segments, n_segments, forget, segment_matrix)
    out = forget
    if not gram_schmidt:
        for r in retains:
            out = seg.remove(out, r, eps)
        return out
    basis: list[tuple[Tensor, Tensor]] = []  # (q, ||q||² per segment)
    for r in retains:
        q = r
        for b, b_sq in basis:
            q = seg.remove(q, b, 0.0, b_sq)
        own = seg.dot(r, r)
        res = seg.dot(q, q) if basis else own
        keep = ((res > rank_tol * own) & (own > 0)).to(q.dtype)
        q = q * seg.expand(keep)
        basis.append((q, res * keep))  # = ||q||² of the kept q (keep is 0 or 1)
        out = seg.remove(out, q, eps, res * keep)
    return out


# ----------------------------------------------------------------------------------------------
# the update loop (Algorithm 1)
# ----------------------------------------------------------------------------------------------


def involved_tasks(partitions: Partitions, tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    """The tasks supervised in at least one of the four partitions (in ``tasks`` order)."""
    parts = (partitions.forget, partitions.retain_clean, partitions.retain_inst, partitions.retain_task)
    out: list[TaskSpec] = []
    for t in tasks:
        if any(len(p) and t.name in p.labels and bool(t.supervised(p.labels[t.name]).any()) for p in parts):
            out.append(t)
    return out


def _distance(aucs: Mapping[str, float], target: float | Mapping[str, float], default: float) -> float | None:
    if not aucs:
        return None
    gaps = []
    for t, auc in aucs.items():
        goal = target.get(t, default) if isinstance(target, Mapping) else float(target)
        gaps.append(abs(auc - goal))
    return float(sum(gaps) / len(gaps))


def retain_check(
    partitions: Partitions, *, size: int, seed: int, retain: Batch | None = None, rows: str = "anchor"
) -> Batch:
    """The rows the retain tolerance is checked on, one row per sample with all its retained
    labels: retained instances (a seeded subset of at most ``size`` per source; ``size = 0``: no
    rows at all), then every row of D_r^task (X_f's kept tasks: what a per-task request promises
    to keep). :func:`retain_accuracy` measures each source on its own.

    ``rows``: where the retained instances come from — ``"anchor"``: the retain partitions over the
    anchor (D_r^clean, D_r^inst), which the update trains on; ``"outside_anchor"``: the rows of
    ``retain`` (the full retain set) outside the anchor and X_f, which it does not train on (damage
    there is what the retain term did not repair, e.g. a task's generalisation); ``"both"``: both
    (docs/methods.md has all three measured)."""
    empty = partitions.forget.select(torch.zeros(0, dtype=torch.long))
    if size == 0:
        return empty
    gen = torch.Generator().manual_seed(seed)

    def subset(batch: Batch) -> Batch:
        if len(batch) <= size:
            return batch
        return batch.select(torch.randperm(len(batch), generator=gen)[:size].sort().values)

    sources: list[Batch] = []
    if rows in ("anchor", "both"):
        parts = [b for b in (partitions.retain_clean, partitions.retain_inst) if len(b)]
        sources.append(subset(merge_rows(concat_batches(parts))) if parts else empty)
    if rows in ("outside_anchor", "both"):
        if retain is None:
            raise ValueError(f"retain_check(rows={rows!r}) needs the retain set")
        seen = {*partitions.anchor_sample_ids, *partitions.forget.sample_ids}
        sources.append(subset(retain.select(~id_mask(retain.sample_ids, seen))))
    if len(partitions.retain_task):
        sources.append(merge_rows(partitions.retain_task))
    return concat_batches(sources)


KEPT_OF_FORGOTTEN = " (kept tasks of X_f)"
OUTSIDE_ANCHOR = " (outside the anchor)"


def retain_accuracy(
    tasks: Sequence[TaskSpec],
    outputs: Mapping[str, Tensor],
    check: Batch,
    forget_ids: Sequence[str],
    anchor_ids: Sequence[str] | None = None,
) -> dict[str, float]:
    """Each task's accuracy on each source of the :func:`retain_check` rows: the retained instances
    (under ``"<task>"``; with ``anchor_ids``, the rows outside the anchor under ``"<task> (outside
    the anchor)"``) and X_f's rows (D_r^task, under ``"<task> (kept tasks of X_f)"``). A drop in
    any counts against the retain tolerance, so a per-task request cannot trade the kept tasks of
    the forgotten samples (a few dozen rows) for the anchor's hundreds."""
    device = check.device
    on_xf = id_mask(check.sample_ids, forget_ids).to(device)
    groups = {"": ~on_xf, KEPT_OF_FORGOTTEN: on_xf}
    if anchor_ids is not None:
        in_anchor = id_mask(check.sample_ids, anchor_ids).to(device)
        groups = {"": in_anchor, OUTSIDE_ANCHOR: ~in_anchor & ~on_xf, KEPT_OF_FORGOTTEN: on_xf}
    out: dict[str, float] = {}
    for suffix, mask in groups.items():
        if bool(mask.any()):
            acc = task_accuracy(tasks, {k: v[mask] for k, v in outputs.items()}, check.select(mask))
            out.update({f"{t}{suffix}": a for t, a in acc.items()})
    return out


def task_accuracy(tasks: Sequence[TaskSpec], outputs: Mapping[str, Tensor], batch: Batch) -> dict[str, float]:
    """Each task's metric on the rows of ``batch`` that have its label (tasks without any: left out)."""
    out: dict[str, float] = {}
    for task in tasks:
        y = batch.labels.get(task.name)
        if y is None or not bool(task.supervised(y).any()):
            continue
        out[task.name] = float(task.metric(outputs[task.name], y.to(outputs[task.name].device)))
    return out


def check_accuracy(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    partitions: Partitions,
    cfg: IAConfig,
    *,
    seed: int,
    device: str = "cpu",
    retain: Batch | None = None,
) -> dict[str, float]:
    """``model``'s accuracy on the :func:`retain_check` rows (the ``retain_baseline`` of
    :func:`interference_aware_unlearn`, measured before any stage of a request changes the model)."""
    check = retain_check(partitions, size=cfg.check_size, seed=seed, retain=retain, rows=cfg.check_rows)
    check = check.to(device)
    if len(check) == 0:
        return {}
    return retain_accuracy(
        tasks,
        model_outputs(model, check.inputs),
        check,
        partitions.forget.sample_ids,
        _anchor_ids(partitions, cfg),
    )


def _anchor_ids(partitions: Partitions, cfg: IAConfig) -> list[str] | None:
    """The anchor's sample ids when the check rows mix anchor and outside rows (``"both"``)."""
    return list(partitions.anchor_sample_ids) if cfg.check_rows == "both" else None


class _Monitor:
    """What early stopping measures after every epoch, in one forward pass: each forgotten task's
    forget-vs-held-out loss-MIA AUC and each task's accuracy on the retain check rows."""

    def __init__(
        self,
        forget: Batch,
        heldout: Batch,
        check: Batch,
        forget_tasks: Sequence[TaskSpec],
        tasks: Sequence[TaskSpec],
        device: str,
        forward: Forward | None = None,
        anchor_ids: Sequence[str] | None = None,
    ) -> None:
        self.forget, self.heldout, self.check, self.forward = forget, heldout, check, forward
        self.anchor_ids = anchor_ids
        self.forget_tasks, self.tasks = list(forget_tasks), list(tasks)
        self.inputs = inputs_to(cat_inputs([forget.inputs, heldout.inputs, check.inputs]), device)
        self.sizes = [len(forget), len(heldout), len(check)]

    def __call__(self, model: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        out = model_outputs(model, self.inputs, forward=self.forward)
        parts = {k: torch.split(v, self.sizes) for k, v in out.items()}
        f_out, v_out, c_out = ({k: p[i] for k, p in parts.items()} for i in range(3))
        aucs = mia_from_outputs(self.forget_tasks, f_out, self.forget, v_out, self.heldout)
        return aucs, retain_accuracy(self.tasks, c_out, self.check, self.forget.sample_ids, self.anchor_ids)


def _drop(accuracy: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """The largest accuracy drop of any task from ``baseline`` (0 when nothing is comparable)."""
    drops = [baseline[t] - a for t, a in accuracy.items() if t in baseline]
    return max(drops, default=0.0)


def select_checkpoint(history: Sequence[Mapping[str, Any]], tolerance: float) -> int:
    """The index in ``history`` early stopping keeps: among the checkpoints whose ``retain_drop``
    is within ``tolerance``, the one whose MIA ``distance`` to the target is smallest (earliest on
    ties); when none is within it, the one with the smallest drop. A checkpoint without a distance
    ranks after those with one."""

    def closeness(i: int) -> tuple[float, int]:
        d = history[i]["distance"]
        return (math.inf if d is None else float(d), i)

    within = [i for i, h in enumerate(history) if h["retain_drop"] <= tolerance + 1e-12]
    if within:
        return min(within, key=closeness)
    return min(range(len(history)), key=lambda i: (history[i]["retain_drop"], *closeness(i)))


def interference_aware_unlearn(
    model: nn.Module,
    *,
    tasks: Sequence[TaskSpec],
    partitions: Partitions,
    heldout: Batch,
    cfg: IAConfig | None = None,
    seed: int = 0,
    mia_target: float | Mapping[str, float] | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    retain_baseline: Mapping[str, float] | None = None,
    retain: Batch | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Algorithm 1 on ``model`` in place (LoRA factors + forgotten-task heads). Returns JSON info.

    ``retain_baseline``: the pre-request model's accuracy on the :func:`retain_check` rows (the
    ``default`` method measures it before SSD); ``None``: the model as given is the baseline.
    ``on_epoch(k, n)``: called after epoch k of at most n (progress).
    """
    cfg = cfg or IAConfig()
    info: dict[str, Any] = {"config": cfg.to_json()}
    forget = partitions.forget.to(device)
    if len(forget) == 0 or cfg.epochs == 0:
        info.update(
            epochs_run=0, best_epoch=0, steps=0, reason="empty forget set" if len(forget) == 0 else None
        )
        return info
    with eval_mode(model):  # no dropout or batch statistics anywhere in the loop (as the gradients)
        size = cfg.check_size if cfg.checks_retain else 0
        check = retain_check(partitions, size=size, seed=seed, retain=retain, rows=cfg.check_rows)
        info.update(_run(model, tasks, partitions, forget, heldout.to(device), cfg, seed, mia_target,
                         device, progress, retain_baseline, check.to(device), on_epoch))  # fmt: skip
    return info


def _run(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    partitions: Partitions,
    forget: Batch,
    heldout: Batch,
    cfg: IAConfig,
    seed: int,
    mia_target: float | Mapping[str, float] | None,
    device: str,
    progress: Callable[[str], None] | None,
    retain_baseline: Mapping[str, float] | None,
    check: Batch,
    on_epoch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    inv = involved_tasks(partitions, tasks)
    inv_names = [t.name for t in inv]
    forget_names = [t for t in partitions.forget_tasks if t in inv_names]
    forget_specs = [t for t in inv if t.name in forget_names]

    groups = param_groups(model)
    head_names = groups.head_params(forget_names) if cfg.update_heads else []
    all_params = dict(model.named_parameters())
    layout = FlatLayout({n: p.shape for n, p in all_params.items()}, groups.lora, head_names)
    names = layout.names
    params = [all_params[n] for n in names]
    rank = layout.rank
    T = len(inv)
    dim = cfg.subspace_dim or max(1, rank // max(T, 1))
    use_projection = cfg.projection and rank > 0
    U = init_subspaces(T, rank, min(dim, rank), seed=seed, mode=cfg.subspace_init) if use_projection else None
    info: dict[str, Any] = {
        "tasks": inv_names,
        "forget_tasks": forget_names,
        "rank": rank,
        "subspace_dim": dim if use_projection else None,
        "updated_parameters": names,
    }

    gen = torch.Generator().manual_seed(seed)
    cyclers = {
        "clean": Cycler(partitions.retain_clean.to(device), cfg.batch_size, gen),
        "inst": Cycler(partitions.retain_inst.to(device), cfg.batch_size, gen),
        "task": Cycler(partitions.retain_task.to(device), cfg.batch_size, gen),
    }
    switches = cfg.retain_switches
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    target: float | Mapping[str, float] = cfg.mia_target if mia_target is None else mia_target
    forward = fast_forward(model)
    monitor = _Monitor(
        forget, heldout, check, forget_specs, inv, device, forward, _anchor_ids(partitions, cfg)
    )

    history: list[dict[str, Any]] = []
    states: list[dict[str, Tensor]] = []

    def checkpoint(epoch: int) -> None:
        aucs, accuracy = monitor(model)
        if not history and retain_baseline is None:
            baseline.update(accuracy)
        history.append(
            {
                "epoch": epoch,
                "mia_auc": aucs,
                "distance": _distance(aucs, target, cfg.mia_target),
                "retain_accuracy": accuracy,
                "retain_drop": _drop(accuracy, baseline),
            }
        )
        states.append({n: all_params[n].detach().clone() for n in names})

    baseline: dict[str, float] = dict(retain_baseline or {})
    checkpoint(0)
    steps, since_best, best = 0, 0, 0
    epochs_run = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(forget), generator=gen)
        for start in range(0, len(forget), cfg.batch_size):
            f_batch = forget.select(order[start : start + cfg.batch_size])
            retain_batches = [cyclers[k].next() for k in ("clean", "inst", "task")]
            G = partition_task_grads(
                model,
                names,
                [f_batch, *retain_batches],
                inv,
                backend=cfg.grad_backend,
                forward=forward,
                named=all_params,
            )
            flat = layout.pack(G, lead=2).detach()  # [4, T, D]
            direction = _direction(flat, layout, U, cfg, switches)
            for p, g in zip(params, layout.unpack(direction).values(), strict=True):
                p.grad = g.to(p.dtype).clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if U is not None:
                U = subspace_step(U, cfg.subspace_lr)
            steps += 1
        epochs_run = epoch
        checkpoint(epoch)
        if progress is not None:
            progress(f"ia: epoch {epoch}/{cfg.epochs} mia={history[-1]['mia_auc']}")
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs)
        chosen = select_checkpoint(history, cfg.retain_tolerance)
        since_best = 0 if chosen != best else since_best + 1
        best = chosen
        if cfg.early_stopping and cfg.patience > 0 and since_best >= cfg.patience:
            break
    if not cfg.early_stopping:  # the last epoch is kept
        best = epochs_run
    restore(model, states[best])
    info.update(
        epochs_run=epochs_run,
        steps=steps,
        best_epoch=history[best]["epoch"],
        best_distance=history[best]["distance"],
        retain_baseline=baseline,
        mia_target=dict(target) if isinstance(target, Mapping) else float(target),
        history=history,
        subspace_penalty=None if U is None else float(subspace_penalty(U)),
    )
    return info


def _direction(
    flat: Tensor, layout: FlatLayout, U: Tensor | None, cfg: IAConfig, switches: Mapping[str, bool]
) -> Tensor:
    """The Eq. 11 gradient ``Σ_t η1·∇_r^{(t)} − η2·∇_f^{⊥(t)}`` from ``[4, T, D]`` partition-task grads
    (partitions in the order forget, clean, inst, task)."""
    T = int(flat.shape[1])
    forget_t = flat[0]  # [T, D]: D_f's loss on task t
    retain_t = flat[1:]  # [3, T, D]
    retain_full = retain_t.sum(1, keepdim=True).expand(-1, T, -1)  # [3, T, D]: whole partition loss
    descent = retain_t.sum(0)  # [T, D]: retain loss on task t
    if U is not None:  # one projection of all five [T, D] blocks
        stacked = layout.project(torch.cat([forget_t[None], retain_full, descent[None]]), projectors(U))
        forget_t, retain_full, descent = stacked[0], stacked[1:4], stacked[4]
    # an all-zero retain gradient (an empty partition, e.g. clean and task in full-task requests)
    # removes nothing: skip it rather than pay for its segment sums
    chosen = [
        retain_full[i] for i, k in enumerate(RETAIN_ORDER) if switches[k] and bool(retain_full[i].any())
    ]
    orth = orthogonalize(
        forget_t,
        chosen,
        segments=layout.segments,
        n_segments=layout.n_segments,
        eps=cfg.epsilon,
        gram_schmidt=cfg.gram_schmidt,
        rank_tol=cfg.rank_tol,
        segment_matrix=layout.segment_matrix(forget_t),
    )
    return (cfg.eta1 * descent - cfg.eta2 * orth).sum(0)
