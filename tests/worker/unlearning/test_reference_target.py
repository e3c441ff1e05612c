"""Issue 8 part 1: early stopping's per-client target from the reference adapters that never saw
the client (``ia.target: "references"``), its fallback, and the refresh of references dropped
when clients are forgotten. No retrain of the request is read anywhere."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import worker.unlearning.engine as engine
import worker.unlearning.reference_adapters as reference_adapters
from worker.unlearning.engine import ForgetSpec, ensure_base, prepare, run_round
from worker.unlearning.interference import IAConfig
from worker.unlearning.interference.checkpoints import select_checkpoint
from worker.unlearning.interference.targets import ReferenceTarget, reference_distance, request_target
from worker.unlearning.likelihood_ratio import out_reference_targets
from worker.unlearning.reference_adapters import (
    LoadedReferences,
    assign_halves,
    drop_references_with,
    load_references,
    read_references,
    refresh_references,
    train_references,
)
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import Batch
from worker.unlearning.workloads.toy import ToyWorkload

FAST = TrainConfig(epochs=2, main_only_epochs=1, batch_size=32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(root: Path, k: int, clients: int = 4) -> tuple[ToyWorkload, Any, Batch, LoadedReferences]:
    wl = ToyWorkload(0, num_clients=clients, per_client=10)
    base = ensure_base(wl, root / "base", wl.settings({}), 0)
    ci = wl.client_index()
    data = wl.client_data().to_batch(ci)
    train_references(base, data, wl.tasks(), FAST, client_index=ci, k=k, seed=3, directory=root / "refs",
                     workload="toy")  # fmt: skip
    loaded = load_references(base, root / "refs")
    assert loaded is not None
    return wl, base, data, loaded


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "lora" in name or "heads" in name:
                p.add_(torch.randn_like(p) * 3.0)
    return out


def test_the_target_is_read_from_out_references_only(tmp_path: Path) -> None:
    """The target of client u0's forget set is the median over the references whose half excluded
    u0: changing a reference trained on u0 (IN) leaves it unchanged to the last bit, changing an OUT
    one moves it; per reference its MIA AUC, accuracy and gap to its own held-out accuracy are kept,
    with the median and the spread. (Would fail if an IN reference contributed.)"""
    wl, _, data, loaded = _toy(tmp_path, k=4)
    ci = wl.client_index()
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    unseen = wl.heldout_data().to_batch(ci)

    def target(refs: LoadedReferences) -> dict[str, Any]:
        return out_reference_targets(refs, wl.tasks(), forget=forget, unseen=unseen,
                                     forget_tasks=["kind", "side"], client_index=ci)  # fmt: skip

    first = target(loaded)
    members = list(loaded.refs.members.items())
    inside = [row for row, (_, m) in enumerate(members) if "u0" in m]
    outside = [row for row, (_, m) in enumerate(members) if "u0" not in m]
    assert len(inside) == len(outside) == 2
    for task in ("kind", "side"):
        got = first[task]
        assert sorted(v["reference"] for v in got["per_reference"]) == sorted(members[r][0] for r in outside)
        aucs = [v["mia_auc"] for v in got["per_reference"]]
        assert got["mia_auc"] == pytest.approx(statistics.median(aucs))
        assert got["spread"]["mia_auc"] == pytest.approx(max(aucs) - min(aucs))
        for v in got["per_reference"]:
            assert v["accuracy_gap"] == pytest.approx(v["accuracy"] - v["unseen_accuracy"])
            assert v["n_forget"] == 10
    models = list(loaded.models)
    for r in inside:
        models[r] = _perturbed(models[r])
    assert target(LoadedReferences(refs=loaded.refs, models=models)) == first
    models = list(loaded.models)
    models[outside[0]] = _perturbed(models[outside[0]])
    moved = target(LoadedReferences(refs=loaded.refs, models=models))
    assert any(moved[t]["per_reference"] != first[t]["per_reference"] for t in ("kind", "side"))


def test_request_target_falls_back_to_the_constant_by_name(tmp_path: Path) -> None:
    """``ia.target: "constant"`` never reads references; ``"references"`` without any (or without an
    OUT reference for the client) falls back to the constant and says why in the evidence."""
    wl, _, data, loaded = _toy(tmp_path, k=2)
    ci = wl.client_index()
    forget = data.select((data.subset == 1).nonzero().reshape(-1))
    unseen = wl.heldout_data().to_batch(ci)
    kwargs: dict[str, Any] = {
        "forget": forget,
        "heldout": unseen,
        "forget_tasks": ["kind"],
        "client_index": ci,
    }
    none, ev = request_target(IAConfig(), loaded, wl.tasks(), **kwargs)
    assert none is None
    assert ev == {"source": "constant", "mia_auc": 0.5}
    cfg = IAConfig(target="references")
    target, ev = request_target(cfg, loaded, wl.tasks(), **kwargs)
    assert target is not None
    assert ev["source"] == "references"
    assert set(target.mia_auc) == {"kind"}
    assert ev["tasks"]["kind"]["references"] == 1  # K = 2: one reference excluded u1
    assert ev["wall_s"] > 0
    fallback, ev = request_target(cfg, None, wl.tasks(), **kwargs)
    assert fallback is None
    assert (ev["source"], ev["requested"]) == ("constant", "references")
    assert "no reference adapters" in ev["reason"]
    pairs = zip(loaded.models, loaded.refs.members.values(), strict=True)
    only_in = LoadedReferences(refs=copy.deepcopy(loaded.refs), models=[m for m, c in pairs if "u1" in c])
    only_in.refs.members = {i: m for i, m in loaded.refs.members.items() if "u1" in m}
    fallback, ev = request_target(cfg, only_in, wl.tasks(), **kwargs)
    assert fallback is None
    assert "no OUT reference" in ev["reason"]


def test_early_stopping_keeps_the_checkpoint_closest_to_the_reference_target() -> None:
    """Distance to a reference target: per task the larger of the AUC and accuracy gaps (both must
    be close), tasks by mean or max; with ``relative`` the accuracy goal is the checkpoint's own
    held-out accuracy + the references' gap. The kept checkpoint is the closest one."""
    target = ReferenceTarget(mia_auc={"a": 0.3, "b": 0.4}, accuracy={"a": 0.2, "b": 0.5},
                             accuracy_gap={"a": -0.3, "b": -0.1})  # fmt: skip
    aucs, accs = {"a": 0.35, "b": 0.4}, {"a": 0.4, "b": 0.5}
    assert reference_distance(aucs, accs, target) == pytest.approx((0.2 + 0.0) / 2)
    assert reference_distance(aucs, accs, target, "max") == pytest.approx(0.2)
    rel = ReferenceTarget(target.mia_auc, target.accuracy, target.accuracy_gap, relative=True)
    heldout = {"a": 0.6, "b": 0.6}
    # goals: a 0.3, b 0.5 → gaps a max(0.05, 0.1), b max(0, 0)
    assert reference_distance(aucs, accs, rel, "mean", heldout) == pytest.approx(0.05)
    assert reference_distance({}, {}, target) is None
    history = [
        {"retain_drop": 0.0, "distance": 0.30, "forget_excess": 0.1},
        {"retain_drop": 0.0, "distance": 0.05, "forget_excess": -0.1},
        {"retain_drop": 0.0, "distance": 0.02, "forget_excess": -0.2},
        {"retain_drop": 0.0, "distance": 0.10, "forget_excess": -0.3},
    ]
    assert select_checkpoint(history, 0.05, "closest") == 2
    assert select_checkpoint(history, 0.05, "earliest") == 1  # why "references" keeps the closest


