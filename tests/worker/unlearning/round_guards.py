"""What the reference tests share: a guard that makes every way of training a retrain or a
reference fail (the request path must never take one), and a one-client round on a prepared toy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import worker.unlearning.engine as engine
import worker.unlearning.reference_adapters as reference_adapters
from worker.unlearning.engine import ForgetSpec, run_round
from worker.unlearning.workload import Workload

# the engine's names of every path that trains a model (a retrain, a reference, its references)
TRAINING_PATHS = ("compute_reference", "reference_retrain", "retrain", "train_references")


def forbid_training(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...] = TRAINING_PATHS) -> None:
    """Make ``engine.<name>`` for each of ``names``, and the references' own training, raise."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the request path trained a retrain or a reference")

    for name in names:
        monkeypatch.setattr(engine, name, forbidden)
    monkeypatch.setattr(reference_adapters, "train_v1", forbidden)


def one_client_round(
    wl: Workload,
    root: Path,
    settings: dict[str, Any],
    *,
    client: str,
    method: str,
    refs: Path | None,
    out: str,
) -> dict[str, Any]:
    """The evidence of request ``r1`` (forget ``client``) in a round on the v1 prepared under ``root``
    (``data``, ``base``, ``v1``), published to ``root / out``."""
    outcome = run_round(
        wl, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1", adapter_out=root / out,
        requests=[ForgetSpec("r1", "client", client, None, [])], method=method, settings=settings, seed=0,
        references_dir=refs,
    )  # fmt: skip
    return dict(outcome.evidence["r1"])
