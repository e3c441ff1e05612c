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
    assert bool((data.inputs["x"] == expected.inputs["x"]).all())
    assert len(store.heldout()) == 16
    # materialising again keeps the existing store (and its purge log)
    store.purge([ForgetSpec("r0", "client", "u0", None, [])])
    again = DataStore.materialise(store.data_dir, ToyWorkload())
    assert again.purged_clients == ["u0"]


class _GroupedHeldout(ToyWorkload):
    """The toy with its held-out rows drawn from three unseen clients (the rest of no client)."""

    def heldout_clients(self) -> dict[str, str]:
        return {f"h{i:03d}": f"n{i % 3}" for i in range(12)}


def test_heldout_clients_are_stored_beside_the_heldout_rows(tmp_path: Path) -> None:
    grouped = DataStore.materialise(tmp_path / "grouped", _GroupedHeldout())
    assert grouped.heldout_clients() == _GroupedHeldout().heldout_clients()
    assert len(grouped.heldout()) == 16  # rows h012… belong to no client and are not listed
    # a workload without unseen clients (and a store written before them): none
    assert DataStore.materialise(tmp_path / "plain", ToyWorkload()).heldout_clients() == {}


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


def test_partial_client_purge_keeps_the_client_and_deletes_inputs_once_nothing_is_kept(
    store: DataStore,
) -> None:
    """Issue 9 item 1: a client request for some tasks purges those labels only (the client and its
    inputs stay); once every task's label of a sample is purged, its inputs go too; a later
    whole-client request deletes the shard."""
    u0 = store.sample_ids_of("u0")
    report = store.purge([ForgetSpec("p1", "client", "u0", None, ["kind"])])
    assert report.deleted_clients == []
    assert report.deleted_samples == []
    assert sorted(report.purged_pairs) == sorted((s, "kind") for s in u0)
    reloaded = DataStore(store.data_dir)
    assert reloaded.purged_clients == []
    shard = reloaded.client_samples("u0")
    assert shard is not None
    assert shard.sample_ids == u0
    assert bool((shard.labels["kind"] == IGNORE).all())
    assert not bool((shard.labels["side"] == IGNORE).any())

    report = reloaded.purge([ForgetSpec("p2", "task", None, u0[:3], ["side"])])
    assert report.deleted_samples == sorted(u0[:3])
    assert reloaded.sample_ids_of("u0") == u0[3:]
    assert (
        DataStore(store.data_dir).purge([ForgetSpec("p2", "task", None, u0[:3], ["side"])]).deleted_samples
        == []
    )

    report = DataStore(store.data_dir).purge([ForgetSpec("p3", "client", "u0", None, [])])
    assert report.deleted_clients == ["u0"]
    assert not (store.data_dir / "clients" / "u0.npz").exists()


def test_round_state_pairs_covering_every_task_forget_the_sample() -> None:
    """Issue 9 item 1: the state agrees with the store: a sample forgotten task by task for every
    task is a forgotten sample (it never re-enters a retain set, not even the subset-ID head's)."""
    state = RoundState()
    state.add_pairs([("s1", "kind"), ("s2", "kind")], all_tasks=["kind", "side"])
    assert state.forgotten_samples == []
    state.add_pairs([("s1", "side")], all_tasks=["kind", "side"])
    assert state.forgotten_samples == ["s1"]
    assert state.is_excluded("s1", "u0")
    assert not state.is_excluded("s2", "u0")
