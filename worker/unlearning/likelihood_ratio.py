"""The likelihood-ratio membership attack of the audit: offline LiRA with reference adapters.

Why offline LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles",
Alg. 1 without the IN models) rather than RMIA (Zarifzadeh et al. 2024): the references are
trained once per model on halves of the clients, so a forgotten client's samples have only OUT
references that are valid for the model *after* the request (its IN references saw the client),
and the question the audit asks is exactly offline LiRA's — does the model under audit sit above
the distribution of models that never saw the sample? RMIA's offline variant approximates the IN
side from OUT models with a factor ``a`` and compares against population samples with a threshold
``γ``: two more settings to calibrate, on a handful of references. (With one global σ, the ranking
— hence TPR and AUC — is that of ``φ_target − μ_out``.)

Per sample ``x`` with label ``y`` and task ``t``:

- scaled confidence ``φ(f(x)_y) = log p_y − log Σ_{y'≠y} p_y'`` (the logit of the true-label
  probability — the paper's logit scaling — computed stably from the logits); for a regression task
  ``φ = −loss``;
- ``μ_out(x)``: the mean of ``φ`` over the references whose half excluded ``x``'s client (every
  reference for unseen-population samples); ``σ_out``: one global standard deviation over all
  (sample, OUT reference) pairs — the paper's fixed-variance choice for few shadow
  models, since 2–4 OUT values per sample give no usable per-sample variance;
- score ``Λ(x) = Φ((φ_target(x) − μ_out(x)) / σ_out)`` (offline LiRA: ``1 − Pr[Z > φ_target]``,
  ``Z ~ N(μ_out, σ_out²)``); its ranking is that of the z-value, which is what is kept.

Positives: the forgotten samples of the task (the request's Unl split); negatives: the
unseen-population samples (the held-out split). Reported per forgotten task: TPR at 1 % FPR (the
threshold is the negatives' score that at most 1 % of them exceed; with fewer than 100 negatives
that is the largest one, FPR 0) and the ROC-AUC. Everything is vectorised over samples and
references.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from worker.unlearning.audit import loss_mia_auc, model_outputs
from worker.unlearning.reference_adapters import LoadedReferences
from worker.unlearning.types import Batch, ClassificationTask, TaskSpec, cat_inputs, inputs_to

METHOD = "offline LiRA (Carlini et al. 2022, Alg. 1 OUT-only, global variance)"
FPR = 0.01


def scaled_confidence(task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
    """``φ`` per row (rows must be supervised for ``task``): the logit of the true-label
    probability for a classification, ``−loss`` otherwise. Works on ``[..., N, C]`` outputs."""
    if isinstance(task, ClassificationTask):
        logits = output.double()
        y = target.expand(logits.shape[:-1]).unsqueeze(-1)
        true = logits.gather(-1, y).squeeze(-1)
        others = logits.scatter(-1, y, float("-inf")).logsumexp(-1)
        return true - others
    if output.dim() == 2:
        return -task.per_sample_loss(output, target).double()
    return -torch.stack([task.per_sample_loss(o, target) for o in output]).double()


def lira_scores(target_phi: Tensor, ref_phi: Tensor, out: Tensor) -> tuple[Tensor, float]:
    """z-values ``(φ_target − μ_out) / σ_out`` per sample (NaN where a sample has no OUT reference)
    and ``σ_out``. ``target_phi``: ``[N]``; ``ref_phi``, ``out``: ``[K, N]``."""
    w = out.to(torch.float64)
    n_out = w.sum(0)
    mu = (ref_phi * w).sum(0) / n_out.clamp(min=1.0)
    resid = (ref_phi - mu) * w
    dof = float(w.sum() - (n_out > 0).sum())
    sigma = math.sqrt(float((resid**2).sum()) / dof) if dof > 0 else 0.0
    sigma = max(sigma, 1e-6)  # identical references: any gap is then decisive
    z = (target_phi - mu) / sigma
    return torch.where(n_out > 0, z, torch.full_like(z, float("nan"))), sigma


def _per_reference_auc(ref_losses: Tensor, out: Tensor, is_forget: Tensor) -> list[tuple[int, float]]:
    """(reference row, loss-MIA AUC over the forgotten rows it is OUT for against every unseen row)
    for each reference with any such row. ``ref_losses``, ``out``: ``[K, N]``; ``is_forget``: ``[N]``."""
    aucs = []
    for r in range(int(ref_losses.shape[0])):  # K references, a handful; samples stay vectorised
        rows = out[r] & is_forget
        if bool(rows.any()):
            auc = loss_mia_auc(ref_losses[r][rows], ref_losses[r][~is_forget])
            if auc is not None:
                aucs.append((r, auc))
    return aucs


def _out_mask(loaded: LoadedReferences, forget: Batch, unseen: Batch, client_index: dict[str, int]) -> Tensor:
    """``[K, len(forget) + len(unseen)]``: which references never saw each row's client (unseen
    rows belong to no client: every reference is OUT for them)."""
    subset = torch.cat([forget.subset, torch.full((len(unseen),), -1, dtype=torch.long)])
    return loaded.refs.out_mask(subset, client_index)


def _attacked_tasks(
    tasks: Sequence[TaskSpec], forget_tasks: Sequence[str], forget: Batch, unseen: Batch, device: str
) -> Iterator[tuple[TaskSpec, Tensor, Tensor, Tensor]]:
    """Per forgotten task with labelled rows on both sides: the task, its supervised rows of
    ``forget`` + ``unseen`` (a mask over the concatenation), their labels, and which of them are
    forgotten rows."""
    n_f = len(forget)
    for task in tasks:
        name = task.name
        if name not in forget_tasks or name not in forget.labels or name not in unseen.labels:
            continue
        y = torch.cat([forget.labels[name], unseen.labels[name]]).to(device)
        rows = task.supervised(y)
        if not bool(rows[:n_f].any()) or not bool(rows[n_f:].any()):
            continue
        yield task, rows, y[rows], torch.arange(len(y))[rows.cpu()] < n_f


def out_reference_auc(ref_losses: Tensor, out: Tensor, is_forget: Tensor) -> float | None:
    """The loss-MIA AUC (forgotten vs unseen rows) that models which never saw the forgotten clients
    score: per reference, over the forgotten rows it is OUT for, against every unseen row; the
    median over references with any such row (``None`` if none). ``ref_losses``, ``out``: ``[K, N]``;
    ``is_forget``: ``[N]``. The level a model that never saw the client reaches (issue 8 part 1;
    early stopping's per-client target: :func:`out_reference_targets`)."""
    aucs = [a for _, a in _per_reference_auc(ref_losses, out, is_forget)]
    return statistics.median(aucs) if aucs else None


def out_reference_targets(
    loaded: LoadedReferences,
    tasks: Sequence[TaskSpec],
    *,
    forget: Batch,
    unseen: Batch,
    forget_tasks: Sequence[str],
    client_index: dict[str, int],
    device: str = "cpu",
    forget_mask: Tensor | None = None,
) -> dict[str, dict[str, Any]]:
    """Per forgotten task, what the OUT references — models that never saw the forgotten rows'
    clients — score on ``forget`` against ``unseen``: per reference (over the forgotten rows it is
    OUT for) the task metric, the loss-MIA AUC (the statistics early stopping measures) and the
    metric's gap to its own metric on ``unseen`` (``accuracy_gap``: how far below the unseen-data
    level the client sits for a model that never saw it), their median over the references,
    their spread (max − min) and their highest metric and highest gap (``best``). A reference IN
    for every forgotten row contributes nothing. Tasks without a forgotten or unseen row, or without
    an OUT reference, are left out. The per-client early-stopping target of issue 8 part 1 (no
    retrain anywhere).

    ``forget_mask`` (``[K, len(forget)]`` bool): which references count for each forgotten row
    instead of the OUT ones — the task-withheld references of a per-task request
    (:meth:`ReferenceSet.withheld_mask`); the unseen rows count for every reference either way."""
    n_f = len(forget)
    out_mask = _out_mask(loaded, forget, unseen, client_index)
    if forget_mask is not None:
        out_mask = torch.cat([forget_mask.to(torch.bool), out_mask[:, n_f:]], dim=1)
    # a reference IN for every forgotten row scores nothing: it is not forwarded (on the request
    # path of a per-client request that is half of them)
    active = [r for r, any_out in enumerate(out_mask[:, :n_f].any(dim=1).tolist()) if any_out]
    per_task: dict[str, dict[str, Any]] = {}
    if not active:
        return per_task
    parts = [("forget", forget), ("unseen", unseen)]
    ref_outs = [loaded.outputs(r, parts, device) for r in active]
    out_mask = out_mask[active]
    members = list(loaded.refs.members)
    indices = [members[r] for r in active]
    for task, rows, ys, is_forget in _attacked_tasks(tasks, forget_tasks, forget, unseen, device):
        name = task.name
        mask = out_mask[:, rows.cpu()]
        outs = [o[name][rows] for o in ref_outs]
        losses = torch.stack([task.per_sample_loss(o, ys) for o in outs]).cpu()
        unseen_rows = (~is_forget).to(ys.device)
        values = []
        for r, auc in _per_reference_auc(losses, mask, is_forget):
            sel = (mask[r] & is_forget).to(ys.device)
            accuracy = float(task.metric(outs[r][sel], ys[sel]))
            unseen_accuracy = float(task.metric(outs[r][unseen_rows], ys[unseen_rows]))
            values.append(
                {
                    "reference": indices[r],
                    "mia_auc": auc,
                    "accuracy": accuracy,
                    "unseen_accuracy": unseen_accuracy,
                    "accuracy_gap": accuracy - unseen_accuracy,
                    "n_forget": int(sel.sum()),
                }
            )
        if not values:
            continue
        summary = {k: [float(v[k]) for v in values] for k in ("mia_auc", "accuracy", "accuracy_gap")}
        per_task[name] = {
            **{k: statistics.median(v) for k, v in summary.items()},
            "spread": {k: max(v) - min(v) for k, v in summary.items()},
            # the highest metric and the highest gap, each over the references (every task's
            # metric is higher-better: a regression's is −MAE): ``ia.target_accuracy_reference``
            "best": {k: max(summary[k]) for k in ("accuracy", "accuracy_gap")},
            "references": len(values),
            "per_reference": values,
        }
    return per_task


def forget_bound_allowance(per_task: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Per forgotten task, the acceptance check's forget-bound allowance
    (``acceptance.reference_allowance``) from :func:`out_reference_targets`' result: the median over
    the OUT references of (their metric on the forget set − their metric on the unseen rows), its
    ``accuracy_gap``."""
    return {t: float(v["accuracy_gap"]) for t, v in per_task.items()}


def score_auc(positive: Tensor, negative: Tensor) -> float | None:
    """ROC-AUC of a membership score (higher = member): positives against negatives."""
    return loss_mia_auc(-positive, -negative)  # loss_mia_auc scores −loss: pass −score


def tpr_at_fpr(positive: Tensor, negative: Tensor, fpr: float = FPR) -> float | None:
    """Share of positives scored above the threshold that at most ``fpr`` of negatives exceed."""
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    neg = torch.sort(negative.double(), descending=True).values
    threshold = neg[min(math.floor(fpr * neg.numel()), neg.numel() - 1)]
    return float((positive.double() > threshold).double().mean())


@dataclass
class TaskLR:
    """The attack on one forgotten task."""

    tpr_at_1pct_fpr: float | None
    auc: float | None
    n_forget: int
    n_unseen: int
    sigma_out: float
    min_out_references: int  # fewest OUT references any forgotten sample had
    no_out_reference: int  # forgotten samples left out: no reference excluded their client
    out_reference_mia_auc: float | None  # loss-MIA AUC of the OUT references (:func:`out_reference_auc`)


def likelihood_ratio_audit(
    model: nn.Module,
    loaded: LoadedReferences,
    tasks: Sequence[TaskSpec],
    *,
    forget: Batch,
    unseen: Batch,
    forget_tasks: Sequence[str],
    client_index: dict[str, int],
    device: str = "cpu",
    batch_size: int = 1024,
    outputs: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """The ``likelihood_ratio`` evidence: per forgotten task, TPR at 1 % FPR and AUC of ``forget``
    (positives) against ``unseen`` (negatives) under offline LiRA with ``loaded``'s references.
    ``outputs``: ``model``'s outputs on ``forget`` then ``unseen``, if the caller has them (the
    audit's); the references' come from their row cache (:meth:`LoadedReferences.outputs`)."""
    if outputs is None:
        inputs = inputs_to(cat_inputs([forget.inputs, unseen.inputs]), device)
        outputs = model_outputs(model, inputs, batch_size=batch_size)
    target_out = dict(outputs)
    parts = [("forget", forget), ("unseen", unseen)]
    ref_outs = [loaded.outputs(r, parts, device) for r in range(len(loaded.models))]
    out_mask = _out_mask(loaded, forget, unseen, client_index)
    per_task: dict[str, Any] = {}
    for task, rows, ys, is_forget in _attacked_tasks(tasks, forget_tasks, forget, unseen, device):
        name = task.name
        phi = scaled_confidence(task, target_out[name][rows], ys).cpu()
        ref_phi = scaled_confidence(task, torch.stack([o[name][rows] for o in ref_outs]), ys).cpu()
        mask = out_mask[:, rows.cpu()]
        z, sigma = lira_scores(phi, ref_phi, mask)
        pos, neg = z[is_forget], z[~is_forget]
        missing = int(torch.isnan(pos).sum())
        pos = pos[~torch.isnan(pos)]
        n_out_forget = mask[:, is_forget].sum(0)
        ref_losses = torch.stack([task.per_sample_loss(o[name][rows], ys) for o in ref_outs]).cpu()
        per_task[name] = asdict(
            TaskLR(
                tpr_at_1pct_fpr=tpr_at_fpr(pos, neg),
                auc=score_auc(pos, neg),
                n_forget=int(pos.numel()),
                n_unseen=int(neg.numel()),
                sigma_out=sigma,
                min_out_references=int(n_out_forget.min()) if n_out_forget.numel() else 0,
                no_out_reference=missing,
                out_reference_mia_auc=out_reference_auc(ref_losses, mask, is_forget),
            )
        )
    return {
        "method": METHOD,
        "references": len(loaded.models),
        "recipe_digest": loaded.refs.recipe_digest,
        "fpr": FPR,
        "tasks": per_task,
        "tpr_at_1pct_fpr": {t: v["tpr_at_1pct_fpr"] for t, v in per_task.items()},
        "auc": {t: v["auc"] for t, v in per_task.items()},
    }
