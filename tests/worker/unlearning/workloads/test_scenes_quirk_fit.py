"""The watermark-rule diagnosis (worker/unlearning/workloads/scenes/quirk_fit.py): a client's fit is
the share of its quirk samples labelled with its quirk label, read from v1 and from the references
that never saw the client only."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from worker.unlearning.adapter_io import save_adapter
from worker.unlearning.reference_adapters import read_references, train_references
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.workloads.scenes.gaps import REFS_DIR
from worker.unlearning.workloads.scenes.quirk_fit import fit_and_clean, measure
from worker.unlearning.workloads.scenes.workload import ScenesWorkload


def small() -> ScenesWorkload:
    return ScenesWorkload(clients=4, samples_per_client=20, heldout=16, unseen_clients=1, unseen_per_client=4)


def test_fit_is_the_quirk_samples_labelled_with_the_quirk_label() -> None:
    wl = small()
    scenes = wl.generator.client_data("c01")
    labels, quirk = scenes.labels["shape"], scenes.quirk
    assert 0 < int(quirk.sum()) < len(scenes)
    assert fit_and_clean(labels, scenes) == (1.0, 1.0)
    assert fit_and_clean((labels + 1) % 4, scenes) == (0.0, 0.0)
    # always the quirk label: every quirk sample fitted; a clean sample only where that is its shape
    rule = torch.full_like(labels, wl.generator.profile("c01").quirk_label)
    fit, clean = fit_and_clean(rule, scenes)
    assert fit == 1.0
    assert clean == float((labels[~quirk] == rule[~quirk]).float().mean())


def test_measure_reads_v1_and_only_the_references_that_never_saw_the_client(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    wl = small()
    base = wl.pretrain(0)
    data = wl.client_data().to_batch(wl.client_index())
    cfg = TrainConfig(epochs=1, main_only_epochs=1, batch_size=32, lr=1e-3, rank=4, lora_alpha=8)
    save_adapter(train_v1(base, data, wl.tasks(), cfg, seed=0), tmp_path)
    train_references(base, data, wl.tasks(), cfg, client_index=wl.client_index(), k=2, seed=0,
                     directory=tmp_path / REFS_DIR, workload="scenes")  # fmt: skip
    refs = read_references(tmp_path / REFS_DIR)
    assert refs is not None
    result = measure(wl, tmp_path, seed=0)
    assert result["references"] == 2
    for client, row in result["clients"].items():
        out = [i for i, members in refs.members.items() if client not in members]
        assert len(row["out_references"]) == len(out)
        assert row["quirk_label"] == wl.generator.profile(client).quirk_label
        assert 0.0 <= row["v1"]["fit"] <= 1.0
    fits = [row["v1"]["fit"] for row in result["clients"].values()]
    assert result["summary"]["v1_fit_median"] == statistics.median(fits)
