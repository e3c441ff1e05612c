"""The text table ``lethe bench`` prints: medians over seeds per (setting, stage, method), the goals
per (setting, stage), and the pooled lines under it (earlier forget sets, per-client targets)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.closeness import CLOSE_TOLERANCE
from bench.scoring import (
    APPROXIMATE_METHODS,
    RETAINED_TOLERANCE,
    SECOND_RETRAIN,
    earlier_by_method,
    served_paths,
    target_close_by_method,
)


def _gap(v: float | None) -> str:
    """A gap in metric points (0.031 → "3.1")."""
    return "—" if v is None else f"{100 * v:.1f}"


def _fmt(v: float | None, width: int = 6, digits: int = 3) -> str:
    return f"{'—':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def format_table(result: Mapping[str, Any]) -> str:
    summary = result["summary"]
    tasks = sorted({t for row in summary for t in row["tasks"]})
    head = f"{'setting':<16}{'stage':>5} {'method':<13}{'UIS':>7}{'close':>7}{'wall_s':>8}{'ahead_s':>8}"
    for t in tasks:
        head += f" | {t[:10]:<10} {'ret':>5} {'unl':>5} {'val':>5} {'mia':>5}"
    meta = result["meta"]
    tuning = meta.get("tuning", {})
    lines = [
        f"lethe bench — medians over evaluation seeds {meta['seeds']}; close = share of request-tasks "
        f"with forget-set accuracy and MIA AUC within {meta.get('close_tolerance', CLOSE_TOLERANCE)} "
        "of the reference retrain's",
        f"anchor fraction {meta.get('anchor_fraction')} for every method; knobs "
        f"{'tuned on' if tuning.get('ran') else 'committed, tuned on'} seeds {tuning.get('seeds')}: "
        f"{tuning.get('chosen')}"
        + (
            f"; untuned (the workload's settings): {', '.join(meta['untuned_methods'])}"
            if meta.get("untuned_methods")
            else ""
        ),
        head,
        "-" * len(head),
    ]
    for row in summary:
        line = f"{row['setting']:<16}{row['stage']:>5} {row['method']:<13}"
        line += f"{_fmt(row['uis'], 7)}{_fmt(row.get('close_fraction'), 7, 2)}{_fmt(row['wall_s'], 8, 2)}"
        line += _fmt(row.get("importance_precompute_s"), 8, 2)
        for t in tasks:
            m = row["tasks"].get(t, {})
            line += f" | {'':<10} " + " ".join(_fmt(m.get(k), 5, 2) for k in ("ret", "unl", "val", "mia_auc"))
        lines.append(line)
    goals = result.get("goals")
    if goals:
        lines.append("")
        lines.append(
            f"goal 1 — default has the lowest median UIS of {', '.join(APPROXIMATE_METHODS)}: "
            f"{goals['default_lowest_uis_count']} (setting, stage) pairs"
        )
        for c in goals["per_stage"]:
            ratio, total = c["default_over_retrain_wall"], c.get("default_with_precompute_over_retrain_wall")
            lines.append(
                f"  {c['setting']:<16} stage {c['stage']}: lowest UIS = {c['lowest_uis_method']} "
                f"(all methods: {c.get('lowest_uis_all_methods')}); wall default/retrain = "
                f"{'—' if ratio is None else f'{ratio:.2f}'} "
                f"(with the importance computed ahead: {'—' if total is None else f'{total:.2f}'})"
            )
        lines.append(
            f"goal 2 — default median wall ≤ 1/10 of retrain's: {goals.get('wall_goal_met_count')} "
            f"(with the importance computed ahead: {goals.get('wall_goal_met_with_precompute_count')})"
        )
        lines.append(
            f"close — default's close share ≥ 0.9× {SECOND_RETRAIN}'s: {goals.get('close_goal_met_count')} "
            "(setting, stage) pairs"
            + (
                f"; what a round publishes (default+served): {goals['served_close_goal_met_count']}"
                if goals.get("served_close_goal_met_count")
                else ""
            )
        )
        if goals.get("retained_goal_met_count"):
            lines.append(
                f"retained — default's kept tasks on X_f and Val within {RETAINED_TOLERANCE:g} of the "
                f"retrain's (medians over seeds): {goals['retained_goal_met_count']} (setting, stage) pairs"
                + (
                    f"; default+served: {goals['served_retained_goal_met_count']}"
                    if goals.get("served_retained_goal_met_count")
                    else ""
                )
                + "; largest gaps per stage, default / "
                + f"{SECOND_RETRAIN}: "
                + ", ".join(
                    f"{_gap(c.get('default_retained_gap'))} / {_gap(c.get('retrain_2_retained_gap'))}"
                    for c in goals["per_stage"]
                )
            )
    earlier = earlier_by_method(result.get("runs", []))
    if earlier:
        lines.append(_earlier_line(earlier))
    targets = target_close_by_method(result.get("runs", []))
    if targets:
        lines.append(
            f"per-client targets within {meta.get('close_tolerance', CLOSE_TOLERANCE)} of the reference "
            "retrain (scoring only; the method's own close count after it): "
            + "; ".join(
                f"{m} {t['target_close']}/{t['n']} (close {t['close']}/{t['n']})" for m, t in targets.items()
            )
        )
    paths = served_paths(result.get("runs", []))
    if paths:
        lines.append(
            "served (what a round publishes; failed = published with a failed check): "
            + "; ".join(f"{m} " + ", ".join(f"{p} {n}" for p, n in c.items()) for m, c in paths.items())
        )
    protocol = meta.get("protocol")
    if protocol:
        lines.append(
            f"the {meta['preset']!r} protocol of {protocol['declared_by']}: {protocol.get('note', '')}"
            + _departures(meta, protocol)
        )
    cpu = meta.get("cpu_s")
    lines.append(
        f"total wall: {meta['total_wall_s']:.0f}s"
        + (f"; CPU {cpu:.0f}s over {meta.get('jobs', 1)} seed process(es)" if cpu is not None else "")
    )
    return "\n".join(lines)


def _departures(meta: Mapping[str, Any], protocol: Mapping[str, Any]) -> str:
    """What this run changed of its protocol (``--workload-option``, ``--request-settings``), so
    that the protocol's note is not read as the run's."""
    declared = dict(protocol.get("workload_options") or {})
    used = dict(meta.get("workload_options") or {})
    # the protocol's own options that the run changed first, then options it added
    changed = [
        f"{k}={used[k]}"
        for k in sorted(used, key=lambda k: (k not in declared, k))
        if k not in declared or used[k] != declared[k]
    ]
    settings = meta.get("setting_names")
    if (
        settings is not None
        and protocol.get("settings") is not None
        and list(settings) != list(protocol["settings"])
    ):
        changed.append("settings " + ", ".join(settings))
    return f". This run: {'; '.join(changed)}" if changed else ""


def _earlier_line(earlier: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for m, e in earlier.items():
        rise = (
            ""
            if e["rise"] is None
            else f", risen since its stage {e['risen']}/{e['n']} (median {e['rise']:+.3f})"
        )
        parts.append(f"{m} {e['gap']:+.3f}{rise}")
    return (
        "earlier forget sets — accuracy on the forget sets of the earlier stages minus the reference "
        "retrain's (stages ≥ 2, median over seeds and request-tasks), and how many rose by more than "
        f"{CLOSE_TOLERANCE} since the request's own stage (a later request undid some forgetting): "
        + "; ".join(parts)
    )
