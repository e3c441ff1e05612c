"""Where a method's distance to the reference retrain comes from: its target, or its landing
(``lethe bench budget``; scoring only, JSON alone).

    lethe bench budget RESULT.json [RESULT.json …] [--method default] [--json OUT]

A ``--method`` row with a reference target aimed early stopping at that target; what it kept is the
target plus a **landing error** (kept model − target), and the target is the reference retrain plus
a **target error** (target − retrain). The row is close when their sum is within 0.05 of the
retrain on both the forget-set metric and the MIA AUC. Per request-task of a run that also has a
second retrain of the same request (``retrain_2``, the noise floor the goal compares with), this
reports per group (workload, reference design, request kind, task): request-tasks; how many the
method, ``retrain_2`` and the targets themselves are close for; each error's standard deviation;
and the correlation between the two errors.

Then, per workload and design over all its request-tasks (what the goal's ratio reads), a grid:
the close count if each request's target error were scaled by ``t`` towards ``retrain_2`` (``t =
0``: a target as good as another retrain) and its landing error by ``l`` (``l = 0``: early stopping
keeps the target itself), with its ratio to ``retrain_2``'s close count. ``t = l = 1`` is what the
method measured.

A model, not a prediction: it keeps each request's landing error (size and direction) when its
target moves. Where the two errors are correlated that is not so: a path that cannot reach a far
target stops nearer the retrain than the target is, and a better target changes where it stops
(docs/benchmarks.md, "What the close share needs").
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.closeness import aimed_targets, close_flags, number
from bench.compare import load_result, results_parser
from bench.target_error import METRICS, Group, reference_design, target_kind, workload_label

#: the grid's scales of the target error (rows) and the landing error (columns)
SCALES = (1.0, 0.75, 0.5, 0.25, 0.0)


@dataclass(frozen=True)
class RequestTask:
    """One request-task's values per metric (keyed by the target's names): the reference retrain's,
    ``retrain_2``'s, the aimed target's and the kept model's; and whether the method's row was
    close (as scored when it ran)."""

    retrain: dict[str, float]
    second: dict[str, float]
    target: dict[str, float]
    kept: dict[str, float]
    close: bool

    def target_error(self, metric: str) -> float:
        return self.target[metric] - self.retrain[metric]

    def landing_error(self, metric: str) -> float:
        return self.kept[metric] - self.target[metric]


def _values(values: Mapping[str, Any] | None) -> dict[str, float] | None:
    """``values``' forget-set metric and MIA AUC keyed by the target's names; ``None`` if one is not
    measured."""
    out = {}
    for name, row_key in METRICS:
        value = number((values or {}).get(row_key))
        if value is None:
            return None
        out[name] = value
    return out


Row = Mapping[str, Any]


def _request_task(task: str, retrain: Row, second: Row, aimed: Row, row: Row) -> RequestTask | None:
    """``task`` of a method's ``row`` (which aimed at ``aimed``) beside the ``retrain`` and
    ``retrain_2`` rows of its run; ``None`` if a value is not measured."""
    measured = [_values(retrain["tasks"].get(task)), _values(second["tasks"].get(task))]
    measured += [_values(aimed.get(task)), _values(row["tasks"].get(task))]
    if any(v is None for v in measured):
        return None
    truth, second_values, target, kept = (v for v in measured if v is not None)
    return RequestTask(truth, second_values, target, kept, close=bool(row["close"][task]))


def request_tasks(
    results: Iterable[Mapping[str, Any]], method: str = "default"
) -> dict[Group, list[RequestTask]]:
    """Per group, one entry per request-task of a ``method`` row with a reference target whose run
    has a reference retrain and a ``retrain_2``; a run in two files counts once (from the first)."""
    out: dict[Group, list[RequestTask]] = {}
    seen: set[tuple[str, str, str, int, int, str]] = set()
    for result in results:
        workload, design = workload_label(result), reference_design(result)
        rows = {(r["method"], r["setting"], r["stage"], r["seed"]): r for r in result["runs"]}
        for (name, setting, stage, seed), row in rows.items():
            aimed = aimed_targets(row.get("target")) if name == method else None
            retrain = rows.get(("retrain", setting, stage, seed))
            second = rows.get(("retrain_2", setting, stage, seed))
            if aimed is None or retrain is None or second is None:
                continue
            row_design = design + target_kind(row["target"])
            for task in row.get("close") or {}:
                entry = _request_task(task, retrain, second, aimed, row)
                key = (workload, row_design, setting, stage, seed, task)
                if entry is None or key in seen:
                    continue
                seen.add(key)
                kind = "FU" if setting == "FU" else "PU"
                out.setdefault((workload, row_design, kind, task), []).append(entry)
    return out


def _close(values: Mapping[str, float], retrain: Mapping[str, float]) -> bool:
    """Whether ``values`` is close to ``retrain`` by the benchmark's one definition
    (:func:`bench.closeness.close_flags`, which reads a row's keys)."""

    def row(v: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
        return {"task": {row_key: v[name] for name, row_key in METRICS}}

    return close_flags(row(values), row(retrain), ["task"])["task"]


def scaled_close(entries: Sequence[RequestTask], target_scale: float, landing_scale: float) -> int:
    """How many of ``entries`` would be close with each target error scaled by ``target_scale``
    towards ``retrain_2`` and each landing error by ``landing_scale`` (1, 1: the kept models)."""
    count = 0
    for e in entries:
        target = {m: e.second[m] + target_scale * (e.target[m] - e.second[m]) for m, _ in METRICS}
        kept = {m: target[m] + landing_scale * e.landing_error(m) for m, _ in METRICS}
        count += _close(kept, e.retrain)
    return count


def _correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def summary(entries: Sequence[RequestTask]) -> dict[str, Any]:
    """A group's close counts (the method as scored, ``retrain_2``, the targets) and per metric the
    target error's and the landing error's sd and their correlation (``None`` below three
    request-tasks)."""
    out: dict[str, Any] = {
        "request_tasks": len(entries),
        "close": sum(e.close for e in entries),
        "retrain_2_close": sum(_close(e.second, e.retrain) for e in entries),
        "targets_close": sum(_close(e.target, e.retrain) for e in entries),
    }
    for metric, _ in METRICS:
        target = [e.target_error(metric) for e in entries]
        landing = [e.landing_error(metric) for e in entries]
        enough = len(entries) >= 2
        out[metric] = {
            "target_bias": statistics.fmean(target),
            "target_sd": statistics.pstdev(target) if enough else None,
            "landing_bias": statistics.fmean(landing),
            "landing_sd": statistics.pstdev(landing) if enough else None,
            "correlation": _correlation(target, landing),
        }
    return out


def grid(entries: Sequence[RequestTask], scales: Sequence[float] = SCALES) -> list[list[int]]:
    """:func:`scaled_close` for every (target scale, landing scale): rows the target's, columns the
    landing's."""
    return [[scaled_close(entries, t, landing) for landing in scales] for t in scales]


def _f(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None else fmt.format(value)


def format_summary(group: Group, s: Mapping[str, Any]) -> str:
    workload, design, kind, task = group
    lines = [f"{workload} {design} {kind}:{task}: {s['request_tasks']} request-tasks; close: method "
             f"{s['close']}, retrain_2 {s['retrain_2_close']}, targets {s['targets_close']}"]  # fmt: skip
    for metric, _ in METRICS:
        c = s[metric]
        lines.append(f"  {metric:<9} target error {_f(c['target_bias'], '{:+.3f}')} ± {_f(c['target_sd'])}  "
                     f"landing error {_f(c['landing_bias'], '{:+.3f}')} ± {_f(c['landing_sd'])}  "
                     f"correlation {_f(c['correlation'], '{:+.2f}')}")  # fmt: skip
    return "\n".join(lines)


def format_grid(label: str, entries: Sequence[RequestTask], counts: Sequence[Sequence[int]]) -> str:
    floor = sum(_close(e.second, e.retrain) for e in entries)
    lines = [f"{label}: {len(entries)} request-tasks; close count (÷ retrain_2's {floor}) with the target "
             "error scaled by t (rows) and the landing error by l (columns)"]  # fmt: skip
    lines.append("          " + "".join(f"l={s:<12g}" for s in SCALES))
    for t, row in zip(SCALES, counts, strict=True):
        cells = "".join(f"{c:>4} ({_f(c / floor if floor else None, '{:.2f}')})   " for c in row)
        lines.append(f"  t={t:<6g}" + cells.rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench budget") -> int:
    parser = results_parser(prog, __doc__, "whose rows' targets and kept models (default: default)")
    args = parser.parse_args(argv)
    try:
        groups = request_tasks((load_result(Path(p)) for p in args.results), args.method)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    if not groups:
        parser.error(f"no {args.method!r} row with a reference target, a retrain and a retrain_2 here")
    summaries = {g: summary(entries) for g, entries in sorted(groups.items())}
    for g, s in summaries.items():
        print(format_summary(g, s))
    designs: dict[tuple[str, str], list[RequestTask]] = {}
    for (workload, design, _, _), entries in sorted(groups.items()):
        designs.setdefault((workload, design), []).extend(entries)
    grids = {d: grid(entries) for d, entries in designs.items()}
    for (workload, design), counts in grids.items():
        print(format_grid(f"{workload} {design}, all", designs[workload, design], counts))
    if args.json_path is not None:
        doc = {
            "files": list(args.results),
            "scales": list(SCALES),
            "groups": [
                {"workload": g[0], "references": g[1], "kind": g[2], "task": g[3], **s}
                for g, s in summaries.items()
            ],
            "grids": [
                {"workload": w, "references": d, "request_tasks": len(designs[w, d]), "close": counts}
                for (w, d), counts in grids.items()
            ],
        }
        args.json_path.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
