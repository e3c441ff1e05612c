"""What the reference tests share: a guard that makes every way of training a retrain or a
reference fail (the request path must never take one), and a one-client round on a prepared toy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import worker.unlearning.engine as engine
import worker.unlearning.reference_adapters as reference_adapters
from worker.unlearning.engine import ForgetSpec, prepare, run_round
from worker.unlearning.workload import Workload
from worker.unlearning.workloads.toy import ToyWorkload

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


def prepared_toy(root: Path, settings: dict[str, Any]) -> ToyWorkload:
    """A toy of 4 clients × 10 samples prepared under ``root`` (``data``, ``base``, ``v1``) with its
    reference adapters in ``root / "refs"``."""
    wl = ToyWorkload(0, num_clients=4, per_client=10)
    prepare(wl, data_dir=root / "data", base_dir=root / "base", adapter_dir=root / "v1", settings=settings,
            seed=0, references_dir=root / "refs")  # fmt: skip
    return wl


def ia_info_of_round(
    wl: Workload, root: Path, settings: dict[str, Any], *, refs: Path | None, out: str
) -> dict[str, Any]:
    """``default``'s interference-aware evidence (``method_info["ia"]``) of a round forgetting client
    ``u2`` on the toy prepared under ``root``."""
    evidence = one_client_round(wl, root, settings, client="u2", method="default", refs=refs, out=out)
    return dict(evidence["method_info"]["ia"])
