"""A fixed model's outputs by row (the round's reference adapters): each row forwarded once, the
first call bit for bit an uncached forward, later calls only the rows not seen yet, and a row
asked for under a known id with other inputs forwarded again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker.unlearning.audit import model_outputs
from worker.unlearning.engine import ensure_base
from worker.unlearning.likelihood_ratio import likelihood_ratio_audit, out_reference_targets
from worker.unlearning.reference_adapters import (
    CLIENT_OUTPUTS,
    HELDOUT_OUTPUTS,
    LoadedReferences,
    client_outputs_file,
    drop_references_with,
    load_references,
    refresh_references,
    train_references,
)
from worker.unlearning.row_outputs import RowOutputs, fingerprints, load_outputs, save_outputs
from worker.unlearning.training import TrainConfig
from worker.unlearning.types import Batch, cat_inputs
from worker.unlearning.workloads.toy import ToyWorkload


class Counting(nn.Module):
    """A two-head linear model that counts the rows it forwards."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)
        self.rows = 0

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        self.rows += int(inputs["x"].shape[0])
        return {"a": self.a(inputs["x"]), "b": self.b(inputs["x"])}


def batch(ids: list[str], x: Tensor) -> Batch:
    return Batch(inputs={"x": x}, labels={}, subset=torch.zeros(len(ids), dtype=torch.long), sample_ids=ids)


def test_each_row_is_forwarded_once_and_read_back_in_the_order_asked() -> None:
    model = Counting()
    x = torch.randn(6, 3)
    forget, unseen = batch(["s0", "s1", "s2"], x[:3]), batch(["v0", "v1", "v2"], x[3:])
    cache = RowOutputs(model, batch_size=4)
    first = cache.of([("forget", forget), ("unseen", unseen)])
    plain = model_outputs(model, {"x": x}, batch_size=4)
    assert all(torch.equal(first[k], plain[k]) for k in plain)  # bit for bit the uncached forward
    model.rows = 0
    # a subset in another order, and a row never seen: only that row is forwarded
    more = batch(["s2", "s0", "s9"], torch.cat([x[2:3], x[0:1], torch.randn(1, 3)]))
    again = cache.of([("forget", more), ("unseen", batch(["v2"], x[5:6]))])
    assert model.rows == 1
    assert torch.equal(again["a"][0], first["a"][2])
    assert torch.equal(again["a"][1], first["a"][0])
    assert torch.equal(again["b"][3], first["b"][5])
    assert torch.allclose(again["a"][2], model.a(more.inputs["x"][2]))
    assert cache.forwarded == 7


def test_a_known_id_with_other_inputs_or_role_is_forwarded_again() -> None:
    """The fingerprint and the role are part of a row's key: a sample id is never answered with
    another row's outputs (a held-out id may equal a client sample id in a user's workload)."""
    model = Counting()
    x = torch.randn(2, 3)
    cache = RowOutputs(model)
    cache.of([("forget", batch(["s0", "s1"], x))])
    changed = x.clone()
    changed[0, 1] += 1e-3
    out = cache.of([("forget", batch(["s0"], changed[:1]))])
    assert torch.allclose(out["a"], model.a(changed[:1]))
    assert not torch.allclose(out["a"], model.a(x[:1]))
    model.rows = 0
    cache.of([("unseen", batch(["s1"], x[1:]))])
    assert model.rows == 1
    assert fingerprints({"x": x}) != fingerprints({"x": changed})


def test_repeated_rows_and_empty_parts() -> None:
    """A row repeated within a call (a per-task request's Unl split) is forwarded once; no rows at
    all give the heads' empty outputs, as model_outputs does."""
    model = Counting()
    x = torch.randn(2, 3)
    cache = RowOutputs(model)
    out = cache.of([("forget", batch(["s0", "s1", "s0"], torch.cat([x, x[:1]])))])
    assert model.rows == 2
    assert torch.equal(out["a"][0], out["a"][2])
    empty = cache.of([("forget", batch([], torch.zeros(0, 3)))])
    assert {k: tuple(v.shape) for k, v in empty.items()} == {"a": (0, 2), "b": (0, 1)}


