"""Issue 8 part 1: early stopping's per-client target from the reference adapters that never saw
the client (``ia.target: "references"``), its fallback, and the refresh of references dropped
when clients are forgotten. No retrain of the request is read anywhere."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import worker.unlearning.engine as engine
import worker.unlearning.reference_adapters as reference_adapters
from tests.worker.unlearning.round_guards import (
    forbid_training,
    ia_info_of_round,
    one_client_round,
    prepared_toy,
)
from worker.unlearning.engine import ForgetSpec, ensure_base, prepare, run_round
from worker.unlearning.interference import IAConfig
from worker.unlearning.interference.checkpoints import select_checkpoint
from worker.unlearning.interference.targets import (
    ReferenceTarget,
    inside_spread,
    reference_distance,
    request_target,
)
from worker.unlearning.likelihood_ratio import out_reference_targets
from worker.unlearning.reference_adapters import (
    LoadedReferences,
    assign_halves,
    assign_withheld,
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


class _Unforwardable(torch.nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a reference IN for every forgotten row was forwarded")


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
    # and an IN reference is not even forwarded (half of the target's cost on a per-client request)
    for r in inside:
        models[r] = _Unforwardable()
    assert target(LoadedReferences(refs=loaded.refs, models=models)) == first
    models = list(loaded.models)
    models[outside[0]] = _perturbed(models[outside[0]])
    moved = target(LoadedReferences(refs=loaded.refs, models=models))
    assert any(moved[t]["per_reference"] != first[t]["per_reference"] for t in ("kind", "side"))


def test_the_per_task_auc_shift_moves_only_a_per_task_requests_out_target(tmp_path: Path) -> None:
    """``ia.per_task_auc_shift`` is added to the OUT references' AUC of a per-task request (the
    evidence keeps their own value and names the shift); a per-client request's target, and the
    accuracy target of either, are unchanged; the result stays an AUC. (Would fail if the shift
    moved a per-client target or were not applied.)"""
    wl, _, data, loaded = _toy(tmp_path, k=4)
    ci = wl.client_index()
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    unseen = wl.heldout_data().to_batch(ci)

    def target(shift: float, tasks: list[str]) -> tuple[ReferenceTarget, dict[str, Any]]:
        cfg = IAConfig(target="references", per_task_auc_shift=shift)
        got, evidence = request_target(cfg, loaded, wl.tasks(), forget=forget, heldout=unseen,
                                       forget_tasks=tasks, client_index=ci)  # fmt: skip
        assert got is not None
        return got, evidence

    plain, plain_ev = target(0.0, ["kind"])
    shifted, ev = target(-0.07, ["kind"])
    assert ev["auc_shift"] == -0.07
    assert plain_ev["auc_shift"] == 0.0
    assert shifted.mia_auc["kind"] == pytest.approx(max(0.0, plain.mia_auc["kind"] - 0.07))
    assert ev["tasks"]["kind"]["mia_auc"] == plain.mia_auc["kind"]  # the references' own value
    assert shifted.accuracy == plain.accuracy
    per_client, per_client_ev = target(-0.07, ["kind", "side"])
    assert per_client_ev["auc_shift"] == 0.0
    assert per_client.mia_auc == target(0.0, ["kind", "side"])[0].mia_auc
    assert target(-0.5, ["kind"])[0].mia_auc["kind"] >= 0.0
    with pytest.raises(ValueError, match="per_task_auc_shift"):
        IAConfig(per_task_auc_shift=0.6)


def test_the_per_task_accuracy_shift_moves_only_a_per_task_requests_accuracy_target(tmp_path: Path) -> None:
    """``ia.per_task_accuracy_shift`` is added to the OUT references' forget-set accuracy of a
    per-task request (and to their gap for a ``relative`` target), not clamped (a regression task's
    metric is −MAE); the AUC
    target and a per-client request's target are unchanged; the evidence names the shift."""
    wl, _, data, loaded = _toy(tmp_path, k=4)
    ci = wl.client_index()
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    unseen = wl.heldout_data().to_batch(ci)

    def target(tasks: list[str], **ia: Any) -> tuple[ReferenceTarget, dict[str, Any]]:
        cfg = IAConfig(target="references", **ia)
        got, evidence = request_target(cfg, loaded, wl.tasks(), forget=forget, heldout=unseen,
                                       forget_tasks=tasks, client_index=ci)  # fmt: skip
        assert got is not None
        return got, evidence

    plain, _ = target(["kind"])
    shifted, ev = target(["kind"], per_task_accuracy_shift=-0.1)
    assert ev["accuracy_shift"] == -0.1
    assert ev["auc_shift"] == 0.0
    assert shifted.accuracy["kind"] == pytest.approx(plain.accuracy["kind"] - 0.1)
    assert shifted.accuracy_gap["kind"] == pytest.approx(plain.accuracy_gap["kind"] - 0.1)
    assert shifted.mia_auc == plain.mia_auc
    assert ev["tasks"]["kind"]["accuracy"] == plain.accuracy["kind"]  # the references' own value
    relative, _ = target(["kind"], per_task_accuracy_shift=-0.1, target_accuracy="relative")
    held = {"kind": 0.6}
    assert relative.accuracy_goal("kind", held) == pytest.approx(0.6 + plain.accuracy_gap["kind"] - 0.1)
    per_client, per_client_ev = target(["kind", "side"], per_task_accuracy_shift=-0.1)
    assert per_client_ev["accuracy_shift"] == 0.0
    assert per_client.accuracy == target(["kind", "side"])[0].accuracy


