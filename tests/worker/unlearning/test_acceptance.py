"""The acceptance check (worker/unlearning/acceptance.py) on models whose predictions are set by hand:
each check passes exactly when its promise holds, and fails when it is broken."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pytest
import torch
from torch import Tensor, nn

from worker.unlearning.acceptance import (
    AcceptanceConfig,
    Check,
    Groups,
    check,
    heldout_check,
    paired_standard_error,
)
from worker.unlearning.types import IGNORE, Batch, ClassificationTask

TASKS = [ClassificationTask("a", 4), ClassificationTask("b", 4)]


class Predicts(nn.Module):
    """Predicts, for task ``t``, the class written in input column ``column[t]``."""

    def __init__(self, columns: dict[str, int]) -> None:
        super().__init__()
        self.columns = columns

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x = inputs["x"]
        return {t: 10.0 * nn.functional.one_hot(x[:, c].long(), 4).float() for t, c in self.columns.items()}


def rows(n: int, client: int, a: int | None, b: int | None, correct: float, wrong_col: float = 1.0) -> Batch:
    """``n`` rows whose labels are 0; column 0 is the label for a model that is right on them, column
    1 holds a wrong class (or the label, for a fraction ``correct`` of them)."""
    x = torch.zeros(n, 2)
    right = round(correct * n)
    x[right:, 1] = wrong_col  # rows after `right` are wrong when read from column 1
    labels = {
        "a": torch.full((n,), IGNORE if a is None else a, dtype=torch.long),
        "b": torch.full((n,), IGNORE if b is None else b, dtype=torch.long),
    }
    return Batch(inputs={"x": x}, labels=labels, subset=torch.full((n,), client, dtype=torch.long))


RIGHT = Predicts({"a": 0, "b": 0})  # right on every row


def heldout_at(accuracy: float) -> Batch:
    return rows(200, IGNORE, 0, 0, accuracy)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.what: c for c in checks}


def run(after: nn.Module, groups: Groups, forget_tasks: list[str], **kw: float) -> dict[str, Check]:
    return by_name(check(RIGHT, after, groups, TASKS, forget_tasks, AcceptanceConfig(**kw)))  # type: ignore[arg-type]


def test_a_forget_set_at_the_unseen_level_passes_and_a_recognisable_one_fails() -> None:
    # after: reads column 1 for every task, right on 60 % of each group
    after = Predicts({"a": 1, "b": 1})
    empty = rows(0, 0, None, None, 1.0)
    forget = rows(50, 1, 0, 0, 0.6)
    groups = Groups(forget=forget, kept=empty, retained=empty, heldout=heldout_at(0.6))
    result = run(after, groups, ["a", "b"], retained_clients=False, heldout_tolerance=1.0)
    assert result["forgotten: forget set, a"].ok
    # the same forget set, now 90 % right after the update: still recognisable
    groups = Groups(forget=rows(50, 1, 0, 0, 0.9), kept=empty, retained=empty, heldout=heldout_at(0.6))
    result = run(after, groups, ["a", "b"], retained_clients=False, heldout_tolerance=1.0)
    assert not result["forgotten: forget set, a"].ok

    # Agresti–Coull with z = 2, over the forget set's 50 rows and the held-out split's 200: the bound
    # is 2 standard errors of the difference of the two proportions
    def se(n: int) -> float:
        p_tilde = (0.6 * n + 2) / (n + 4)
        return math.sqrt(p_tilde * (1 - p_tilde) / (n + 4))

    bound = 0.6 + 2 * math.hypot(se(50), se(200))
    assert result["forgotten: forget set, a"].margin == pytest.approx(bound - 0.9)


def test_the_forget_bound_counts_the_unseen_level_s_own_noise() -> None:
    """The unseen-data level is measured on a sample too: the bound is two standard errors of the
    difference of the two proportions (``unseen_noise``); without it, of the forget set's alone. A
    forget set between the two bounds passes the first and fails the second; one well above both
    fails either way."""
    after = Predicts({"a": 1, "b": 1})
    empty = rows(0, 0, None, None, 1.0)
    # 400 forget rows, 400 held-out rows at 0.6: one-sample bound ≈ 0.649, two-sample ≈ 0.669
    for correct, two_sample, one_sample in ((0.66, True, False), (0.70, False, False), (0.62, True, True)):
        groups = Groups(forget=rows(400, 1, 0, 0, correct), kept=empty, retained=empty,
                        heldout=rows(400, IGNORE, 0, 0, 0.6))  # fmt: skip
        with_noise = run(after, groups, ["a"], retained_clients=False, heldout_tolerance=1.0)
        exact = run(after, groups, ["a"], retained_clients=False, heldout_tolerance=1.0, unseen_noise=False)
        assert with_noise["forgotten: forget set, a"].ok is two_sample, correct
        assert exact["forgotten: forget set, a"].ok is one_sample, correct
        assert "SE of the difference" in with_noise["forgotten: forget set, a"].detail
        assert "SE of the difference" not in exact["forgotten: forget set, a"].detail


def test_kept_tasks_retained_clients_and_heldout_are_checked_against_the_old_version() -> None:
    after = Predicts({"a": 1, "b": 0})  # a: right on the rows' fraction; b: always right
    kept = rows(40, 1, None, 0, 1.0)  # task b kept on X_f: stays right
    client2 = rows(100, 2, 0, 0, 0.5)  # task a falls from 1.0 to 0.5 on client 2
    client3 = rows(100, 3, 0, 0, 1.0)
    both = Batch(
        inputs={"x": torch.cat([client2.inputs["x"], client3.inputs["x"]])},
        labels={t: torch.cat([client2.labels[t], client3.labels[t]]) for t in ("a", "b")},
        subset=torch.cat([client2.subset, client3.subset]),
    )
    groups = Groups(forget=rows(10, 1, 0, None, 0.0), kept=kept, retained=both, heldout=heldout_at(1.0))
    result = run(after, groups, ["a"], retained_clients=True)
    assert result["kept: request's samples, b"].ok
    assert not result["kept: retained client #2, a"].ok
    assert result["kept: retained client #3, a"].ok
    assert result["kept: retained client #2, b"].ok
    assert result["held-out accuracy kept: a"].ok  # held-out rows are right from column 1 too
    groups = Groups(forget=rows(10, 1, 0, None, 0.0), kept=kept, retained=both, heldout=heldout_at(0.9))
    result = run(after, groups, ["a"], retained_clients=True)
    assert not result["held-out accuracy kept: a"].ok  # 1.0 → 0.9: a drop of 10 points > 5


def test_heldout_is_kept_against_the_original_version_too() -> None:
    """A sequence of requests cannot drift: the floor is the better of the old and the original."""
    after = Predicts({"a": 1, "b": 1})
    empty = rows(0, 0, None, None, 1.0)
    groups = Groups(forget=rows(10, 1, 0, 0, 0.0), kept=empty, retained=empty, heldout=heldout_at(0.8))
    before_is_the_floor = by_name(
        check(Predicts({"a": 1, "b": 1}), after, groups, TASKS, ["a", "b"], AcceptanceConfig())
    )
    assert before_is_the_floor["held-out accuracy kept: a"].ok  # no change against the old version
    with_original = by_name(
        check(
            Predicts({"a": 1, "b": 1}), after, groups, TASKS, ["a", "b"], AcceptanceConfig(),
            original_val={"a": 0.9, "b": 0.8},
        )
    )  # fmt: skip
    assert not with_original["held-out accuracy kept: a"].ok  # 10 points under the original
    assert with_original["held-out accuracy kept: b"].ok


def test_nothing_memorised_is_nothing_to_forget() -> None:
    """A forget set the old version was no better on than on unseen data has nothing to show: it
    passes (the demo, which wants to show a fall, says so instead)."""
    same = Predicts({"a": 1, "b": 1})
    empty = rows(0, 0, None, None, 1.0)
    groups = Groups(forget=rows(50, 1, 0, None, 0.5), kept=empty, retained=empty, heldout=heldout_at(0.9))
    result = by_name(check(same, same, groups, TASKS, ["a"], AcceptanceConfig(retained_clients=False)))
    assert result["forgotten: forget set, a"].ok
    assert "not memorised" in result["forgotten: forget set, a"].detail


def test_config_rejects_unknown_fallback_and_keys() -> None:
    with pytest.raises(ValueError, match="fallback"):
        AcceptanceConfig.from_settings({"fallback": "hope"})
    with pytest.raises(ValueError, match="unknown acceptance setting"):
        AcceptanceConfig.from_settings({"z": 1})
    assert AcceptanceConfig.from_settings(None) == AcceptanceConfig()


def test_a_failed_forget_bound_is_read_again_with_the_references_allowance() -> None:
    """Defect: on a client whose data any model finds easier (scenes c00's ``position_x``: models
    that never saw it score 0.005–0.008 better there than on unseen data), the forget bound was the
    unseen level alone, so even the exact retrain failed it and every such request paid a fallback
    retrain that failed too. The bound may now rise by the references' positive gap, asked for only
    when a forget bound fails, and never lowered by a negative one."""
    after = Predicts({"a": 1, "b": 1})
    empty = rows(0, 0, None, None, 1.0)
    # 80 % right on the forget set after the update, 60 % on unseen data: fails the plain bound
    groups = Groups(forget=rows(50, 1, 0, 0, 0.8), kept=empty, retained=empty, heldout=heldout_at(0.6))
    calls: list[int] = []

    def allowance(gap: dict[str, float]) -> Callable[[], Mapping[str, float]]:
        def read() -> Mapping[str, float]:
            calls.append(1)
            return gap

        return read

    def judged(gap: dict[str, float], **kw: object) -> dict[str, Check]:
        cfg = AcceptanceConfig(retained_clients=False, heldout_tolerance=1.0, **kw)  # type: ignore[arg-type]
        return by_name(check(RIGHT, after, groups, TASKS, ["a"], cfg, allowance=allowance(gap)))

    plain = judged({})["forgotten: forget set, a"]
    assert not plain.ok
    raised = judged({"a": 0.2})["forgotten: forget set, a"]  # the references do 20 points better there
    assert raised.ok
    assert raised.margin == pytest.approx(plain.margin + 0.2)
    assert "references that never saw it" in raised.detail
    assert not judged({"a": 0.02})["forgotten: forget set, a"].ok  # not enough: still recognisable
    assert not judged({"a": -0.3})["forgotten: forget set, a"].ok  # a negative gap never lowers it
    calls.clear()
    assert not judged({"a": 0.25}, reference_allowance=False)["forgotten: forget set, a"].ok
    assert calls == []  # switched off: never asked
    # a forget set at the unseen level passes without asking the references
    groups = Groups(forget=rows(50, 1, 0, 0, 0.6), kept=empty, retained=empty, heldout=heldout_at(0.6))
    assert judged({"a": 0.25})["forgotten: forget set, a"].ok
    assert calls == []


class Outputs(nn.Module):
    """Outputs input column 0 as task ``r``'s prediction."""

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"r": inputs["x"][:, :1]}


