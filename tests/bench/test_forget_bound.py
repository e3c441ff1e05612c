"""``bench.forget_bound`` (docs/methods.md, "The forget bound's noise") on the toy workload: per
client an exact retrain and v1 judged by the acceptance check's forget bound, one-sample and
two-sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import forget_bound
from bench.seeded_workloads import SeededWorkloads
from worker.unlearning.workloads.toy import ToyWorkload


def test_every_client_task_is_judged_and_the_two_sample_bound_only_widens(tmp_path: Path) -> None:
    wl = ToyWorkload(num_clients=3, per_client=12)
    result = forget_bound.measure_seed(SeededWorkloads(wl), 0, tmp_path, clients=2, references=0)
    assert [r["client"] for r in result["clients"]] == ["u0", "u1"]
    tasks = {t.name for t in wl.tasks()}
    for row in result["clients"]:
        for key in ("retrain_one_sample", "retrain_two_sample", "v1_one_sample", "v1_two_sample"):
            assert set(row[key]) == tasks
        assert "allowance" not in row
        assert "retrain_with_allowance" not in row
        for label in ("retrain", "v1"):  # the levels the bound compares
            assert set(row["levels"][label]) == tasks
            assert all(set(v) == {"forget", "heldout"} for v in row["levels"][label].values())
        for task in tasks:
            one, two = row["retrain_one_sample"][task], row["retrain_two_sample"][task]
            assert not (one["ok"] and not two["ok"])  # what passes the one-sample bound passes both
            assert "SE of the difference" in two["detail"]
            assert "SE of the difference" not in one["detail"]
            # v1 judged against itself: it fails exactly where it had memorised the client
            v1 = row["v1_two_sample"][task]
            assert v1["ok"] is not v1["memorised"]
    counts = forget_bound.summary([result])
    assert counts["one_sample"]["client_tasks"] == counts["two_sample"]["client_tasks"] == 2 * len(tasks)
    assert counts["two_sample"]["retrain_failed"] <= counts["one_sample"]["retrain_failed"]
    assert counts["two_sample"]["v1_caught"] <= counts["one_sample"]["v1_caught"]


def test_cli_writes_the_json_with_its_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def toy(name: str, options: dict[str, object]) -> SeededWorkloads:
        built.append((name, options))
        return SeededWorkloads(ToyWorkload(num_clients=3, per_client=12))

    monkeypatch.setattr(forget_bound, "SeededWorkloads", toy)
    out = tmp_path / "bound.json"
    argv = ["--seeds", "0", "--clients", "1", "--workload-option", "per_client=12", "--json", str(out)]
    assert forget_bound.main(argv) == 0
    data = json.loads(out.read_text())
    assert [s["seed"] for s in data["seeds"]] == [0]
    assert set(data["summary"]) == {"one_sample", "two_sample"}
    assert "cpu_capability" in data["environment"]
    assert built == [("digits-clients", {"per_client": 12})]
    # clients by name, and settings over the workload's (its reference adapters here)
    picked = ["--seeds", "0", "--client", "u2", "--settings", '{"audit": {"reference_adapters": 2}}']
    assert forget_bound.main([*picked, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["client"] for r in data["seeds"][0]["clients"]] == ["u2"]
    assert data["seeds"][0]["references"] == 2
    assert data["settings"] == {"audit": {"reference_adapters": 2}}
    assert set(data["summary"]) == {"one_sample", "two_sample", forget_bound.WITH_ALLOWANCE}
    with pytest.raises(SystemExit):
        forget_bound.main(["--seeds", "0", "--client", "nobody"])
    with pytest.raises(SystemExit):
        forget_bound.main(["--clients", "0"])
    with pytest.raises(SystemExit):
        forget_bound.main(["--workload-option", "no-equals-sign"])


def test_with_references_a_failed_bound_is_read_again_with_their_allowance(tmp_path: Path) -> None:
    wl = ToyWorkload(num_clients=4, per_client=24)
    tasks = {t.name for t in wl.tasks()}
    raised = 0
    # six seeds: on this toy a two-sample bound fails where the references find the client easier
    # in 3 client-tasks of 36 (seeds 0 and 4), on the default and the AVX2 kernels alike
    for seed in range(6):
        result = forget_bound.measure_seed(SeededWorkloads(wl), seed, tmp_path, clients=3, references=2)
        assert result["references"] == 2
        for row in result["clients"]:
            assert set(row["allowance"]) == tasks  # every client is OUT for one of two halves
            for label in ("retrain", "v1"):
                two, read = row[f"{label}_two_sample"], row[f"{label}_{forget_bound.WITH_ALLOWANCE}"]
                for task in tasks:
                    if two[task]["ok"]:  # the allowance only reads a failed bound again
                        assert read[task] == two[task]
                        continue
                    allowance = max(0.0, row["allowance"][task])
                    raised += allowance > 0
                    if read[task]["margin"] is None:  # raised above v1's own level: nothing to show
                        assert read[task]["ok"]
                        assert read[task]["detail"].endswith("(nothing to show)")
                        continue
                    assert read[task]["margin"] == pytest.approx(two[task]["margin"] + allowance, abs=2e-6)
        counts = forget_bound.summary([result])
        with_allowance = counts[forget_bound.WITH_ALLOWANCE]
        assert with_allowance["retrain_failed"] <= counts["two_sample"]["retrain_failed"]
        assert with_allowance["v1_caught"] <= counts["two_sample"]["v1_caught"]
    assert raised


def test_a_second_run_reads_its_trainings_from_the_cache_and_judges_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forget_bound, "SeededWorkloads",
                        lambda *_: SeededWorkloads(ToyWorkload(num_clients=3, per_client=12)))  # fmt: skip
    argv = [
        "--seeds",
        "0",
        "--clients",
        "2",
        "--references",
        "2",
        "--training-cache",
        str(tmp_path / "cache"),
    ]
    runs = []
    for name in ("first", "second"):
        assert forget_bound.main([*argv, "--json", str(tmp_path / f"{name}.json")]) == 0
        runs.append(json.loads((tmp_path / f"{name}.json").read_text()))
    # v1, the reference set and two retrains: trained and stored, then read back
    assert {k: runs[0]["training_cache"][k] for k in ("hits", "misses")} == {"hits": 0, "misses": 4}
    assert {k: runs[1]["training_cache"][k] for k in ("hits", "misses")} == {"hits": 4, "misses": 0}
    assert runs[0]["seeds"] == runs[1]["seeds"]  # every check, level and allowance; the retrains' seconds
