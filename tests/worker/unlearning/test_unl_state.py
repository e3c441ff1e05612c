"""RoundState: JSON round trip, and the state handed from one sequential round to the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worker.unlearning.adapter_io import load_adapter
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import ForgetSpec, RoundState, prepare, run_round
from worker.unlearning.ssd import weights_digest
from worker.unlearning.types import SUBSET_HEAD
from worker.unlearning.workloads.toy import ToyWorkload


def test_state_json_round_trip(tmp_path: Path) -> None:
    state = RoundState()
    state.add_clients(["b", "a", "a"])
    state.add_samples(["s2", "s1"])
    state.add_pairs([("s3", "t"), ("s3", "t"), ("s0", "u")])
    state.add_pruned([4, 1, 4])
    state.importance_cache_key = "abc"
    state.requests.append("r1")
    data = state.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["forgotten_clients"] == ["a", "b"]
    assert data["forgotten_pairs"] == [["s0", "u"], ["s3", "t"]]
    assert data["pruned_subset_outputs"] == [1, 4]
    assert RoundState.from_json(data) == state
    state.save(tmp_path)
    assert RoundState.load(tmp_path) == state
    with pytest.raises(FileNotFoundError):
        RoundState.load(tmp_path / "missing")


def test_sequential_rounds_hand_state_over(tmp_path: Path) -> None:
    torch.manual_seed(0)
    workload = ToyWorkload()
    dirs = {k: tmp_path / k for k in ("data", "base", "v1", "v2", "v3")}
    prepared = prepare(
        workload, data_dir=dirs["data"], base_dir=dirs["base"], adapter_dir=dirs["v1"], settings={}, seed=0
    )
    assert sorted(prepared.subjects) == ["u0", "u1", "u2"]
    v1_state = RoundState.load(dirs["v1"])
    # the importance cache key is the digest of the version's trainable weights, as loaded back
    v1_key = weights_digest(load_adapter(dirs["base"], dirs["v1"], trainable=True))
    # v1's held-out level per task: what the acceptance check keeps later versions near
    assert set(v1_state.original_val) == {t.name for t in workload.tasks()}
    assert v1_state == RoundState(version=1, importance_cache_key=v1_key, original_val=v1_state.original_val)
    common = {"data_dir": dirs["data"], "base_dir": dirs["base"], "settings": {}, "seed": 0}
    first = run_round(
        workload,
        adapter_in=dirs["v1"],
        adapter_out=dirs["v2"],
        requests=[ForgetSpec("r1", "client", "u0", None, [])],
        method="retrain",
        **common,  # type: ignore[arg-type]
    )
    assert first.state.forgotten_clients == ["u0"]
    assert first.state.pruned_subset_outputs == [0]
    assert RoundState.load(dirs["v2"]) == first.state
    # the pipeline purges after publishing
    DataStore(dirs["data"]).purge([ForgetSpec("r1", "client", "u0", None, [])])
    ids = ["t01000", "t01001"]
    second = run_round(
        workload,
        adapter_in=dirs["v2"],
        adapter_out=dirs["v3"],
        requests=[ForgetSpec("r2", "task", "u1", ids, ["side"])],
        method="retrain",
        **common,  # type: ignore[arg-type]
    )
    state = RoundState.load(dirs["v3"])
    assert state == second.state
    assert state.version == 3
    assert state.requests == ["r1", "r2"]
    assert state.forgotten_clients == ["u0"]
    assert state.pruned_subset_outputs == [0]
    assert state.forgotten_pairs == [("t01000", "side"), ("t01001", "side")]
    assert state.importance_cache_key == weights_digest(
        load_adapter(dirs["base"], dirs["v3"], trainable=True)
    )
    evidence = second.evidence["r2"]
    assert evidence["forget_tasks"] == ["side"]
    assert not any(s.startswith("t00") for s in evidence["anchor"]["sample_ids"])
    # pruning persists: the forgotten client's subset-ID output stays suppressed
    model = load_adapter(dirs["base"], dirs["v3"])
    with torch.no_grad():
        logits = model(workload.client_data().inputs)[SUBSET_HEAD]
    assert bool((logits.argmax(-1) != 0).all())
