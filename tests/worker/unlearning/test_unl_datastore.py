"""DataStore: client shards, purges (client, samples, task labels), idempotence."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.unlearning.datastore import DataStore
from worker.unlearning.partitions import ForgetSelection, retain_set
from worker.unlearning.state import RoundState
from worker.unlearning.types import IGNORE, ForgetSpec
from worker.unlearning.workloads.toy import ToyWorkload


@pytest.fixture
def store(tmp_path: Path) -> DataStore:
    return DataStore.materialise(tmp_path / "data", ToyWorkload())


def test_materialise_writes_client_shards(store: DataStore) -> None:
    assert store.clients == ["u0", "u1", "u2"]
    for c in store.clients:
        assert (store.data_dir / "clients" / f"{c}.npz").exists()
    data = store.client_data()
    assert len(data) == 36
    assert data.client_ids[:12] == ["u0"] * 12
    expected = ToyWorkload().client_data()
    assert data.sample_ids == expected.sample_ids
    assert bool((data.x == expected.x).all())
    assert len(store.heldout()) == 16
    # materialising again keeps the existing store (and its purge log)
    store.purge([ForgetSpec("r0", "client", "u0", None, [])])
    again = DataStore.materialise(store.data_dir, ToyWorkload())
    assert again.purged_clients == ["u0"]


def test_client_purge_deletes_raw_samples_and_is_idempotent(store: DataStore) -> None:
    spec = ForgetSpec("r1", "client", "u1", None, [])
    report = store.purge([spec])
    assert report.deleted_clients == ["u1"]
    assert not (store.data_dir / "clients" / "u1.npz").exists()
    assert store.client_samples("u1") is None
    assert "u1" not in store.client_data().client_ids
    again = DataStore(store.data_dir).purge([spec])
    assert again.deleted_clients == []
    assert DataStore(store.data_dir).purged_clients == ["u1"]


def test_task_purge_removes_labels_only(store: DataStore) -> None:
    ids = ["t00001", "t00003"]
    spec = ForgetSpec("r2", "task", "u0", ids, ["side"])
    report = store.purge([spec])
    assert sorted(report.purged_pairs) == [("t00001", "side"), ("t00003", "side")]
    reloaded = DataStore(store.data_dir)
    shard = reloaded.client_samples("u0")
    assert shard is not None
    assert len(shard) == 12
    rows = [shard.sample_ids.index(s) for s in ids]
    assert all(int(shard.labels["side"][r]) == IGNORE for r in rows)
    assert all(int(shard.labels["kind"][r]) != IGNORE for r in rows)
    assert reloaded.purge([spec]).purged_pairs == []


def test_sample_purge_removes_rows(store: DataStore) -> None:
    spec = ForgetSpec("r3", "task", "u2", ["t02000"], ["kind", "side"])
    assert store.purge([spec]).deleted_samples == ["t02000"]
    assert "t02000" not in store.client_data().sample_ids
    assert len(store.client_data()) == 35


def test_purged_data_never_reenters_retain_set(store: DataStore) -> None:
    store.purge(
        [
            ForgetSpec("a", "client", "u1", None, []),
            ForgetSpec("b", "task", "u0", ["t00002"], ["kind"]),
        ]
    )
    data = DataStore(store.data_dir).client_data()
    retain = retain_set(
        data,
        ForgetSelection([], []),
        tasks=["kind", "side"],
        client_index=store.client_index(),
        state=RoundState(),
    )
    assert not any(s.startswith("t01") for s in retain.sample_ids)
    row = retain.sample_ids.index("t00002")
    assert int(retain.labels["kind"][row]) == IGNORE


def test_resolve_rejects_bad_requests(store: DataStore) -> None:
    with pytest.raises(ValueError, match="unknown client"):
        store.resolve(ForgetSpec("x", "client", "nobody", None, []))
    with pytest.raises(ValueError, match="unknown tasks"):
        store.resolve(ForgetSpec("x", "task", "u0", None, ["nope"]))
    with pytest.raises(ValueError, match="needs tasks"):
        store.resolve(ForgetSpec("x", "task", "u0", None, []))
    with pytest.raises(ValueError, match="not u0's"):
        store.resolve(ForgetSpec("x", "task", "u0", ["t01000"], ["kind"]))
