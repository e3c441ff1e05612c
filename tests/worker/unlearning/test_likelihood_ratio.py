"""The likelihood-ratio audit (issue 8 part 5): reference adapters on halves of the clients, offline
LiRA, and its place in preparation / the round evidence (never trained by a round)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import worker.unlearning.reference_adapters as reference_adapters
from tests.worker.unlearning.distributions import assert_distribution
from tests.worker.unlearning.round_guards import forbid_training, one_client_round
from worker.unlearning.adapter_io import AdapterView, load_adapter
from worker.unlearning.audit import AuditConfig, forget_mia, loss_mia_auc, model_outputs
from worker.unlearning.engine import ensure_base, prepare
from worker.unlearning.likelihood_ratio import (
    likelihood_ratio_audit,
    lira_scores,
    out_reference_auc,
    scaled_confidence,
    tpr_at_fpr,
)
from worker.unlearning.reference_adapters import (
    REFERENCES_FILE,
    LoadedReferences,
    assign_halves,
    drop_references_with,
    in_count,
    load_references,
    read_references,
    train_references,
)
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import ClassificationTask, RegressionTask, cat_inputs
from worker.unlearning.workload import SampleSet
from worker.unlearning.workloads.toy import ToyWorkload


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: these tiny trainings only lose time to thread hand-offs on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_halves_hold_each_client_in_exactly_half_of_the_references() -> None:
    """Balanced halves (LiRA's offline setting): each client is IN exactly K/2 references, seeded,
    and the draw differs between seeds; an odd K is refused (so is one in the settings)."""
    clients = [f"c{i}" for i in range(9)]
    halves = assign_halves(clients, 6, seed=3)
    counts = Counter(c for half in halves for c in half)
    assert counts == dict.fromkeys(clients, 3)
    assert assign_halves(clients, 6, seed=3) == halves
    assert assign_halves(clients, 6, seed=4) != halves
    with pytest.raises(ValueError, match="even"):
        assign_halves(clients, 3, seed=0)
    with pytest.raises(ValueError, match="reference_adapters"):
        AuditConfig.from_settings({"audit": {"reference_adapters": 3}})


def test_an_in_share_puts_each_client_in_that_many_references_and_out_of_at_least_one() -> None:
    """``audit.reference_in_fraction``: each client IN ``round(K·f)`` references, clamped so that
    every client keeps an IN and an OUT one; a half is the default draw itself; out of (0, 1) is
    refused by the settings."""
    clients = [f"c{i}" for i in range(9)]
    counts = Counter(c for members in assign_halves(clients, 8, seed=3, in_fraction=0.75) for c in members)
    assert counts == dict.fromkeys(clients, 6)
    assert assign_halves(clients, 8, seed=3, in_fraction=0.5) == assign_halves(clients, 8, seed=3)
    assert (in_count(2, 0.75), in_count(8, 0.99), in_count(8, 0.01), in_count(16, 0.875)) == (1, 7, 1, 14)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="reference_in_fraction"):
            AuditConfig.from_settings({"audit": {"reference_in_fraction": bad}})


def test_references_are_saved_loaded_and_dropped_with_a_forgotten_client(tmp_path: Path) -> None:
    """train_references writes ref-<i>/ (peft) and references.json (halves, seed, recipe digest);
    each reference was trained on its half only; load_references loads them; OUT masks follow the
    halves (held-out rows are OUT everywhere); drop_references_with deletes exactly the references
    whose half held a forgotten client."""
    wl = ToyWorkload(0, num_clients=4, per_client=6)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci = wl.client_index()
    data = wl.client_data().to_batch(ci)
    cfg = TrainConfig(epochs=1, main_only_epochs=1, batch_size=32)
    seen: list[set[int]] = []

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(set(args[1].subset.tolist()))  # type: ignore[attr-defined]
        return train_v1(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference_adapters, "train_v1", spy)
        refs = train_references(
            base,
            data,
            wl.tasks(),
            cfg,
            client_index=ci,
            k=2,
            seed=5,
            directory=tmp_path / "refs",
            workload="toy",
        )
    assert [{ci[c] for c in refs.members[i]} for i in range(2)] == seen
    doc = json.loads((tmp_path / "refs" / REFERENCES_FILE).read_text())
    assert (doc["seed"], doc["k"], len(doc["recipe_digest"])) == (5, 2, 64)
    assert read_references(tmp_path / "refs") == refs
    loaded = load_references(base, tmp_path / "refs")
    assert loaded is not None
    assert len(loaded.models) == 2
    subset = torch.tensor([0, 1, 2, 3, -1])
    mask = refs.out_mask(subset, ci)
    for r, members in refs.members.items():
        assert mask[r].tolist() == [c not in members for c in ["u0", "u1", "u2", "u3"]] + [True]
    held = refs.members[0][0]
    assert drop_references_with(tmp_path / "refs", [held]) == [0]
    assert not (tmp_path / "refs" / "ref-0").exists()
    assert (tmp_path / "refs" / "ref-1").is_dir()
    after = read_references(tmp_path / "refs")
    assert after is not None
    assert list(after.members) == [1]
    assert load_references(base, None) is None


def test_the_references_share_one_base_and_score_as_one_copy_each(tmp_path: Path) -> None:
    """Code review (a worker held K copies of the base to score K references): the references are
    K adapters on ONE copy of the base, and every reference's outputs, hence the likelihood-ratio
    evidence, are bit for bit those of the reference loaded on a base of its own, in any order."""
    wl = ToyWorkload(0, num_clients=4, per_client=6)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci, tasks = wl.client_index(), wl.tasks()
    data = wl.client_data().to_batch(ci)
    cfg = TrainConfig(epochs=2, main_only_epochs=1, batch_size=8)
    train_references(base, data, tasks, cfg, client_index=ci, k=4, seed=1, directory=tmp_path / "refs",
                     workload="toy")  # fmt: skip
    loaded = load_references(base, tmp_path / "refs")
    assert loaded is not None
    views = [m for m in loaded.models if isinstance(m, AdapterView)]
    assert len(views) == 4
    shared = views[0].model
    assert all(v.model is shared for v in views)  # one peft model ...
    assert sorted(shared.peft_config) == ["ref-0", "ref-1", "ref-2", "ref-3"]  # ... with K adapters
    names = {v.adapter for v in views}
    own = [p for n, p in shared.named_parameters() if not set(n.split(".")) & names]
    assert sum(p.numel() for p in own) == sum(p.numel() for p in base.parameters())  # one base
    assert not any(p.requires_grad for p in shared.parameters())

    apart = LoadedReferences(
        refs=loaded.refs, models=[load_adapter(base, tmp_path / "refs" / v.adapter) for v in views]
    )  # the way they were loaded before: a base each
    unseen = wl.heldout_data().to_batch(ci)
    inputs = cat_inputs([data.inputs, unseen.inputs])
    for r in (2, 0, 3, 1, 2):  # any order: each view activates its own adapter
        one, alone = model_outputs(loaded.models[r], inputs), model_outputs(apart.models[r], inputs)
        assert one.keys() == alone.keys()
        assert all(torch.equal(one[k], alone[k]) for k in one)
    assert len({float(model_outputs(m, inputs)["kind"].sum()) for m in apart.models}) == 4  # 4 differ
    model = train_v1(base, data, tasks, cfg, seed=9)
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    evidence = [
        likelihood_ratio_audit(
            model, refs, tasks, forget=forget, unseen=unseen, forget_tasks=["kind", "side"], client_index=ci
        )
        for refs in (loaded, apart)
    ]
    assert evidence[0]["tasks"]  # something was scored
    assert evidence[0] == evidence[1]


def test_scores_are_offline_lira_vectorised() -> None:
    """φ is the logit of the true-label probability (−loss for a regression); the z-values equal a
    per-sample loop over the OUT references with one pooled σ; TPR at 1 % FPR counts the positives
    above the largest negative when there are fewer than 100 negatives."""
    task = ClassificationTask("k", 3)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits.double(), -1)[torch.arange(2), y]
    assert torch.allclose(scaled_confidence(task, logits, y), torch.log(p / (1 - p)))
    reg = RegressionTask("r")
    out, target = torch.tensor([[1.0], [3.0]]), torch.tensor([1.5, 1.0])
    assert torch.allclose(
        scaled_confidence(reg, out, target), -torch.tensor([0.25, 4.0], dtype=torch.float64)
    )

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    out_mask = torch.rand(6, 7, generator=gen) > 0.4
    out_mask[:, 3] = False  # no OUT reference: NaN
    target_phi = torch.randn(7, generator=gen, dtype=torch.float64)
    z, sigma = lira_scores(target_phi, ref, out_mask)
    resid, mus = [], []
    for i in range(7):
        vals = ref[out_mask[:, i], i]
        mus.append(float(vals.mean()) if len(vals) else math.nan)
        resid += [float(v) - mus[-1] for v in vals]
    dof = len(resid) - sum(1 for m in mus if m == m)
    assert sigma == pytest.approx(math.sqrt(sum(r * r for r in resid) / dof))
    for i in range(7):
        expected = (float(target_phi[i]) - mus[i]) / sigma if mus[i] == mus[i] else math.nan
        assert (math.isnan(expected) and math.isnan(float(z[i]))) or float(z[i]) == pytest.approx(expected)
    assert tpr_at_fpr(torch.tensor([3.0, 1.0, 0.5]), torch.tensor([0.0, 0.9, -1.0])) == pytest.approx(2 / 3)
    assert tpr_at_fpr(torch.tensor([]), torch.tensor([1.0])) is None

    # the OUT references' loss-MIA AUC: per reference over its OUT forgotten rows, then the median
    losses = torch.rand(3, 8, generator=gen, dtype=torch.float64)
    is_forget = torch.tensor([True] * 4 + [False] * 4)
    outs = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    outs = torch.cat([outs, torch.ones(3, 4, dtype=torch.bool)], 1)
    per_ref = [loss_mia_auc(losses[r, :4][outs[r, :4]], losses[r, 4:]) or 0.0 for r in (0, 1)]
    assert out_reference_auc(losses, outs, is_forget) == pytest.approx(statistics.median(per_ref))
    assert out_reference_auc(losses, outs & ~is_forget, is_forget) is None


class OneOddClient(ToyWorkload):
    """Toy data in 32 dimensions where client ``u0``'s ``kind`` labels are random: a model fits them
    only by memorising ``u0``'s samples (a canary client, as in Carlini et al.'s experiments)."""

    def client_data(self) -> SampleSet:
        data = super().client_data()
        gen = torch.Generator().manual_seed(self.seed + 7)
        data.labels["kind"][: self.per_client] = torch.randint(0, 4, (self.per_client,), generator=gen)
        return data


#: The memorisation test's recipe: one optimiser step per epoch (80 samples, batch 128).
MEMORISE = TrainConfig(epochs=12, main_only_epochs=12, batch_size=128, lr=0.12, rank=8, lora_alpha=8)


def memorised_vs_retrain(seed: int, root: Path) -> tuple[float, float, float]:
    """TPR at 1 % FPR of u0's samples vs 100 unseen samples, under 4 references, for a model
    trained on every client (it memorised u0) and for a retrain without u0; and how far the OUT
    references' loss-MIA AUC on u0 (the oracle-free per-client target) is from the retrain's."""
    wl = OneOddClient(seed, num_clients=8, per_client=10, heldout=100, dim=32)
    base = ensure_base(wl, root / "base", wl.settings({}), seed)
    tasks, ci = wl.tasks(), wl.client_index()
    data = wl.client_data().to_batch(ci)
    train_references(base, data, tasks, MEMORISE, client_index=ci, k=4, seed=seed, directory=root / "refs",
                     workload="odd")  # fmt: skip
    loaded = load_references(base, root / "refs")
    assert loaded is not None
    u0 = data.subset == 0
    forget = data.select(u0.nonzero().reshape(-1))
    unseen = wl.heldout_data().to_batch(ci)
    out, target = [], 0.0
    for model in (
        train_v1(base, data, tasks, MEMORISE, seed=seed + 100),
        train_v1(base, data.select((~u0).nonzero().reshape(-1)), tasks, MEMORISE, seed=seed + 100),
    ):
        ev = likelihood_ratio_audit(model, loaded, tasks, forget=forget, unseen=unseen, forget_tasks=["kind"],
                                    client_index=ci)  # fmt: skip
        out.append(float(ev["tpr_at_1pct_fpr"]["kind"]))
        target = float(ev["tasks"]["kind"]["out_reference_mia_auc"])
    retrain_auc = forget_mia(model, tasks, forget, unseen)["kind"]  # the last model: the retrain
    return out[0], out[1], abs(retrain_auc - target)


#: |retrain's loss-MIA AUC on u0 − the OUT references' AUC| (the per-client early-stopping target),
#: seeds 0–15, same on both kernel paths: 0.006–0.111, median 0.057 (seeds 0–9: median 0.025); a
#: constant 0.5 target is 0.27 away (median, seeds 0–7). Bound: median ≤ 0.1.
TARGET_GAP = 0.1


def test_the_attack_sees_a_memorised_client_and_not_its_retrain(tmp_path: Path) -> None:
    """On a model that memorised u0, u0's TPR at 1 % FPR is higher than on a retrain without u0.

    Measured over seeds 0–15 (``python -m tests.worker.unlearning.test_likelihood_ratio 16``), the
    same per seed on the default kernel path (``ATEN_CPU_CAPABILITY=default``) and the machine's own:
    difference (memorised − retrain) 0.0–0.8, median 0.35, 15/16 seeds > 0 and none < 0; over the
    seeds 0–9 the test runs, 0.1–0.8, median 0.3, 10/10 > 0. Bounds (half the measured median, and
    pass fractions below the measured ones): median ≥ 0.15, ≥ 9/10 seeds ≥ 0, ≥ 7/10 seeds > 0.
    """
    diffs, strict, ge, gaps = [], [], [], []
    for seed in range(10):
        mem, ret, gap = memorised_vs_retrain(seed, tmp_path / str(seed))
        gaps.append(gap)
        diffs.append(mem - ret)
        strict.append(mem > ret)
        ge.append(mem >= ret)
    assert_distribution("TPR@1%FPR memorised − retrain", diffs, median_at_least=0.15, passes=ge,
                        fraction_at_least=0.9)  # fmt: skip
    assert_distribution("TPR@1%FPR memorised > retrain", diffs, passes=strict, fraction_at_least=0.7)
    # the per-client target from the OUT references tracks the retrain's loss-MIA AUC on u0
    assert_distribution("|retrain AUC − OUT-reference AUC|", gaps, median_at_most=TARGET_GAP)


TOY_SETTINGS: dict[str, object] = {"audit": {"reference_adapters": 2, "bootstrap": 0}}


def test_prepare_trains_references_and_the_round_reads_them_but_never_trains_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preparation trains the references after v1 (timed, recorded); the round's evidence carries
    ``likelihood_ratio`` per forgotten task when references exist, and omits it when they do not
    (setting off, or no directory); a round never trains a reference (training one raises here)."""
    wl = ToyWorkload()
    prepared = prepare(
        wl, data_dir=tmp_path / "data", base_dir=tmp_path / "base", adapter_dir=tmp_path / "v1",
        settings=TOY_SETTINGS, seed=0, references_dir=tmp_path / "refs",
    )  # fmt: skip
    assert prepared.evidence["references"]["k"] == 2
    assert prepared.evidence["timings_s"]["references"] > 0
    assert (tmp_path / "refs" / REFERENCES_FILE).is_file()

    forbid_training(monkeypatch, ("train_references",))

    def round_(refs: Path | None, out: str) -> dict[str, Any]:
        return one_client_round(
            wl, tmp_path, TOY_SETTINGS, client="u1", method="original", refs=refs, out=out
        )

    ev = round_(tmp_path / "refs", "v2")
    lr = ev["likelihood_ratio"]
    assert isinstance(lr, dict)
    assert lr["references"] == 2
    assert lr["method"].startswith("offline LiRA")
    assert set(lr["tasks"]) == {"kind", "side"}
    for task in lr["tasks"].values():
        assert (task["n_forget"], task["n_unseen"], task["min_out_references"]) == (12, 16, 1)
        assert 0.0 <= task["tpr_at_1pct_fpr"] <= 1.0
        assert 0.0 <= task["auc"] <= 1.0
        assert 0.0 <= task["out_reference_mia_auc"] <= 1.0
    assert lr["wall_s"] > 0
    assert "likelihood_ratio" not in round_(None, "v2b")
    assert "likelihood_ratio" not in round_(tmp_path / "none", "v2c")


if __name__ == "__main__":  # the spread behind the memorisation test's bounds
    import tempfile

    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    with tempfile.TemporaryDirectory() as tmp:
        rows = [memorised_vs_retrain(s, Path(tmp) / str(s)) for s in range(n)]
    for s, (m, r, g) in enumerate(rows):
        print(f"seed {s}: memorised {m:.2f} retrain {r:.2f} diff {m - r:+.2f} target gap {g:.3f}")
    diffs = [m - r for m, r, _ in rows]
    gaps = [g for _, _, g in rows]
    print(f"target gap: median {statistics.median(gaps):.3f}, max {max(gaps):.3f}")
    print(f"median diff {statistics.median(diffs):.2f}, min {min(diffs):.2f}, max {max(diffs):.2f}, "
          f"strict {sum(d > 0 for d in diffs)}/{n}, ge {sum(d >= 0 for d in diffs)}/{n}")  # fmt: skip
