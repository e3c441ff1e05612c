"""One round of the default method on ``digits-clients`` (client c3, seeds 0–2, the workload's
default settings): a client request moves the forget set towards the retrain reference while Val and
Ret stay within stated tolerances; a partial-task request keeps the retained task.

Margins, measured on seeds 0–4 (2026-11-23, after the retain-preserving defaults of
docs/methods.md):

- client request: the method closed 0.78–1.0 of the original→retrain gap in ``digit`` Unl
  accuracy (``orientation``: 0.15–1.0, weakest on seeds 0 and 1 — not asserted); Ret fell at most
  0.08 below min(original, retrain) (seed 3, ``digit``; before those defaults the demo showed
  −0.115), Val at most 0.02;
- partial-task request on ``orientation``: the kept ``digit`` task on c3's samples stayed at or above
  min(original, retrain) on every seed; Ret at most 0.05 below; Val at most 0.02 below on seeds
  0–3, but 0.13 below on seed 4 (``orientation``) — a finding, reported, outside the tested seeds.
  Forgetting ``orientation`` for c3 is weak on seeds 0–2 (Unl 0.89–0.91 against the retrain's
  0.27–0.41; docs/benchmarks.md), so it is not asserted here.

Tolerances are one-sided (a rise is no harm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import ForgetSpec, ensure_base, prepare, run_round
from worker.unlearning.workload import Workload, load_workload

METHOD = "default"
CLIENT = "c3"
MIN_CLOSED = 0.5  # fraction of the original→retrain Unl-accuracy gap the method must close
VAL_TOLERANCE = 0.08  # Val(method) ≥ min(Val(original), Val(retrain)) − VAL_TOLERANCE, every task
RET_TOLERANCE = 0.10  # Ret(method) ≥ min(Ret(original), Ret(retrain)) − RET_TOLERANCE, every task
KEPT_TOLERANCE = 0.05  # a retained task's accuracy on the client's samples, same form


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workload, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("digits")
    workload = load_workload("digits-clients")
    DataStore.materialise(root / "data", workload)
    ensure_base(workload, root / "base", workload.settings(), seed=0)
    return workload, root


def _round(digits: tuple[Workload, Path], seed: int, spec: ForgetSpec) -> dict[str, Any]:
    workload, root = digits
    v1 = root / f"v1-{seed}"
    if not v1.exists():
        prepare(
            workload, data_dir=root / "data", base_dir=root / "base", adapter_dir=v1, settings={}, seed=seed,
            cache_dir=root / "cache",
        )  # fmt: skip
    outcome = run_round(
        workload,
        data_dir=root / "data",
        base_dir=root / "base",
        adapter_in=v1,
        adapter_out=root / f"v2-{seed}-{spec.request_id}",
        requests=[spec],
        method=METHOD,
        settings={},
        seed=seed,
        cache_dir=root / "cache",
    )
    evidence: dict[str, Any] = outcome.evidence[spec.request_id]
    assert evidence["reference"] == "retrain"
    assert evidence["uis"]["value"] is not None
    return evidence


def _assert_within(ev: dict[str, Any], split: str, tolerance: float, tasks: tuple[str, ...]) -> None:
    method, original, reference = ev["tasks"], ev["original_metrics"], ev["reference_metrics"]
    for task in tasks:
        floor = min(original[task][split], reference[task][split]) - tolerance
        assert method[task][split] >= floor, (split, task, method[task], original[task], reference[task])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_client_round_moves_forget_set_towards_retrain(digits: tuple[Workload, Path], seed: int) -> None:
    ev = _round(digits, seed, ForgetSpec("r1", "client", CLIENT, None, []))
    method, original, reference = ev["tasks"], ev["original_metrics"], ev["reference_metrics"]
    gap_before = abs(original["digit"]["unl"] - reference["digit"]["unl"])
    gap_after = abs(method["digit"]["unl"] - reference["digit"]["unl"])
    assert gap_before >= 0.10  # the workload is measurable on this client
    assert gap_after <= (1 - MIN_CLOSED) * gap_before, (gap_before, gap_after)
    _assert_within(ev, "val", VAL_TOLERANCE, ("digit", "orientation"))
    _assert_within(ev, "ret", RET_TOLERANCE, ("digit", "orientation"))
    assert ev["pruned_subset_outputs"] == [3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_task_round_keeps_the_retained_task(digits: tuple[Workload, Path], seed: int) -> None:
    ev = _round(digits, seed, ForgetSpec("r2", "task", CLIENT, None, ["orientation"]))
    assert ev["forget_tasks"] == ["orientation"]
    _assert_within(ev, "unl", KEPT_TOLERANCE, ("digit",))  # digit on c3's samples: kept, not forgotten
    _assert_within(ev, "val", VAL_TOLERANCE, ("digit", "orientation"))
    _assert_within(ev, "ret", RET_TOLERANCE, ("digit", "orientation"))
