"""PNG plots of a quality-bench result, written next to its JSON.

* ``<stem>-uis-by-stage.png``: per setting (one panel each), the median UIS of every method at
  every stage, grouped bars, with the spread over seeds (min … max) as error bars.
* ``<stem>-uis-vs-wall.png``: UIS against wall time (log x), every run a small dot and each
  method's median a large marker; the reference retrain's median wall is the dashed line.

UIS is the distance to the reference retrain (0: indistinguishable from it; lower is better). The
wall time of a run is its method's seconds plus the full-data importance it read (computed ahead):
the work a request costs, none of it hidden. ``python -m bench plot RESULT.json`` re-renders the
plots of a saved result. matplotlib is the optional extra ``bench`` (``pip install 'lethe[bench]'``);
the figures are drawn with its object API (no pyplot state), so any backend setting is left alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

#: every figure is this many pixels per inch (the PNGs' sizes follow from their inches)
DPI = 100
PANEL_INCHES = (4.2, 3.6)  # one setting's panel of the UIS-by-stage figure
WALL_INCHES = (6.4, 4.2)
#: the x of a run that took no measurable time (``original``), so that log x can show it
MIN_WALL_S = 1e-3
#: the method that scores the others: it has no UIS, its wall time is the dashed line
REFERENCE = "retrain"


def plot_paths(json_path: Path | str) -> tuple[Path, Path]:
    """Where the two PNGs of the result at ``json_path`` go: beside it, named after it."""
    path = Path(json_path)
    return (
        path.with_name(f"{path.stem}-uis-by-stage.png"),
        path.with_name(f"{path.stem}-uis-vs-wall.png"),
    )


def _methods(result: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The methods with a UIS, in the result's order (``meta.methods``, then any other)."""
    scored = {r["method"] for r in runs if r.get("uis") is not None}
    listed = [m for m in result.get("meta", {}).get("methods", []) if m in scored]
    return listed + sorted(scored - set(listed))


def _settings(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(r["setting"]) for r in runs}, key=lambda s: (s != "FU", s))


def _total_wall(run: Mapping[str, Any]) -> float:
    return float(run["wall_s"]) + float(run.get("importance_precompute_s") or 0.0)


def uis_by_stage_figure(result: Mapping[str, Any]) -> Figure:
    """Median UIS per method × stage, one panel per setting; error bars: min … max over seeds."""
    runs = list(result["runs"])
    methods, settings = _methods(result, runs), _settings(runs)
    if not methods:
        raise ValueError("the result has no run with a UIS to plot")
    fig = Figure(figsize=(PANEL_INCHES[0] * len(settings), PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(settings), squeeze=False, sharey=True)[0]
    width = 0.8 / len(methods)
    seeds = result.get("meta", {}).get("seeds", [])
    for ax, setting in zip(axes, settings, strict=True):
        stages = sorted({int(r["stage"]) for r in runs if r["setting"] == setting})
        for k, method in enumerate(methods):
            xs, medians, low, high = [], [], [], []
            for stage in stages:
                values = [
                    float(r["uis"])
                    for r in runs
                    if (r["setting"], int(r["stage"]), r["method"]) == (setting, stage, method)
                    and r.get("uis") is not None
                ]
                if not values:
                    continue
                mid = statistics.median(values)
                xs.append(stage - 0.4 + width * (k + 0.5))
                medians.append(mid)
                low.append(mid - min(values))
                high.append(max(values) - mid)
            ax.bar(xs, medians, width=width, yerr=[low, high], capsize=2, label=method, color=f"C{k}")
        ax.set_title(setting)
        ax.set_xlabel("stage (sequential request)")
        ax.set_xticks(stages)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("UIS (median; bars: seed min … max)")
    axes[-1].legend(fontsize="small", title=f"seeds {seeds}" if seeds else None, title_fontsize="small")
    fig.suptitle(_title(result, "UIS by method × stage (lower: closer to the retrain)"))
    return fig


def uis_vs_wall_figure(result: Mapping[str, Any]) -> Figure:
    """UIS against wall time (log x): every run a dot, each method's median a large marker."""
    runs = list(result["runs"])
    methods = _methods(result, runs)
    if not methods:
        raise ValueError("the result has no run with a UIS to plot")
    fig = Figure(figsize=WALL_INCHES, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for k, method in enumerate(methods):
        mine = [r for r in runs if r["method"] == method and r.get("uis") is not None]
        walls = [max(_total_wall(r), MIN_WALL_S) for r in mine]
        scores = [float(r["uis"]) for r in mine]
        ax.scatter(walls, scores, s=10, alpha=0.35, color=f"C{k}")
        ax.scatter(
            [statistics.median(walls)],
            [statistics.median(scores)],
            s=90,
            color=f"C{k}",
            edgecolors="black",
            label=method,
        )
    reference = [_total_wall(r) for r in runs if r["method"] == REFERENCE]
    if reference:
        ax.axvline(statistics.median(reference), color="gray", linestyle="--", label=f"{REFERENCE} (median)")
    ax.set_xscale("log")
    ax.set_xlabel(f"wall time per request, s (method + importance computed ahead; log; ≥ {MIN_WALL_S:g})")
    ax.set_ylabel("UIS (lower: closer to the retrain)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title(_title(result, "UIS against wall time (dots: runs; large: medians)"), fontsize="medium")
    return fig


def _title(result: Mapping[str, Any], what: str) -> str:
    meta = result.get("meta", {})
    return f"{what}\nworkload {meta.get('workload', '?')}, preset {meta.get('preset', '?')}"


def write_plots(result: Mapping[str, Any], json_path: Path | str) -> list[Path]:
    """Render both plots of ``result`` beside ``json_path``; returns their paths."""
    by_stage, vs_wall = plot_paths(json_path)
    uis_by_stage_figure(result).savefig(by_stage, format="png")
    uis_vs_wall_figure(result).savefig(vs_wall, format="png")
    return [by_stage, vs_wall]


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench plot") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a quality-bench JSON (bench-results/quick-fair.json)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the PNGs go, named after it (default: the JSON's path)"
    )
    args = parser.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.result}: {exc}")
    if not isinstance(result, dict) or not isinstance(result.get("runs"), list):
        parser.error(f"{args.result} is not a quality-bench result (no 'runs' list)")
    target = args.result
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / args.result.name
    try:
        for path in write_plots(result, target):
            print(path)
    except ValueError as exc:
        parser.error(str(exc))
    return 0
