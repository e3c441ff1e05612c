"""Partitions D_f, D_r^task, D_r^inst, D_r^clean (interference paper Eq. 3) are exact."""

from __future__ import annotations

import pytest
import torch

from worker.unlearning.engine import request_anchor_key
from worker.unlearning.partitions import (
    ForgetSelection,
    anchor_indices,
    anchor_key,
    anchor_seed,
    build_partitions,
    retain_set,
)
from worker.unlearning.state import RoundState
from worker.unlearning.types import IGNORE, Batch, ForgetSpec
from worker.unlearning.workload import SampleSet

TASKS = ["a", "b", "c"]
CLIENTS = {"k0": 0, "k1": 1, "k2": 2}


def _data() -> SampleSet:
    # 12 samples, 4 per client; labels encode (row, task) so that every pair is identifiable.
    n = 12
    ids = [f"s{i:02d}" for i in range(n)]
    owners: list[str | None] = [f"k{i // 4}" for i in range(n)]
    labels = {t: torch.arange(n) * 10 + j for j, t in enumerate(TASKS)}
    return SampleSet(
        inputs={"x": torch.arange(n, dtype=torch.float32)[:, None]},
        sample_ids=ids,
        client_ids=owners,
        labels=labels,
    )


def _pairs(batch: Batch) -> set[tuple[str, str]]:
    return {
        (s, t)
        for t in TASKS
        for s, y in zip(batch.sample_ids, batch.labels[t].tolist(), strict=True)
        if y != IGNORE
    }


def _all_pairs(ids: list[str], tasks: list[str]) -> set[tuple[str, str]]:
    return {(s, t) for s in ids for t in tasks}


def test_client_request_full_task_partitions_are_exact() -> None:
    data = _data()
    forget = ["s04", "s05", "s06", "s07"]
    parts = build_partitions(
        data,
        ForgetSelection(forget, TASKS),
        tasks=TASKS,
        client_index=CLIENTS,
        state=RoundState(),
        anchor_fraction=1.0,
    )
    assert parts.forget_tasks == TASKS
    assert parts.retain_tasks == []
    assert _pairs(parts.forget) == _all_pairs(forget, TASKS)
    assert len(parts.retain_task) == 0
    assert len(parts.retain_clean) == 0
    retained = [s for s in data.sample_ids if s not in forget]
    assert _pairs(parts.retain_inst) == _all_pairs(retained, TASKS)
    assert parts.anchor_sample_ids == retained
    assert parts.forget.subset.tolist() == [1, 1, 1, 1]
    # labels are carried unchanged
    assert parts.forget.labels["b"].tolist() == [41, 51, 61, 71]


def test_task_request_partial_task_partitions_are_exact() -> None:
    data = _data()
    forget = ["s00", "s09"]
    parts = build_partitions(
        data,
        ForgetSelection(forget, ["b"]),
        tasks=TASKS,
        client_index=CLIENTS,
        state=RoundState(),
        anchor_fraction=1.0,
    )
    retained = [s for s in data.sample_ids if s not in forget]
    assert parts.forget_tasks == ["b"]
    assert parts.retain_tasks == ["a", "c"]
    assert _pairs(parts.forget) == _all_pairs(forget, ["b"])
    assert _pairs(parts.retain_task) == _all_pairs(forget, ["a", "c"])
    assert _pairs(parts.retain_inst) == _all_pairs(retained, ["b"])
    assert _pairs(parts.retain_clean) == _all_pairs(retained, ["a", "c"])
    # the four partitions tile X × T
    union = (
        _pairs(parts.forget)
        | _pairs(parts.retain_task)
        | _pairs(parts.retain_inst)
        | _pairs(parts.retain_clean)
    )
    assert union == _all_pairs(data.sample_ids, TASKS)


def test_forgotten_data_never_reenters() -> None:
    data = _data()
    state = RoundState()
    state.add_clients(["k0"])
    state.add_samples(["s08"])
    state.add_pairs([("s09", "a"), ("s10", "c")])
    parts = build_partitions(
        data,
        ForgetSelection(["s11"], ["b"]),
        tasks=TASKS,
        client_index=CLIENTS,
        state=state,
        anchor_fraction=1.0,
    )
    everything = (
        _pairs(parts.forget)
        | _pairs(parts.retain_task)
        | _pairs(parts.retain_inst)
        | _pairs(parts.retain_clean)
    )
    assert not {s for s, _ in everything} & {"s00", "s01", "s02", "s03", "s08"}
    assert ("s09", "a") not in everything
    assert ("s10", "c") not in everything
    assert ("s09", "b") in everything
    retain = retain_set(data, ForgetSelection(["s11"], ["b"]), tasks=TASKS, client_index=CLIENTS, state=state)
    kept = _pairs(retain)
    assert kept == _all_pairs(["s04", "s05", "s06", "s07", "s09", "s10", "s11"], TASKS) - {
        ("s09", "a"),
        ("s10", "c"),
        ("s11", "b"),
    }


def test_anchor_subset_is_seeded_and_sized() -> None:
    data = _data()

    def build(seed: int) -> list[str]:
        parts = build_partitions(
            data,
            ForgetSelection(["s00"], TASKS),
            tasks=TASKS,
            client_index=CLIENTS,
            state=RoundState(),
            anchor_fraction=0.25,
            seed=seed,
        )
        assert parts.retain_inst.sample_ids == parts.anchor_sample_ids
        return parts.anchor_sample_ids

    first = build(3)
    assert build(3) == first
    assert len(first) == 3  # ceil(0.25 · 11)
    assert "s00" not in first
    idx = [anchor_indices(100, 0.1, s).tolist() for s in range(5)]
    assert all(len(i) == 10 and i == sorted(set(i)) for i in idx)
    assert len({tuple(i) for i in idx}) > 1


def test_anchor_key_follows_the_request_content_not_its_id() -> None:
    """The same request content gives the same anchor (a reproducible adapter); a different
    subject, task set or ``anchor_draw`` gives another one. Order of ids and tasks does not count."""
    key = anchor_key("task", None, ["s2", "s1"], ["b", "a"])
    assert key == anchor_key("task", None, ["s1", "s2"], ["a", "b"])
    assert anchor_seed(0, key) == anchor_seed(0, anchor_key("task", None, ["s1", "s2"], ["a", "b"], 0))
    others = [
        anchor_key("task", None, ["s1"], ["a", "b"]),
        anchor_key("task", None, ["s1", "s2"], ["a"]),
        anchor_key("client", "c1", None, []),
        anchor_key("task", None, ["s1", "s2"], ["a", "b"], draw=1),
    ]
    assert len({anchor_seed(0, k) for k in [key, *others]}) == 5
    assert anchor_seed(0, key) != anchor_seed(1, key)  # the worker seed counts too


def test_request_anchor_key_rejects_a_non_integer_draw() -> None:
    spec = ForgetSpec("r1", "client", "c1", None, [])
    assert request_anchor_key(spec, {}) == request_anchor_key(spec, {"anchor_draw": 0})
    for bad in (True, 1.5, "1"):
        with pytest.raises(ValueError, match="anchor_draw"):
            request_anchor_key(spec, {"anchor_draw": bad})