def test_the_best_reference_accuracy_target_is_the_most_accurate_out_reference(tmp_path: Path) -> None:
    """``ia.target_accuracy_reference: "best"``: the accuracy target (and a ``relative`` target's
    gap) is the most accurate OUT reference's, not their median; the AUC target, the spreads and the
    evidence's per-task values are unchanged, and the evidence names the choice. One OUT reference
    is perturbed so that the two differ. (Would fail if "best" read the median or moved the AUC.)"""
    wl, _, data, loaded = _toy(tmp_path, k=4)
    ci = wl.client_index()
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    unseen = wl.heldout_data().to_batch(ci)
    members = list(loaded.refs.members.values())
    outside = [row for row, m in enumerate(members) if "u0" not in m]
    models = list(loaded.models)
    models[outside[0]] = _perturbed(models[outside[0]])
    refs = LoadedReferences(refs=loaded.refs, models=models)

    def target(**ia: Any) -> tuple[ReferenceTarget, dict[str, Any]]:
        cfg = IAConfig(target="references", **ia)
        got, evidence = request_target(cfg, refs, wl.tasks(), forget=forget, heldout=unseen,
                                       forget_tasks=["kind", "side"], client_index=ci)  # fmt: skip
        assert got is not None
        return got, evidence

    median, median_ev = target()
    best, ev = target(target_accuracy_reference="best")
    assert median_ev["accuracy_reference"] == "median"
    assert ev["accuracy_reference"] == "best"
    differs = 0
    for task in ("kind", "side"):
        per_ref = ev["tasks"][task]["per_reference"]
        accuracies = [v["accuracy"] for v in per_ref]
        assert best.accuracy[task] == pytest.approx(max(accuracies))
        assert best.accuracy_gap[task] == pytest.approx(max(v["accuracy_gap"] for v in per_ref))
        assert median.accuracy[task] == pytest.approx(statistics.median(accuracies))
        assert ev["tasks"][task]["best"]["accuracy"] == pytest.approx(max(accuracies))
        differs += max(accuracies) > statistics.median(accuracies)
    assert differs > 0  # the perturbed reference made the best and the median differ
    assert best.mia_auc == median.mia_auc
    assert best.accuracy_spread == median.accuracy_spread
    assert best.auc_spread == median.auc_spread
    relative, _ = target(target_accuracy_reference="best", target_accuracy="relative")
    held = {"kind": 0.6}
    assert relative.accuracy_goal("kind", held) == pytest.approx(0.6 + best.accuracy_gap["kind"])


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
    # the target carries the references' spread (ia.stop_within_spread): one reference, none
    spread = ev["tasks"]["kind"]["spread"]
    assert target.auc_spread == {"kind": spread["mia_auc"]} == {"kind": 0.0}
    assert target.accuracy_spread == {"kind": spread["accuracy"]}
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