def _regression_rows(errors: Tensor, client: int) -> Batch:
    n = int(errors.numel())
    return Batch(
        inputs={"x": errors.reshape(n, 1)},  # prediction = error, label 0
        labels={"r": torch.zeros(n)},
        subset=torch.full((n,), client, dtype=torch.long),
    )


def test_a_regression_forget_bound_uses_the_metric_s_own_standard_error() -> None:
    """Defect: the forget bound's noise term was a proportion's standard error for every task; for
    a regression's −MAE (about −0.09 on scenes) that is a proportion at 0, ≈ 0.001 over 1,500
    samples, where the metric's own sampling error is a few times larger, so a forget set
    within noise of the unseen level failed (scenes c00's `position_x`, and the exact retrain with
    it). The noise term is now the metric's standard error (absolute errors' spread / √n)."""
    from worker.unlearning.types import RegressionTask

    task = RegressionTask("r")
    gen = torch.Generator().manual_seed(0)
    n = 1500
    errors = torch.rand(n, generator=gen) * 0.4  # |error| uniform on [0, 0.4]: MAE ≈ 0.2
    se = task.metric_standard_error(errors[:, None], torch.zeros(n))
    assert se == pytest.approx(float(errors.std()) / math.sqrt(n))
    empty = Batch(
        inputs={"x": torch.zeros(0, 1)}, labels={"r": torch.zeros(0)}, subset=torch.zeros(0, dtype=torch.long)
    )
    heldout = _regression_rows(errors, IGNORE)  # unseen level: −mean(errors)
    cfg = AcceptanceConfig(retained_clients=False, heldout_tolerance=1.0)

    def forget_after(shift: float) -> Check:
        """The check of a forget set that was memorised before (errors halved) and, after the
        update, has the unseen errors less ``shift`` (both models output their errors as given)."""
        after_rows = _regression_rows((errors - shift).clamp_min(0), 1)
        groups = Groups(forget=after_rows, kept=empty, retained=empty, heldout=heldout)
        before = {"forget": {"r": (errors * 0.5)[:, None]}}
        checks = check(Outputs(), Outputs(), groups, [task], ["r"], cfg, before_outputs=before)
        return by_name(checks)["forgotten: forget set, r"]

    within_noise = forget_after(1.5 * se)  # 1.5 standard errors better than unseen data: noise
    assert within_noise.ok
    assert "2 SE" in within_noise.detail
    assert not forget_after(0.03).ok  # 0.03 of MAE better than unseen: still recognisable