def test_the_target_and_the_audit_share_the_references_forwards(tmp_path: Path) -> None:
    """A round's per-client target forwards the OUT references on the forget set and held-out rows;
    the likelihood-ratio audit after it forwards only what the target did not (the IN references,
    the held-out rows the target did not read), and its evidence is what it is without the cache."""
    wl = ToyWorkload(0, num_clients=4, per_client=6)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci, tasks = wl.client_index(), wl.tasks()
    data = wl.client_data().to_batch(ci)
    cfg = TrainConfig(epochs=1, main_only_epochs=1, batch_size=8)
    train_references(base, data, tasks, cfg, client_index=ci, k=4, seed=1, directory=tmp_path / "refs",
                     workload="toy")  # fmt: skip
    loaded = load_references(base, tmp_path / "refs")
    assert loaded is not None
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    heldout = wl.heldout_data().to_batch(ci)
    names = [t.name for t in tasks]
    half = heldout.select(torch.arange(len(heldout) // 2))
    target = out_reference_targets(loaded, tasks, forget=forget, unseen=half, forget_tasks=names,
                                   client_index=ci)  # fmt: skip
    assert target
    after_target = sum(c.forwarded for c in loaded.cache)
    model = loaded.models[0]
    shared = likelihood_ratio_audit(model, loaded, tasks, forget=forget, unseen=heldout, forget_tasks=names,
                                    client_index=ci)  # fmt: skip
    fresh = LoadedReferences(refs=loaded.refs, models=loaded.models)
    alone = likelihood_ratio_audit(model, fresh, tasks, forget=forget, unseen=heldout, forget_tasks=names,
                                   client_index=ci)  # fmt: skip
    rows = len(forget) + len(heldout)
    assert 0 < after_target < 4 * rows  # the target forwarded some references' rows ...
    assert sum(c.forwarded for c in loaded.cache) == 4 * rows  # ... and the audit only the others
    assert sum(c.forwarded for c in fresh.cache) == 4 * rows
    for name in names:
        for key in ("auc", "tpr_at_1pct_fpr"):
            a, b = shared["tasks"][name][key], alone["tasks"][name][key]
            assert (a is None and b is None) or abs(a - b) < 1e-9
    # the audit reuses the model's outputs when given them
    inputs = cat_inputs([forget.inputs, heldout.inputs])
    given = likelihood_ratio_audit(model, fresh, tasks, forget=forget, unseen=heldout, forget_tasks=names,
                                   client_index=ci, outputs=model_outputs(model, inputs))  # fmt: skip
    assert given["tasks"] == alone["tasks"]


def test_outputs_computed_ahead_are_used_only_for_the_same_rows(tmp_path: Path) -> None:
    model = Counting()
    x = torch.randn(4, 3)
    rows = batch(["v0", "v1", "v2", "v3"], x)
    save_outputs(model, rows, tmp_path / "out.safetensors")
    got = load_outputs(tmp_path / "out.safetensors", rows)
    assert got is not None
    assert all(torch.equal(got[k], v) for k, v in model_outputs(model, {"x": x}).items())
    assert load_outputs(tmp_path / "out.safetensors", batch(["v0", "v1", "v3", "v2"], x)) is None
    changed = x.clone()
    changed[3, 0] += 1.0
    assert load_outputs(tmp_path / "out.safetensors", batch(["v0", "v1", "v2", "v3"], changed)) is None
    assert load_outputs(tmp_path / "missing.safetensors", rows) is None
    cache = RowOutputs(model)
    cache.seed("unseen", rows, got)
    model.rows = 0
    out = cache.of([("unseen", batch(["v2", "v0"], torch.cat([x[2:3], x[0:1]])))])
    assert model.rows == 0
    assert cache.forwarded == 0
    assert torch.equal(out["a"][1], got["a"][0])


def _toy_references(tmp_path: Path) -> tuple[Any, ...]:
    """Four reference adapters of the toy workload in ``tmp_path / "refs"``, trained with its
    held-out split: (base, client index, tasks, client data, held-out data, config, references)."""
    wl = ToyWorkload(0, num_clients=4, per_client=6)
    base = ensure_base(wl, tmp_path / "base", wl.settings({}), 0)
    ci, tasks = wl.client_index(), wl.tasks()
    data = wl.client_data().to_batch(ci)
    heldout = wl.heldout_data().to_batch(ci)
    cfg = TrainConfig(epochs=1, main_only_epochs=1, batch_size=8)
    refs = train_references(base, data, tasks, cfg, client_index=ci, k=4, seed=1, directory=tmp_path / "refs",
                            workload="toy", heldout=heldout)  # fmt: skip
    return base, ci, tasks, data, heldout, cfg, refs


def test_references_trained_with_the_heldout_split_are_loaded_with_its_outputs(tmp_path: Path) -> None:
    """References trained (and refreshed) with the held-out split write their outputs on it; loaded
    with that split, a round forwards them on the forget set alone, and the evidence is the same
    as forwarding everything (up to the last bits of a forward in other chunks)."""
    base, ci, tasks, data, heldout, cfg, refs = _toy_references(tmp_path)
    assert all((tmp_path / "refs" / f"ref-{r}" / HELDOUT_OUTPUTS).is_file() for r in range(4))
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    names = [t.name for t in tasks]

    def audit(loaded: LoadedReferences | None) -> dict[str, Any]:
        assert loaded is not None
        return likelihood_ratio_audit(loaded.models[0], loaded, tasks, forget=forget, unseen=heldout,
                                      forget_tasks=names, client_index=ci)  # fmt: skip

    ahead = load_references(base, tmp_path / "refs", heldout=heldout)
    plain = load_references(base, tmp_path / "refs")
    with_ahead, without = audit(ahead), audit(plain)
    assert ahead is not None
    assert plain is not None
    assert sum(c.forwarded for c in ahead.cache) == 4 * len(forget)
    assert sum(c.forwarded for c in plain.cache) == 4 * (len(forget) + len(heldout))
    for name in names:
        a, b = with_ahead["tasks"][name]["auc"], without["tasks"][name]["auc"]
        assert abs(a - b) < 1e-9
    # other held-out rows: the file is not used
    other = load_references(base, tmp_path / "refs", heldout=heldout.select(torch.arange(len(heldout) - 1)))
    assert other is not None
    assert all(not c.index for c in other.cache)
    # a refreshed reference writes its outputs too
    dropped = drop_references_with(tmp_path / "refs", [refs.members[0][0]])
    assert not (tmp_path / "refs" / f"ref-{dropped[0]}").exists()
    assert refresh_references(base, data, tasks, cfg, client_index=ci, directory=tmp_path / "refs",
                              forgotten=[refs.members[0][0]], heldout=heldout) == dropped  # fmt: skip
    assert all((tmp_path / "refs" / f"ref-{r}" / HELDOUT_OUTPUTS).is_file() for r in dropped)


def test_a_clients_samples_are_read_from_the_outputs_written_at_training(tmp_path: Path) -> None:
    """References write their outputs on every client's samples when trained; loaded with the
    client index, a round's target and audit forward none of a client's rows whose inputs are
    unchanged (a changed row is forwarded), with the evidence of a round that forwards them. A
    purge deletes the forgotten client's outputs from the references that stay, and a refreshed
    reference writes none for it."""
    base, ci, tasks, data, heldout, cfg, refs = _toy_references(tmp_path)
    folder = {r: tmp_path / "refs" / f"ref-{r}" / CLIENT_OUTPUTS for r in range(4)}
    assert all((folder[r] / client_outputs_file(c)).is_file() for r in range(4) for c in ci)
    assert all(c not in p.name for r in range(4) for p in folder[r].iterdir() for c in ci)  # no ids in names
    client = next(c for c, i in ci.items() if i == 0)
    forget = data.select((data.subset == 0).nonzero().reshape(-1))
    names = [t.name for t in tasks]

    def round_evidence(loaded: LoadedReferences | None, rows: Batch) -> tuple[dict[str, Any], dict[str, Any]]:
        assert loaded is not None
        target = out_reference_targets(loaded, tasks, forget=rows, unseen=heldout, forget_tasks=names,
                                       client_index=ci)  # fmt: skip
        audit = likelihood_ratio_audit(loaded.models[0], loaded, tasks, forget=rows, unseen=heldout,
                                       forget_tasks=names, client_index=ci)  # fmt: skip
        return target, audit

    ahead = load_references(base, tmp_path / "refs", heldout=heldout, client_index=ci)
    plain = load_references(base, tmp_path / "refs", heldout=heldout)
    (t_ahead, a_ahead), (t_plain, a_plain) = round_evidence(ahead, forget), round_evidence(plain, forget)
    assert ahead is not None
    assert plain is not None
    assert sum(c.forwarded for c in ahead.cache) == 0
    assert sum(c.forwarded for c in plain.cache) == 4 * len(forget)
    for name in names:
        for key in ("mia_auc", "accuracy"):
            assert abs(t_ahead[name][key] - t_plain[name][key]) < 1e-6
        for key in ("auc", "tpr_at_1pct_fpr"):
            a, b = a_ahead["tasks"][name][key], a_plain["tasks"][name][key]
            assert (a is None and b is None) or abs(a - b) < 1e-6
    # a row whose inputs are not those the outputs were computed on is forwarded
    changed_x = {k: v.clone() for k, v in forget.inputs.items()}
    key = next(iter(changed_x))
    changed_x[key][0] += 0.5
    changed = Batch(inputs=changed_x, labels=forget.labels, subset=forget.subset,
                    sample_ids=forget.sample_ids)  # fmt: skip
    again = load_references(base, tmp_path / "refs", heldout=heldout, client_index=ci)
    round_evidence(again, changed)
    assert again is not None
    assert sum(c.forwarded for c in again.cache) == 4
    # the purge: the client's outputs leave every reference that stays; refreshed ones write none
    dropped = drop_references_with(tmp_path / "refs", [client])
    kept = [r for r in range(4) if r not in dropped]
    assert sorted(dropped) == sorted(r for r, m in refs.members.items() if client in m)
    assert kept
    assert all(not (folder[r] / client_outputs_file(client)).exists() for r in kept)
    assert all((folder[r] / client_outputs_file(c)).is_file() for r in kept for c in ci if c != client)
    rest = data.select((data.subset != 0).nonzero().reshape(-1))
    assert refresh_references(base, rest, tasks, cfg, client_index=ci, directory=tmp_path / "refs",
                              forgotten=[client], heldout=heldout) == dropped  # fmt: skip
    for r in dropped:
        assert not (folder[r] / client_outputs_file(client)).exists()
        assert all((folder[r] / client_outputs_file(c)).is_file() for c in ci if c != client)
