"""The acceptance check of a request (UNLEARNING.md, default method step 3): after the update, test
the request's promise on data the update did not train on, with no retrain anywhere.

What a correct unlearning must show, against the version the round started from (``before``) and
the held-out split (data of no client: the unseen population):

- forgotten: for every forgotten task, the new model does no better on the forget set than on data
  it never saw — accuracy ≤ held-out accuracy + ``forget_z`` standard errors of the difference of
  the two (the forget set's n samples and the held-out rows are both a sample: ``unseen_noise``; a
  proportion's errors, a regression's own). The held-out level is the lower of the original
  version's (v1) and the new model's own, so that neither a drift of the model nor a lucky draw of
  the held-out split passes a forget set that is still recognisable. A forget set the old version
  had not memorised (already at or below the bound) has nothing to show and passes. Where the model
  has reference adapters, a task that fails this bound is read again with the bound raised by how
  much better than on unseen data the references that never saw the client do on the forget set
  (their median, when positive: ``reference_allowance``): some clients' data is easier for any
  model, and without it an exact retrain failed the check on such a client.
- kept: the tasks a per-task request keeps, on its samples (D_r^task), stay within
  ``kept_tolerance`` + ``forget_z`` standard errors of the old version's accuracy; with
  ``retained_clients``, every retained client's training data too, task by task.
- held-out: every task's held-out accuracy stays within ``heldout_tolerance`` + ``forget_z``
  standard errors of the paired change (:func:`paired_standard_error`, from the round input to the
  new model over the held-out rows) of the best of the old version's and the original's (so that a
  sequence of requests cannot drift the model away by a tolerance each). Two trained models differ
  on many held-out rows, so without the noise term an exact retrain failed the bound (docs/methods.md,
  "The held-out bound").

The same functions judge the served model in ``lethe demo`` (``worker/demo_checks.py``): a request
that completes has passed what the demo checks, or says in its evidence why not.

Accuracy bounds use the standard error of a proportion (Agresti–Coull, so that a group fitted
perfectly still has a non-zero error): they are stated for accuracy-like metrics in [0, 1]
(classification).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from pydantic import dataclasses as pydantic_dataclasses
from torch import nn

from worker.unlearning.config import SETTINGS, Count, NonNegative, parse_settings
from worker.unlearning.types import IGNORE, Batch, TaskSpec, device_of

FORGET_NOISE_Z = 2.0
HELDOUT_TOLERANCE = 0.05
#: what a forgotten task's forget-bound check is called (followed by the task's name)
FORGET_BOUND = "forgotten: forget set, "
#: how a forget check whose old version was already at the bound ends its detail
NOTHING_TO_SHOW = "(nothing to show)"


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str
    # how far inside (> 0) or outside (< 0) its bound the measured value is, in metric points
    margin: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        margin = None if math.isnan(self.margin) else round(self.margin, 6)
        return {"what": self.what, "ok": self.ok, "detail": self.detail, "margin": margin}


def only_forget_bounds_failed(checks: Sequence[Check]) -> bool:
    """Whether some check failed and every failed one is a forgotten task's forget bound (what
    more forgetting can repair; a kept task or a held-out level that fell cannot be)."""
    failed = [c for c in checks if not c.ok]
    return bool(failed) and all(c.what.startswith(FORGET_BOUND) for c in failed)


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _se(p: float, n: int, z: float) -> float:
    """Standard error of a proportion ``p`` measured on ``n`` samples, Agresti–Coull style (add z²/2
    successes and failures): the plain Wald error is 0 at p = 1, which would make one changed
    prediction on a perfectly fitted group a failure (a retrain fails such a bound too)."""
    p = min(max(p, 0.0), 1.0)
    n_tilde = n + z * z
    p_tilde = (p * n + z * z / 2) / n_tilde
    return math.sqrt(p_tilde * (1 - p_tilde) / n_tilde)


def unseen_bound(
    unseen: float,
    n: int,
    z: float = FORGET_NOISE_Z,
    se: float | None = None,
    unseen_se: float | None = None,
) -> float:
    """The forget check's bound: the unseen-data level plus ``z`` standard errors over ``n`` samples
    (also the target of the interference-aware stage's early stopping, ``ia.forget_accuracy_z``).
    ``se``: the metric's own standard error where it is not a proportion (a regression's −MAE:
    :func:`metric_standard_error`); ``None`` or NaN: a proportion's at the unseen level over n.
    ``unseen_se``: the standard error of the unseen-data level itself (it is measured on a sample
    too: :func:`level_standard_error`); given, the bound is a two-sample one, z standard errors of
    the difference of the two means (√(se² + unseen_se²)); ``None`` or NaN: the level as exact."""
    own = level_standard_error(unseen, n, z, se)
    if unseen_se is not None and not math.isnan(unseen_se):
        own = math.hypot(own, unseen_se)
    return unseen + z * own


def level_standard_error(unseen: float, n: int, z: float = FORGET_NOISE_Z, se: float | None = None) -> float:
    """The standard error of a metric at level ``unseen`` measured on ``n`` rows (the forget set's,
    or the held-out rows' for the unseen-data level itself): ``se`` (a metric that is not a
    proportion: :func:`metric_standard_error` on those rows), else a proportion's at ``unseen``
    over n. NaN without rows."""
    if n <= 0 or math.isnan(unseen):
        return math.nan
    return _se(unseen, n, z) if se is None or math.isnan(se) else se


def metric_standard_error(task: TaskSpec, output: torch.Tensor, target: torch.Tensor) -> float | None:
    """The standard error of ``task``'s metric of ``output`` against ``target`` for a task whose metric
    is not a proportion (one that defines ``metric_standard_error``, e.g. ``RegressionTask``);
    ``None`` for the others (their bounds use a proportion's)."""
    of = getattr(task, "metric_standard_error", None)
    return None if of is None else float(of(output, target.to(output.device)))


def forget_check(
    what: str,
    before: float,
    after: float,
    n: int,
    unseen: float,
    z: float = FORGET_NOISE_Z,
    allowance: float = 0.0,
    se: float | None = None,
    unseen_se: float | None = None,
) -> Check:
    """The forgotten group's accuracy fell to the level of unseen data (``unseen`` + z SE over n),
    raised by ``allowance`` (> 0: how much better than on unseen data models that never saw the
    group do on it: the engine's ``ReferenceAllowance``). ``se``: the standard error of a metric
    that is not a proportion (a regression's −MAE: its per-sample spread / √n); ``None``: that of
    a proportion at the unseen level over n. ``unseen_se``: the unseen level's own standard error
    (:func:`unseen_bound`'s two-sample bound); ``None``: the level as exact."""
    if n == 0 or math.isnan(before) or math.isnan(unseen):
        return Check(what, False, "no labelled samples to measure")
    allowance = max(0.0, allowance)
    bound = unseen_bound(unseen, n, z, se, unseen_se) + allowance
    extra = (
        f" + {fmt(allowance)} (references that never saw it do that much better on it)" if allowance else ""
    )
    two_sample = unseen_se is not None and not math.isnan(unseen_se)
    of = "SE of the difference" if two_sample else "SE"
    level = f"unseen-data level {fmt(unseen)} + {z:g} {of} (n={n}){extra}"
    detail = f"{fmt(before)} → {fmt(after)}; {level} = {fmt(bound)}"
    if before <= bound:
        return Check(what, False, f"{detail}: the old version had not memorised it {NOTHING_TO_SHOW}")
    return Check(what, after <= bound, detail, margin=bound - after)


def nothing_to_show(check: Check) -> bool:
    """Whether a forget check found its group not memorised by the old version (already at or
    below the bound): nothing to forget, whatever the new model does."""
    return check.detail.endswith(NOTHING_TO_SHOW)


def paired_standard_error(before: torch.Tensor, after: torch.Tensor) -> float:
    """The standard error of ``after.mean() - before.mean()`` for per-sample scores of two models on
    the same rows (the standard deviation of the per-row differences / √n): how far the measured
    change of a metric can move from the models' true change by the draw of the rows alone. NaN
    without two rows."""
    n = int(before.numel())
    if n < 2:
        return float("nan")
    return float((after.double() - before.double()).std() / math.sqrt(n))


def heldout_check(
    task: str,
    before: float,
    after: float,
    tolerance: float = HELDOUT_TOLERANCE,
    z: float = FORGET_NOISE_Z,
    se: float | None = None,
    n: int | None = None,
) -> Check:
    """Held-out accuracy stayed within ``tolerance`` of ``before``, plus ``z`` standard errors ``se``
    of the paired change over the ``n`` held-out rows (:func:`paired_standard_error`; ``None`` or
    NaN: the tolerance alone). On ``digits-clients`` (449 held-out rows) an exact retrain from
    another seed lands up to 12 points under v1: the tolerance alone failed it in 7–10 % of pairs,
    with the noise term in 0.1–0.9 % (docs/methods.md, "The held-out bound")."""
    noise = 0.0 if se is None or math.isnan(se) else z * se
    allowed = tolerance + noise
    how = (
        f"{100 * tolerance:.0f}"
        if not noise
        else f"{100 * allowed:.1f} = {100 * tolerance:.0f} + {z:g} SE of the paired change, n={n}"
    )
    detail = f"{fmt(before)} → {fmt(after)} (drop {100 * (before - after):+.1f} points; allowed {how})"
    margin = after - (before - allowed)
    return Check(f"held-out accuracy kept: {task}", margin >= 0, detail, margin=margin)


def kept_check(
    what: str,
    before: float,
    after: float,
    n: int,
    tolerance: float = HELDOUT_TOLERANCE,
    z: float = FORGET_NOISE_Z,
) -> Check:
    """Retained training data kept its accuracy (``tolerance`` + z SE of n samples)."""
    if n == 0 or math.isnan(before):
        return Check(what, False, "no labelled samples to measure")
    allowed = tolerance + z * _se(before, n, z)
    detail = (
        f"{fmt(before)} → {fmt(after)} (drop {100 * (before - after):+.1f} points; allowed "
        f"{100 * allowed:.1f} = {100 * tolerance:.0f} + {z:g} SE, n={n})"
    )
    margin = after - (before - allowed)
    return Check(what, margin >= 0, detail, margin=margin)


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class AcceptanceConfig:
    """``settings["acceptance"]``."""

    enabled: bool = True
    forget_z: NonNegative = FORGET_NOISE_Z
    heldout_tolerance: NonNegative = HELDOUT_TOLERANCE
    kept_tolerance: NonNegative = HELDOUT_TOLERANCE
    # also check every retained client's training data, task by task (off by default: an exact
    # retrain fails it on 2 of 10 seeds of digits-clients — how well a training run fits a client's
    # noisy labels varies by 10–20 points between runs — so it is no promise a retrain keeps)
    retained_clients: bool = False
    # what a request whose update failed the check falls back to: "retrain" (the exact path) or
    # "none" (the request completes with the failed check in its evidence)
    fallback: Literal["retrain", "none"] = "retrain"
    # before that: a request whose forget bound failed (and nothing else) gets the interference-aware
    # stage once more, from the model the round was to publish, for at most this many optimiser
    # steps, stopped at the first checkpoint whose forget set is at the check's unseen-data level
    # (``worker.unlearning.continuation``; only methods with that stage: ``default``, ``ia``); 0: off.
    # Issue 8 part 3: on scenes three of five requests missed the bound by 0.3–1.2 points and
    # paid a 92–98 s retrain each (docs/benchmarks.md, "Continuing before the exact path")
    continue_steps: Count = 100
    # a forgotten task that fails its bound gets a second reading with the bound raised by how much
    # better than on unseen data the reference adapters that never saw the client do on the forget
    # set (their median; never lowered): a client whose data is easier for any model is no leak.
    # Without it an exact retrain failed the check on such a client (docs/methods.md)
    reference_allowance: bool = True
    # the unseen-data level is a measurement too (the held-out rows: 1,800 on scenes against a
    # forget set of 1,500): the forget bound is z standard errors of the difference of the two
    # means (a two-sample bound). False: the level as exact (the bound before 5 Dec 2026), which
    # exact retrains failed on 12 of 216 scenes client-tasks (two-sample: 6; docs/methods.md,
    # "The forget bound's noise")
    unseen_noise: bool = True

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> AcceptanceConfig:
        return parse_settings(cls, settings, "acceptance")  # bounds: the fields' types

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Groups:
    """The rows one request's check measures (labels ``IGNORE`` outside what a row is judged on)."""

    forget: Batch  # D_f: X_f with the forgotten tasks' labels
    kept: Batch  # D_r^task: X_f with the kept tasks' labels (empty for a full-task request)
    retained: Batch  # retained instances with every label (grouped by client via ``subset``)
    heldout: Batch  # unseen population


def _outputs(model: nn.Module, batch: Batch, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """``model``'s outputs on ``batch``, forwarded where the model is, returned on the CPU (where the
    batch's labels are: the checks' metrics are a few thousand rows)."""
    outs: list[dict[str, torch.Tensor]] = []
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for part in batch.split(batch_size):
                outs.append({k: v.detach().cpu() for k, v in model(part.to(device).inputs).items()})
    finally:
        model.train(was_training)
    if not outs:
        return {}
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


@dataclass(frozen=True)
class _Scores:
    """Per-task metric and supervised count of one model on one batch (optionally a row subset)."""

    out: dict[str, torch.Tensor]
    batch: Batch

    def metric(self, task: TaskSpec, rows: torch.Tensor | None = None) -> tuple[float, int]:
        y = self.batch.labels.get(task.name)
        if y is None or len(self.batch) == 0:
            return float("nan"), 0
        out = self.out[task.name]
        if rows is not None:
            y, out = y[rows], out[rows]
        n = int(task.supervised(y).sum())
        return (task.metric(out, y) if n else float("nan")), n

    def paired_standard_error(self, after: _Scores, task: TaskSpec) -> float | None:
        """:func:`paired_standard_error` of ``task``'s per-sample metric from this model to ``after``
        on the same batch (``None``: a task without ``per_sample_metric``, or no labels)."""
        y = self.batch.labels.get(task.name)
        per_sample = getattr(task, "per_sample_metric", None)
        if y is None or per_sample is None or len(self.batch) == 0:
            return None
        rows = task.supervised(y)
        return paired_standard_error(
            per_sample(self.out[task.name], y)[rows], per_sample(after.out[task.name], y)[rows]
        )

    def standard_error(self, task: TaskSpec) -> float | None:
        """:func:`metric_standard_error` of ``task`` here (``None``: a proportion, or no labels)."""
        y = self.batch.labels.get(task.name)
        if y is None or len(self.batch) == 0:
            return None
        return metric_standard_error(task, self.out[task.name], y)


def _scores(model: nn.Module, batch: Batch) -> _Scores:
    return _Scores(_outputs(model, batch), batch)


def check(
    before: nn.Module,
    after: nn.Module,
    groups: Groups,
    tasks: Sequence[TaskSpec],
    forget_tasks: Sequence[str],
    cfg: AcceptanceConfig,
    *,
    original_val: Mapping[str, float] | None = None,
    client_names: Mapping[int, str] | None = None,
    before_outputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    allowance: Callable[[], Mapping[str, float]] | None = None,
) -> list[Check]:
    """Every check of one request (see the module doc). ``original_val``: the original version's
    held-out metric per task (``RoundState.original_val``); ``client_names``: subset index → client
    id, for the checks' labels. ``before_outputs``: ``before``'s outputs on some of the groups
    (``"forget"``, ``"kept"``, ``"heldout"``; rows aligned with the group's), already computed by
    the caller: those groups are not forwarded through ``before`` again. ``allowance``: per
    forgotten task, how much a failed forget bound may be raised (``cfg.reference_allowance``);
    called only when a forget check fails without it."""
    names = dict(client_names or {})
    reused = dict(before_outputs or {})
    sb, sa = {}, {}
    for key, batch in (("forget", groups.forget), ("kept", groups.kept), ("heldout", groups.heldout)):
        given = reused.get(key)
        if given is not None and any(int(v.shape[0]) != len(batch) for v in given.values()):
            raise ValueError(f"before_outputs[{key!r}] has not one row per row of the group")
        reused_outputs = None if given is None else {k: v.cpu() for k, v in given.items()}
        sb[key] = _scores(before, batch) if reused_outputs is None else _Scores(reused_outputs, batch)
        sa[key] = _scores(after, batch)
    out: list[Check] = []
    original = dict(original_val or {})
    for task in tasks:
        if task.name not in forget_tasks:
            continue
        (acc_b, n), (acc_a, _) = sb["forget"].metric(task), sa["forget"].metric(task)
        val_a, n_unseen = sa["heldout"].metric(task)
        known = [v for v in (original.get(task.name, math.nan), val_a) if not math.isnan(v)]
        unseen = min(known, default=math.nan)
        what = f"{FORGET_BOUND}{task.name}"
        se = sa["forget"].standard_error(task)
        unseen_se = None
        if cfg.unseen_noise:
            own = sa["heldout"].standard_error(task)
            unseen_se = level_standard_error(unseen, n_unseen, cfg.forget_z, own)
        c = forget_check(what, acc_b, acc_a, n, unseen, cfg.forget_z, se=se, unseen_se=unseen_se)
        if not c.ok and not nothing_to_show(c) and allowance is not None and cfg.reference_allowance:
            raised = float(allowance().get(task.name, 0.0))
            if raised > 0:
                c = forget_check(
                    what, acc_b, acc_a, n, unseen, cfg.forget_z, allowance=raised, se=se, unseen_se=unseen_se
                )
        if not c.ok and nothing_to_show(c):
            c = Check(c.what, True, c.detail, margin=c.margin)  # nothing memorised: nothing to forget
        out.append(c)
    for task in tasks:
        if task.name in forget_tasks:
            continue
        (acc_b, n), (acc_a, _) = sb["kept"].metric(task), sa["kept"].metric(task)
        if n:
            what = f"kept: request's samples, {task.name}"
            out.append(kept_check(what, acc_b, acc_a, n, cfg.kept_tolerance, cfg.forget_z))
    if cfg.retained_clients and len(groups.retained):
        rb, ra = _scores(before, groups.retained), _scores(after, groups.retained)
        for index in sorted({int(i) for i in groups.retained.subset.tolist()}):
            rows = groups.retained.subset == index
            label = names.get(index, f"client #{index}") if index != IGNORE else "no client"
            for task in tasks:
                (acc_b, n), (acc_a, _) = rb.metric(task, rows), ra.metric(task, rows)
                if n:
                    what = f"kept: retained {label}, {task.name}"
                    out.append(kept_check(what, acc_b, acc_a, n, cfg.kept_tolerance, cfg.forget_z))
    for task in tasks:
        (val_b, n), (val_a, _) = sb["heldout"].metric(task), sa["heldout"].metric(task)
        if not n:
            continue
        floor = max(v for v in (val_b, original.get(task.name, -math.inf)) if not math.isnan(v))
        # the noise of the change from the round input (the original's outputs are not at hand:
        # this is the same rows' noise between two trained models of the same recipe)
        se = sb["heldout"].paired_standard_error(sa["heldout"], task)
        out.append(heldout_check(task.name, floor, val_a, cfg.heldout_tolerance, cfg.forget_z, se, n))
    return out
