"""The quality bench's PNG plots (issue 7 part 6): UIS by method × stage, UIS against wall time.

Rendered from a small synthetic result (no training), so this is fast; the quality bench itself
writes them beside its JSON (tests/bench/test_quality.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from matplotlib.patches import Rectangle

from bench import cli, plots

METHODS = ["original", "retrain", "ssd", "default"]
SETTINGS = ["FU", "PU:digit"]


def _result() -> dict[str, Any]:
    """3 seeds × 2 settings × 2 stages × 4 methods; ``retrain`` is the reference (no UIS)."""
    runs: list[dict[str, Any]] = []
    for seed in range(3):
        for setting in SETTINGS:
            for stage in (1, 2):
                for k, method in enumerate(METHODS):
                    runs.append(
                        {
                            "setting": setting,
                            "stage": stage,
                            "method": method,
                            "seed": seed,
                            "uis": None if method == "retrain" else 0.1 * k + 0.01 * seed + 0.02 * stage,
                            "wall_s": {"original": 0.0, "retrain": 4.0, "ssd": 0.2, "default": 0.5}[method],
                            "importance_precompute_s": 0.1 if method == "default" else 0.0,
                            "tasks": {},
                            "close": None,
                        }
                    )
    return {"runs": runs, "meta": {"methods": METHODS, "seeds": [0, 1, 2], "workload": "toy", "preset": "x"}}


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_plot_command_renders_both_pngs_beside_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "quick.json"
    saved.write_text(json.dumps(_result()))
    assert cli.main(["plot", str(saved)]) == 0
    by_stage, vs_wall = tmp_path / "quick-uis-by-stage.png", tmp_path / "quick-uis-vs-wall.png"
    assert capsys.readouterr().out.split() == [str(by_stage), str(vs_wall)]
    per_panel = (round(plots.PANEL_INCHES[0] * plots.DPI), round(plots.PANEL_INCHES[1] * plots.DPI))
    assert _png_size(by_stage) == (per_panel[0] * len(SETTINGS), per_panel[1])
    assert _png_size(vs_wall) == (
        round(plots.WALL_INCHES[0] * plots.DPI),
        round(plots.WALL_INCHES[1] * plots.DPI),
    )
    assert cli.main(["plot", str(saved), "--out", str(tmp_path / "docs")]) == 0
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == [by_stage.name, vs_wall.name]


def test_uis_by_stage_has_one_panel_per_setting_with_median_bars_and_seed_spread() -> None:
    fig = plots.uis_by_stage_figure(_result())
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == SETTINGS
    # one bar per scored method (not the reference) per stage
    bars = [p for p in axes[0].patches if isinstance(p, Rectangle)]
    assert len(bars) == 3 * 2
    heights = sorted(round(b.get_height(), 6) for b in bars)
    # stage 1 medians (seed 1): original 0.03, ssd 0.23, default 0.33; stage 2 + 0.02
    assert heights == [0.03, 0.05, 0.23, 0.25, 0.33, 0.35]
    labels = axes[-1].get_legend_handles_labels()[1]
    assert labels == ["original", "ssd", "default"]


def test_uis_vs_wall_is_log_x_with_the_retrain_line() -> None:
    fig = plots.uis_vs_wall_figure(_result())
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["original", "ssd", "default", "retrain (median)"]
    # a run with no measurable wall time is drawn at the floor, not dropped by log x
    assert ax.get_xlim()[0] <= plots.MIN_WALL_S


def test_a_result_without_uis_or_runs_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"runs": [{"setting": "FU", "stage": 1, "method": "retrain", "uis": None}]}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", str(empty)])
    assert exit_info.value.code == 2
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        cli.main(["plot", str(other)])
    assert not list(tmp_path.glob("*.png"))