TOY: dict[str, dict[str, Any]] = {
    "audit": {"reference_adapters": 4, "bootstrap": 0},
    "acceptance": {"fallback": "none"},
    "ia": {"target": "references", "epochs": 2},
}


def test_a_round_aims_at_the_out_references_and_never_trains_or_reads_a_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round of ``default`` with ``ia.target: "references"`` reads the prepared references (only
    those that never saw the forgotten client) as its early-stopping target, with every way to
    train a retrain or a reference made to fail; without references it records the named fallback."""
    wl = ToyWorkload(0, num_clients=4, per_client=10)
    prepare(wl, data_dir=tmp_path / "data", base_dir=tmp_path / "base", adapter_dir=tmp_path / "v1",
            settings=TOY, seed=0, references_dir=tmp_path / "refs")  # fmt: skip

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the request path trained a retrain or a reference")

    for name in ("compute_reference", "reference_retrain", "retrain", "train_references"):
        monkeypatch.setattr(engine, name, forbidden)
    monkeypatch.setattr(reference_adapters, "train_v1", forbidden)

    def round_(refs: Path | None, out: str) -> dict[str, Any]:
        outcome = run_round(
            wl, data_dir=tmp_path / "data", base_dir=tmp_path / "base", adapter_in=tmp_path / "v1",
            adapter_out=tmp_path / out, requests=[ForgetSpec("r1", "client", "u2", None, [])],
            method="default", settings=TOY, seed=0, references_dir=refs,
        )  # fmt: skip
        return dict(outcome.evidence["r1"]["method_info"]["ia"])

    ia = round_(tmp_path / "refs", "v2")
    refs = read_references(tmp_path / "refs")
    assert refs is not None
    out = sorted(i for i, m in refs.members.items() if "u2" not in m)
    assert ia["target"]["source"] == "references"
    for task in ("kind", "side"):
        assert sorted(v["reference"] for v in ia["target"]["tasks"][task]["per_reference"]) == out
    assert ia["pick"] == "closest"
    plain = round_(None, "v2b")
    assert plain["target"]["source"] == "constant"
    assert "no reference adapters" in plain["target"]["reason"]
    assert plain["pick"] == IAConfig.from_settings(TOY["ia"]).forget_accuracy_pick


def test_refresh_retrains_dropped_references_on_their_half_minus_the_forgotten(tmp_path: Path) -> None:
    """After clients are forgotten, :func:`refresh_references` retrains exactly the dropped
    references, each on its original half minus the forgotten clients: every client stays IN
    exactly the references its half says (unless forgotten), a forgotten client is IN none, the
    references never dropped are left as they were, and a second refresh trains nothing."""
    wl = ToyWorkload(0, num_clients=6, per_client=6)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci = wl.client_index()
    data = wl.client_data().to_batch(ci)
    directory = tmp_path / "refs"
    refs = train_references(base, data, wl.tasks(), FAST, client_index=ci, k=4, seed=3,
                            directory=directory, workload="toy")  # fmt: skip
    halves = assign_halves(refs.clients, 4, 3)
    forgotten = ["u1", "u4"]
    dropped = drop_references_with(directory, forgotten)
    kept = {i: (directory / f"ref-{i}" / "adapter_model.safetensors").read_bytes() for i in range(4)
            if i not in dropped}  # fmt: skip
    assert dropped
    assert kept
    remaining = data.select((~torch.isin(data.subset, torch.tensor([ci[c] for c in forgotten]))).nonzero()
                            .reshape(-1))  # fmt: skip
    trained: list[set[int]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        trained.append(set(args[1].subset.tolist()))
        return train_v1(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference_adapters, "train_v1", spy)
        assert refresh_references(base, remaining, wl.tasks(), FAST, client_index=ci, directory=directory,
                                  forgotten=forgotten) == dropped  # fmt: skip
        assert refresh_references(base, remaining, wl.tasks(), FAST, client_index=ci, directory=directory,
                                  forgotten=forgotten) == []  # fmt: skip
    after = read_references(directory)
    assert after is not None
    assert sorted(after.members) == [0, 1, 2, 3]
    for r in range(4):
        assert after.members[r] == [c for c in halves[r] if c not in forgotten]
    assert trained == [{ci[c] for c in halves[r] if c not in forgotten} for r in dropped]
    for i, blob in kept.items():
        assert (directory / f"ref-{i}" / "adapter_model.safetensors").read_bytes() == blob
    loaded = load_references(base, directory)
    assert loaded is not None
    assert len(loaded.models) == 4
    mask = after.out_mask(torch.tensor([ci[c] for c in refs.clients]), ci)
    for row, r in enumerate(after.members):
        assert mask[row].tolist() == [c not in halves[r] or c in forgotten for c in refs.clients]