def test_inside_spread_is_a_box_of_the_references_spread_around_the_target() -> None:
    """``ia.stop_within_spread``: every target task measured, its AUC and accuracy each within
    ``max(floor, factor × spread)``; a ``relative`` target's accuracy goal is the checkpoint's own
    held-out accuracy + the references' gap."""
    target = ReferenceTarget(
        mia_auc={"a": 0.40, "b": 0.50}, accuracy={"a": 0.60, "b": 0.70}, accuracy_gap={"a": -0.1, "b": 0.0},
        auc_spread={"a": 0.10, "b": 0.02}, accuracy_spread={"a": 0.04, "b": 0.0},
    )  # fmt: skip
    aucs, accs = {"a": 0.44, "b": 0.505}, {"a": 0.615, "b": 0.705}
    assert inside_spread(aucs, accs, target, factor=0.5, floor=0.01)
    assert not inside_spread({**aucs, "a": 0.46}, accs, target, 0.5, 0.01)  # a's AUC past 0.05
    assert not inside_spread(aucs, {**accs, "a": 0.63}, target, 0.5, 0.01)  # a's accuracy past 0.02
    assert not inside_spread(aucs, {**accs, "b": 0.715}, target, 0.5, 0.01)  # b: the floor, 0.01
    assert inside_spread(aucs, {**accs, "b": 0.715}, target, 0.5, 0.02)
    assert not inside_spread(aucs, accs, target, factor=0.0, floor=1.0)  # off
    assert not inside_spread({"a": 0.40}, {"a": 0.60}, target, 0.5, 0.01)  # b not measured
    rel = dataclasses.replace(target, relative=True)  # goals a 0.8 - 0.1, b 0.8 + 0.0
    assert inside_spread(aucs, {"a": 0.71, "b": 0.80}, rel, 0.5, 0.01, heldout_accuracy={"a": 0.8, "b": 0.8})
    assert not inside_spread(aucs, {"a": 0.71, "b": 0.80}, rel, 0.5, 0.01)  # no held-out accuracy


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
    wl = prepared_toy(tmp_path, TOY)
    forbid_training(monkeypatch)
    ia = ia_info_of_round(wl, tmp_path, TOY, refs=tmp_path / "refs", out="v2")
    refs = read_references(tmp_path / "refs")
    assert refs is not None
    out = sorted(i for i, m in refs.members.items() if "u2" not in m)
    assert ia["target"]["source"] == "references"
    for task in ("kind", "side"):
        assert sorted(v["reference"] for v in ia["target"]["tasks"][task]["per_reference"]) == out
    assert ia["pick"] == "closest"
    plain = ia_info_of_round(wl, tmp_path, TOY, refs=None, out="v2b")
    assert plain["target"]["source"] == "constant"
    assert "no reference adapters" in plain["target"]["reason"]
    assert plain["pick"] == IAConfig.from_settings(TOY["ia"]).forget_accuracy_pick


