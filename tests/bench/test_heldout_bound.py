"""``bench.heldout_bound`` (docs/benchmarks.md, "The held-out bound") on the toy workload: every
(v1, exact retrain) pair judged with the tolerance alone and with the paired change's noise term."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import heldout_bound
from bench.seeded_workloads import SeededWorkloads
from worker.unlearning.workloads.toy import ToyWorkload


def test_every_pair_is_judged_and_the_noise_term_passes_at_least_what_the_tolerance_passes(
    tmp_path: Path,
) -> None:
    wl = ToyWorkload(num_clients=3, per_client=12)
    result = heldout_bound.measure_seed(SeededWorkloads(wl), 0, 2, tmp_path)
    assert result["forgotten"] == "u0"
    assert set(result["tasks"]) == {t.name for t in wl.tasks()}
    for r in result["tasks"].values():
        assert r["pairs"] == 4
        assert 0 <= r["flat_passed"] <= r["noisy_passed"] <= r["pairs"]  # the bound only widens
        assert r["se_median"] >= 0
        assert r["allowed_median"] >= 0.05
        assert len(r["v1"]) == len(r["retrain"]) == 2


def test_cli_writes_the_json_and_refuses_no_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def toy(name: str, options: dict[str, object]) -> SeededWorkloads:
        built.append((name, options))
        return SeededWorkloads(ToyWorkload(num_clients=3, per_client=12))

    monkeypatch.setattr(heldout_bound, "SeededWorkloads", toy)
    out = tmp_path / "bound.json"
    assert heldout_bound.main(["--seeds", "0", "--runs", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["runs"] == 1
    assert [s["seed"] for s in data["seeds"]] == [0]
    assert "cpu_capability" in data["environment"]
    assert built == [("digits-clients", {})]
    with pytest.raises(SystemExit):
        heldout_bound.main(["--runs", "0"])


def test_a_preset_builds_the_workload_with_its_bench_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.unlearning.workloads.scenes.bench_protocol import QUICK

    built: list[SeededWorkloads] = []

    def measured(workloads: SeededWorkloads, *args: object) -> dict[str, object]:
        built.append(workloads)
        return {"tasks": {}}

    monkeypatch.setattr(heldout_bound, "measure_seed", measured)
    assert (
        heldout_bound.main(["--workload", "scenes", "--preset", "quick", "--seeds", "0", "--runs", "1"]) == 0
    )
    assert built[0].options == dict(QUICK.workload_options)