def test_paired_standard_error_is_the_spread_of_per_row_changes() -> None:
    before = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 1])
    after = torch.tensor([1.0, 0, 1, 0, 0, 0, 1, 1])
    diff = after - before
    assert paired_standard_error(before, after) == pytest.approx(float(diff.std()) / math.sqrt(8))
    assert paired_standard_error(before, before) == 0.0  # the same predictions: no noise in the change
    assert math.isnan(paired_standard_error(before[:1], after[:1]))


def test_heldout_check_allows_the_tolerance_plus_z_standard_errors_of_the_paired_change() -> None:
    allowed = 0.05 + 2 * 0.02
    assert heldout_check("t", 0.70, 0.70 - allowed + 0.001, 0.05, 2.0, se=0.02, n=400).ok
    failed = heldout_check("t", 0.70, 0.70 - allowed - 0.001, 0.05, 2.0, se=0.02, n=400)
    assert not failed.ok
    assert "9.0 = 5 + 2 SE of the paired change, n=400" in failed.detail
    assert failed.margin == pytest.approx(-0.001)
    # without a standard error (a task type with no per-sample metric): the tolerance alone
    assert not heldout_check("t", 0.70, 0.70 - 0.051, 0.05, 2.0, se=None).ok
    assert not heldout_check("t", 0.70, 0.70 - 0.051, 0.05, 2.0, se=float("nan")).ok