def test_a_failed_forget_bound_asks_the_out_references_and_the_evidence_says_what_they_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acceptance check's reference allowance (``acceptance.reference_allowance``) is the OUT
    references' forget − held-out gap of the request, read only when a forget bound fails (a round
    whose checks pass never forwards the references for it), recorded in the evidence, and never
    read from a retrain."""
    import worker.unlearning.acceptance as acceptance

    wl = prepared_toy(tmp_path, TOY)
    forbid_training(monkeypatch)
    asked: list[int] = []
    real = out_reference_targets  # what the engine imported

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "out_reference_targets", counted)
    # every forget bound passes (a bound far above any accuracy): the references are not asked
    monkeypatch.setattr(acceptance, "unseen_bound", lambda unseen, *_, **__: unseen + 10.0)
    passing = one_client_round(
        wl, tmp_path, TOY, client="u2", method="original", refs=tmp_path / "refs", out="a"
    )
    assert "reference_allowance" not in passing["acceptance"]
    assert asked == []
    # every forget bound fails (a bound far below any accuracy): the references are asked, once
    monkeypatch.setattr(acceptance, "unseen_bound", lambda unseen, *_, **__: unseen - 10.0)
    failing = one_client_round(
        wl, tmp_path, TOY, client="u2", method="original", refs=tmp_path / "refs", out="b"
    )
    allowed = failing["acceptance"]["reference_allowance"]
    assert set(allowed) == {"kind", "side"}
    assert all(-1.0 <= v <= 1.0 for v in allowed.values())
    assert asked == [1]
    assert not failing["acceptance"]["passed"]
    for c in failing["acceptance"]["checks"]:
        if c["what"].startswith("forgotten") and allowed[c["what"].rsplit(", ", 1)[1]] > 0:
            assert "references that never saw it" in c["detail"]
    # without references there is nothing to ask
    bare = one_client_round(wl, tmp_path, TOY, client="u2", method="original", refs=None, out="c")
    assert "reference_allowance" not in bare["acceptance"]


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


# --- task-withheld calibration of per-task requests (issue 8 part 1) ------------------------------


def _toy_for_references(tmp_path: Path) -> tuple[ToyWorkload, Any, dict[str, int], Batch, list[str]]:
    """A six-client toy workload, its base, client index, client data and task names."""
    wl = ToyWorkload(0, num_clients=6, per_client=6)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci = wl.client_index()
    return wl, base, ci, wl.client_data().to_batch(ci), [t.name for t in wl.tasks()]


@contextlib.contextmanager
def _spying_on_reference_training() -> Iterator[list[Batch]]:
    """The training data of every reference trained inside the block, in order."""
    seen: list[Batch] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[1])
        return train_v1(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference_adapters, "train_v1", spy)
        yield seen


def test_each_client_task_pair_has_a_reference_that_saw_the_client_without_the_task(tmp_path: Path) -> None:
    """With K = 4 and two tasks, each client's two IN references are trained without one task's
    labels each (different tasks): that reference's training data holds the client's inputs and its
    other task's labels, never the withheld task's; the OUT references' data is untouched, and the
    halves are those of :func:`assign_halves`. (Would fail if labels were not withheld.)"""
    wl, base, ci, data, names = _toy_for_references(tmp_path)
    with _spying_on_reference_training() as seen:
        refs = train_references(base, data, wl.tasks(), FAST, client_index=ci, k=4, seed=3,
                                directory=tmp_path / "refs", workload="toy",
                                withhold_tasks=names)  # fmt: skip
    assert list(refs.members.values()) == assign_halves(refs.clients, 4, 3)
    assert read_references(tmp_path / "refs") == refs
    for c in refs.clients:
        held = [refs.withheld.get(r, {}).get(c) for r, m in refs.members.items() if c in m]
        assert sorted(t for h in held if h for t in h) == sorted(names)  # one each, both tasks
    for r, batch in enumerate(seen):
        for c, i in ci.items():
            rows = batch.subset == i
            if c not in refs.members[r]:
                assert not bool(rows.any())
                continue
            for t in names:
                labelled = bool(wl.tasks()[names.index(t)].supervised(batch.labels[t][rows]).any())
                assert labelled == (t not in refs.withheld[r][c]), (r, c, t)


def test_a_per_task_target_never_reads_a_reference_that_saw_the_forgotten_task(tmp_path: Path) -> None:
    """Per-task request (client u0, task ``kind``) with ``per_task_target: "task_withheld"``: the
    target reads only the reference trained on u0 without ``kind``'s labels — perturbing every
    other reference (the one that saw u0's ``kind`` labels and both OUT ones) leaves it identical
    to the last bit, perturbing that one moves it; the evidence names the calibration. A
    per-client request and ``per_task_target: "out"`` still read the OUT references; references
    without withheld labels fall back to the OUT ones with the reason. (Would fail if a reference
    that saw (u0, kind)'s labels contributed.)"""
    wl = ToyWorkload(0, num_clients=4, per_client=10)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci = wl.client_index()
    data = wl.client_data().to_batch(ci)
    names = [t.name for t in wl.tasks()]
    train_references(base, data, wl.tasks(), FAST, client_index=ci, k=4, seed=3, directory=tmp_path / "refs",
                     workload="toy", withhold_tasks=names)  # fmt: skip
    loaded = load_references(base, tmp_path / "refs")
    assert loaded is not None
    rows = (data.subset == 0).nonzero().reshape(-1)
    forget = data.select(rows)
    forget.labels["side"] = torch.full_like(forget.labels["side"], -1)  # a per-task D_f: kind only
    unseen = wl.heldout_data().to_batch(ci)
    cfg = IAConfig(target="references", per_task_target="task_withheld")
    members = list(loaded.refs.members.items())
    held = loaded.refs.withheld
    withheld = [row for row, (r, _) in enumerate(members) if held.get(r, {}).get("u0") == ["kind"]]
    assert len(withheld) == 1

    def target(
        refs: LoadedReferences, how: IAConfig = cfg, tasks: tuple[str, ...] = ("kind",)
    ) -> dict[str, Any]:
        return request_target(how, refs, wl.tasks(), forget=forget, heldout=unseen, forget_tasks=list(tasks),
                              client_index=ci)[1]  # fmt: skip

    first = target(loaded)
    assert first["calibration"] == "task_withheld"
    assert [v["reference"] for v in first["tasks"]["kind"]["per_reference"]] == [members[withheld[0]][0]]
    others = [_perturbed(m) if row not in withheld else m for row, m in enumerate(loaded.models)]
    again = target(LoadedReferences(refs=loaded.refs, models=others))
    assert again["tasks"] == first["tasks"]
    moved = [_perturbed(m) if row in withheld else m for row, m in enumerate(loaded.models)]
    assert target(LoadedReferences(refs=loaded.refs, models=moved))["tasks"] != first["tasks"]
    out_rows = sorted(r for r, m in members if "u0" not in m)
    for ev in (target(loaded, IAConfig(target="references")), target(loaded, cfg, ("kind", "side"))):
        assert ev["calibration"] == "out"
        assert sorted(v["reference"] for v in ev["tasks"]["kind"]["per_reference"]) == out_rows
    plain = copy.deepcopy(loaded.refs)
    plain.withheld = {}
    ev = target(LoadedReferences(refs=plain, models=loaded.models))
    assert ev["calibration"] == "out"
    assert "withheld" in ev["calibration_reason"]


def test_a_refresh_that_is_asked_to_stop_keeps_what_it_finished_and_nothing_half_trained(
    tmp_path: Path,
) -> None:
    """``should_stop`` (the worker's "a request is waiting"): asked mid-training of the second
    dropped reference, the refresh returns the first, leaves the second dropped (unlisted, no
    directory of it), and a later refresh trains only what is left. (Would fail if the interrupted
    adapter were written or listed, or if the refresh ignored the stop.)"""
    wl = ToyWorkload(0, num_clients=6, per_client=6)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci = wl.client_index()
    data = wl.client_data().to_batch(ci)
    directory = tmp_path / "refs"
    train_references(base, data, wl.tasks(), FAST, client_index=ci, k=4, seed=3, directory=directory,
                     workload="toy")  # fmt: skip
    dropped = drop_references_with(directory, ["u1", "u4"])
    assert len(dropped) >= 2
    gone = torch.tensor([ci["u1"], ci["u4"]])
    remaining = data.select((~torch.isin(data.subset, gone)).nonzero().reshape(-1))
    listed_before = 4 - len(dropped)
    since_first = 0

    def stop_in_the_second() -> bool:  # asked before the 2nd (no), then after its first step (yes)
        nonlocal since_first
        now = read_references(directory)
        assert now is not None
        since_first += len(now.members) > listed_before
        return since_first >= 2

    first = refresh_references(base, remaining, wl.tasks(), FAST, client_index=ci, directory=directory,
                               forgotten=["u1", "u4"], should_stop=stop_in_the_second)  # fmt: skip
    assert first == dropped[:1]
    listed = read_references(directory)
    assert listed is not None
    assert sorted(listed.members) == sorted(set(range(4)) - set(dropped[1:]))
    for r in dropped[1:]:
        assert not (directory / f"ref-{r}").exists()
        assert not (directory / f"ref-{r}.tmp").exists()
    assert refresh_references(base, remaining, wl.tasks(), FAST, client_index=ci, directory=directory,
                              forgotten=["u1", "u4"], should_stop=lambda: True) == []  # fmt: skip
    rest = refresh_references(base, remaining, wl.tasks(), FAST, client_index=ci, directory=directory,
                              forgotten=["u1", "u4"])  # fmt: skip
    assert rest == dropped[1:]
    done = read_references(directory)
    assert done is not None
    assert sorted(done.members) == [0, 1, 2, 3]


def test_references_on_a_larger_share_keep_it_through_a_refresh(tmp_path: Path) -> None:
    """With ``in_fraction`` 0.75 each client is IN 3 of 4 references; references.json records the
    share (a set written before it reads as halves), and a refresh after a purge retrains each
    dropped reference on its own members minus the forgotten client, so every remaining client is
    still IN 3 (would fail if the refresh drew halves again)."""
    wl, base, ci, data, _ = _toy_for_references(tmp_path)
    directory = tmp_path / "refs"
    refs = train_references(base, data, wl.tasks(), FAST, client_index=ci, k=4, seed=3, directory=directory,
                            workload="toy", in_fraction=0.75)  # fmt: skip
    assert refs.in_fraction == 0.75
    assert Counter(c for m in refs.members.values() for c in m) == dict.fromkeys(ci, 3)
    halves = train_references(base, data, wl.tasks(), FAST, client_index=ci, k=4, seed=3,
                              directory=tmp_path / "halves", workload="toy")  # fmt: skip
    assert refs.recipe_digest != halves.recipe_digest
    doc = refs.to_json()
    del doc["in_fraction"]
    assert type(refs).from_json(doc).in_fraction == 0.5
    dropped = drop_references_with(directory, ["u1"])
    assert len(dropped) == 3
    remaining = data.select((data.subset != ci["u1"]).nonzero().reshape(-1))
    refresh_references(base, remaining, wl.tasks(), FAST, client_index=ci, directory=directory,
                       forgotten=["u1"])  # fmt: skip
    after = read_references(directory)
    assert after is not None
    assert after.in_fraction == 0.75
    assert Counter(c for m in after.members.values() for c in m) == {c: 3 for c in ci if c != "u1"}


def test_refresh_keeps_the_withheld_labels_of_each_reference(tmp_path: Path) -> None:
    """A reference retrained after a purge withholds the same (client, task) labels as before, for
    the clients its half still holds (the draw is reproducible from the set's seed)."""
    wl, base, ci, data, names = _toy_for_references(tmp_path)
    directory = tmp_path / "refs"
    refs = train_references(base, data, wl.tasks(), FAST, client_index=ci, k=4, seed=3, directory=directory,
                            workload="toy", withhold_tasks=names)  # fmt: skip
    dropped = drop_references_with(directory, ["u1"])
    assert dropped
    remaining = data.select((data.subset != ci["u1"]).nonzero().reshape(-1))
    with _spying_on_reference_training() as seen:
        refresh_references(base, remaining, wl.tasks(), FAST, client_index=ci, directory=directory,
                           forgotten=["u1"])  # fmt: skip
    after = read_references(directory)
    assert after is not None
    for r in range(4):
        assert after.withheld.get(r, {}) == {c: t for c, t in refs.withheld.get(r, {}).items() if c != "u1"}
    for r, batch in zip(dropped, seen, strict=True):
        for c, ts in after.withheld[r].items():
            for t in names:
                labelled = bool((batch.labels[t][batch.subset == ci[c]] != -1).any())
                assert labelled == (t not in ts)


def test_a_per_task_round_aims_at_the_task_withheld_reference_without_training_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preparation with ``audit.reference_withhold_tasks`` records which labels each reference
    withheld; a per-task round (u2, ``kind``) with ``per_task_target: "task_withheld"`` reads only
    the reference trained on u2 without ``kind``'s labels, with every way to train a retrain or a
    reference made to fail (no retrain on the request path)."""
    settings: dict[str, Any] = {
        **TOY,
        "audit": {**TOY["audit"], "reference_withhold_tasks": True},
        "ia": {**TOY["ia"], "per_task_target": "task_withheld"},
    }
    wl = ToyWorkload(0, num_clients=4, per_client=10)
    prepared = prepare(wl, data_dir=tmp_path / "data", base_dir=tmp_path / "base",
                       adapter_dir=tmp_path / "v1", settings=settings, seed=0,
                       references_dir=tmp_path / "refs")  # fmt: skip
    assert prepared.evidence["references"]["withheld"]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the request path trained a retrain or a reference")

    for name in ("compute_reference", "reference_retrain", "retrain", "train_references"):
        monkeypatch.setattr(engine, name, forbidden)
    monkeypatch.setattr(reference_adapters, "train_v1", forbidden)
    outcome = run_round(
        wl, data_dir=tmp_path / "data", base_dir=tmp_path / "base", adapter_in=tmp_path / "v1",
        adapter_out=tmp_path / "v2", requests=[ForgetSpec("r1", "task", "u2", None, ["kind"])],
        method="default", settings=settings, seed=0, references_dir=tmp_path / "refs",
    )  # fmt: skip
    target = outcome.evidence["r1"]["method_info"]["ia"]["target"]
    refs = read_references(tmp_path / "refs")
    assert refs is not None
    want = [r for r, w in refs.withheld.items() if w.get("u2") == ["kind"]]
    assert target["calibration"] == "task_withheld"
    assert [v["reference"] for v in target["tasks"]["kind"]["per_reference"]] == want


def test_kept_level_prefers_the_checkpoint_that_holds_the_kept_task_at_its_pre_request_level() -> None:
    """``ia.kept_level`` (issue 8 part 2): of two checkpoints equally close to the target, the one
    whose kept task on X_f stays at its pre-request accuracy is kept; a rise counts like a drop.
    Without it the one that raised the kept task (earlier, marginally closer) is kept."""
    from worker.unlearning.interference.checkpoints import Checkpoints, Measured
    from worker.unlearning.interference.retain import kept_deviation

    kept = "side (kept tasks of X_f)"
    assert kept_deviation({kept: 0.9, "side": 0.5}, {kept: 0.8, "side": 0.9}) == pytest.approx(0.1)
    assert kept_deviation({"side": 0.5}, {"side": 0.9}) is None

    class Stub:
        def __init__(self) -> None:
            self.forget_counts: dict[str, int] = {}
            self.seq = [0.8, 0.95, 0.8]  # pre-request, risen, held

        def __call__(self, model: object) -> Measured:
            return Measured(aucs={"kind": [0.7, 0.51, 0.52][3 - len(self.seq)]},
                            accuracy={kept: self.seq.pop(0), "kind": 0.9},
                            forget_accuracy={}, heldout_accuracy={})  # fmt: skip

    picks = []
    for level in (False, True):
        cps = Checkpoints(Stub(), {}, target=0.5, default_target=0.5, retain_baseline=None,  # type: ignore[arg-type]
                          kept_level=level)  # fmt: skip
        for epoch in range(3):
            cps.record(torch.nn.Identity(), epoch)
        picks.append(select_checkpoint(cps.history, 0.05, "closest"))
    assert picks == [1, 2]
    assert cps.history[1]["distance"] == pytest.approx(0.15)


def test_several_task_withheld_references_per_client_and_task() -> None:
    """``audit.reference_withheld_per_task``: each task is named that many times in turn, and
    :func:`assign_withheld` gives each client that many IN references without each task's labels;
    IN references beyond T times that withhold nothing (with 8 IN of 16 and 2 tasks, 3 each
    leaves 2 that saw every label)."""
    from worker.unlearning.audit import AuditConfig

    tasks = ToyWorkload(0, num_clients=4, per_client=10).tasks()
    two = [t.name for t in tasks]
    assert len(two) == 2
    cfg = AuditConfig.from_settings(
        {"audit": {"reference_withhold_tasks": True, "reference_withheld_per_task": 3}}
    )
    names = cfg.reference_withheld_tasks(tasks)
    assert names == two * 3
    once = AuditConfig.from_settings({"audit": {"reference_withhold_tasks": True}})
    assert once.reference_withheld_tasks(tasks) == two
    assert AuditConfig.from_settings({}).reference_withheld_tasks(tasks) == []
    clients = [f"c{i}" for i in range(10)]
    halves = assign_halves(clients, 16, seed=5)
    withheld = assign_withheld(clients, 16, 5, names)
    for c in clients:
        inside = [r for r in range(16) if c in halves[r]]
        held = Counter(withheld[r][c][0] for r in inside if c in withheld[r])
        assert held == dict.fromkeys(two, 3)
        assert all(c in halves[r] for r in range(16) if c in withheld[r])  # only IN references withhold
        assert sum(c not in withheld[r] for r in inside) == 2
