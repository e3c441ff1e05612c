"""The printed table of ``lethe bench``: a run that changed its workload's protocol says so."""

from __future__ import annotations

from typing import Any

from bench.report import format_table


def _result(workload_options: dict[str, Any], setting_names: list[str]) -> dict[str, Any]:
    protocol = {
        "declared_by": "scenes",
        "note": "a bench-only pool (400 samples each)",
        "workload_options": {"clients": 8, "samples_per_client": 400},
        "settings": ["FU", "PU:shape"],
    }
    meta = {
        "preset": "quick",
        "protocol": protocol,
        "workload_options": workload_options,
        "setting_names": setting_names,
        "seeds": [0],
        "total_wall_s": 1.0,
    }
    return {"runs": [], "summary": [], "goals": {}, "meta": meta}


def test_the_protocol_line_names_what_the_run_changed() -> None:
    changed = format_table(_result({"clients": 8, "samples_per_client": 1500, "heldout": 100}, ["FU"]))
    line = next(x for x in changed.splitlines() if x.startswith("the 'quick' protocol"))
    assert line.endswith(". This run: samples_per_client=1500; heldout=100; settings FU")
    same = format_table(_result({"clients": 8, "samples_per_client": 400}, ["FU", "PU:shape"]))
    line = next(x for x in same.splitlines() if x.startswith("the 'quick' protocol"))
    assert line.endswith("(400 samples each)")