def test_a_heldout_change_within_the_noise_of_two_trained_models_passes() -> None:
    """Defect: the held-out bound was 5 points flat. On digits-clients' 449 held-out rows an exact
    retrain from another seed lands up to 9 points under v1 (two noisy models disagree on a third of
    the rows), so the bound failed the exact answer: the demo's checks failed 5 of 10 draws on the
    AVX2 path, each after a fallback whose retrain failed too. The bound now adds z standard errors
    of the paired change. A model that disagrees with the old one on many rows and lands 7 points
    under it is within that noise; one that is 8 points worse only where it changed (few changed
    rows, little noise: 7.7 points allowed) is not, nor is a 15-point drop."""
    n = 400
    empty = rows(0, 0, None, None, 1.0)
    label = torch.zeros(n, dtype=torch.long)
    # before: right on the first 260 rows (0.65); after: right on rows 80–311 (0.58), so the two
    # disagree on 132 rows: the change's SE is ≈ 0.028 and the allowed drop ≈ 10.6 points
    x = torch.ones(n, 2)
    x[:260, 0] = 0
    x[80:312, 1] = 0
    heldout = Batch(inputs={"x": x}, labels={"a": label, "b": label}, subset=torch.full((n,), IGNORE))
    groups = Groups(forget=rows(10, 1, 0, 0, 0.0), kept=empty, retained=empty, heldout=heldout)
    before, after = Predicts({"a": 0, "b": 0}), Predicts({"a": 1, "b": 0})
    noisy = by_name(check(before, after, groups, TASKS, ["a", "b"], AcceptanceConfig()))
    assert noisy["held-out accuracy kept: a"].ok, noisy["held-out accuracy kept: a"].detail
    assert "SE of the paired change, n=400" in noisy["held-out accuracy kept: a"].detail
    # after is right only where before was, on 228 of them: 8 points down, 32 changed rows
    x[:, 1] = 1
    x[:228, 1] = 0
    narrow = by_name(check(before, after, groups, TASKS, ["a", "b"], AcceptanceConfig()))
    assert not narrow["held-out accuracy kept: a"].ok, narrow["held-out accuracy kept: a"].detail
    x[:, 1] = 1
    x[60:260, 1] = 0  # right on 200 of before's 260 and nowhere else: 15 points down
    assert not by_name(check(before, after, groups, TASKS, ["a", "b"], AcceptanceConfig()))[
        "held-out accuracy kept: a"
    ].ok
