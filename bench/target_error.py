"""How far early stopping's per-client targets are from the reference retrain, and how much of that
the references' own disagreement explains (``lethe bench targets``; scoring only, JSON alone).

    lethe bench targets RESULT.json [RESULT.json …] [--method default] [--json OUT]

For every ``--method`` row with a reference target, per request-task: the target it aimed at
(:func:`bench.closeness.aimed_targets`, shifts included) minus the reference retrain's forget-set
metric and MIA AUC. Rows are grouped by workload, reference design (K references, the IN share, task
withholding; a target read from the best reference's accuracy apart), request kind (``FU``: per
client; ``PU``: per task) and task, and pooled over the files (a run in two files counts once, from
the first).

Per group: request-tasks, **targets close** (both errors within 0.05), and per metric the error's
mean (bias) and standard deviation, beside what the references' disagreement implies. A target is
the median of the n OUT references' values; if those scatter around their own mean with standard
deviation σ, independently, their median scatters by σ·√m(n) (m(n): the variance of the median
of n standard normals; 1/n for n ≤ 2), and their spread (max − min) has E[spread²] = c(n)·σ².
So σ² is estimated from the rows' spreads, and **noise** is √(mean of σ²·m(n)) over the rows. The
**rest**, √(sd² − noise²), is the error that more references drawn the same way would leave: the
references train on another set of clients than the retrain does (a share of them, not all the
others), and the reference retrain's own randomness: where the results have a second retrain of
the same request (``retrain_2``), **a retrain's own sd** is √(mean (retrain_2 − retrain)² / 2), and
the rest beyond it what the references' training sets add. **With N**: √(rest² + σ²·m(N)), the sd
that N OUT references per client would give.

A model, not a measurement of the floor: references that share clients disagree less than
independent ones, so their spread understates σ and the rest overstates what stays (docs/benchmarks.md,
"The targets' error, split", compares it with a run that had more OUT references).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.closeness import CLOSE_TOLERANCE, aimed_targets, number
from bench.compare import load_result, results_parser

METRICS = (("accuracy", "unl"), ("mia_auc", "mia_auc"))  # (the target's spread key, the row's key)
PROJECTED = (2, 4, 8)
# the design suffix of a group whose per-task targets were read from task-withheld references
TASK_WITHHELD = " task-withheld targets"
_DRAWS = 200_000  # normal samples per n for m(n) and c(n): their error is under 1 %

Group = tuple[str, str, str, str]  # (workload, references, kind, task)


@functools.cache
def order_factors(n: int) -> tuple[float, float]:
    """(m(n), c(n)) for n standard normals: the variance of their median, and the mean square of
    their range (max − min). Exact for n ≤ 2 (1 or 1/2; 0 or 2), else from a fixed-seed draw."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if n <= 2:
        return 1.0 / n, 2.0 * (n - 1)
    x = np.random.default_rng(n).standard_normal((_DRAWS, n))
    spread = x.max(axis=1) - x.min(axis=1)
    return float(np.median(x, axis=1).var()), float((spread**2).mean())


def workload_label(result: Mapping[str, Any]) -> str:
    """``scenes(clients=8,samples_per_client=1500)``: the workload and its options (a pool of another
    size is another model)."""
    meta = result.get("meta") or {}
    options = meta.get("workload_options") or {}
    if isinstance(options, str):  # a result of before the options were a mapping
        return f"{meta.get('workload') or '?'}({options})"
    inner = ",".join(f"{k}={v}" for k, v in sorted(dict(options).items()))
    return f"{meta.get('workload') or '?'}({inner})"


def reference_design(result: Mapping[str, Any]) -> str:
    """``K4 f0.5`` (and ``withheld`` where IN references withheld task labels) from a result's meta."""
    meta = result.get("meta") or {}
    if "references" not in meta:  # a stopped run's .partial.jsonl keeps only its seeds
        return "references unknown"
    audit = dict((meta.get("settings_overrides") or {}).get("audit") or {})
    k = (meta.get("references") or {}).get("k")
    label = f"K{k if k is not None else '?'} f{float(audit.get('reference_in_fraction', 0.5)):g}"
    return label + (" withheld" if audit.get("reference_withhold_tasks") else "")


def target_errors(
    results: Iterable[Mapping[str, Any]], method: str = "default"
) -> dict[Group, list[dict[str, Any]]]:
    """Per group, one entry per request-task: the aimed target's error on each metric, the number of
    OUT references, and their spread on each metric."""
    out: dict[Group, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str, str, int, int, str]] = set()
    for result in results:
        workload = workload_label(result)
        design = reference_design(result)
        runs = result["runs"]
        retrains = {(r["setting"], r["stage"], r["seed"]): r for r in runs if r["method"] == "retrain"}
        seconds = {(r["setting"], r["stage"], r["seed"]): r for r in runs if r["method"] == "retrain_2"}
        for r in runs:
            key = (r["setting"], r["stage"], r["seed"])
            aimed = aimed_targets(r.get("target")) if r["method"] == method else None
            if aimed is None or key not in retrains:
                continue
            row_design = design + target_kind(r["target"])
            for task in r.get("close") or {}:
                entry = _entry(
                    aimed.get(task), r["target"]["tasks"].get(task), retrains[key]["tasks"].get(task)
                )
                if entry is None or (workload, row_design, *key, task) in seen:
                    continue
                seen.add((workload, row_design, *key, task))
                if key in seconds:
                    entry["retrain_2"] = _differences(
                        seconds[key]["tasks"].get(task), retrains[key]["tasks"][task]
                    )
                kind = "FU" if r["setting"] == "FU" else "PU"
                out.setdefault((workload, row_design, kind, task), []).append(entry)
    return out


def target_kind(target: Mapping[str, Any]) -> str:
    """What sets a row's target apart from the references' median of OUT references, as a suffix of
    its group's design: the best reference's accuracy, and (rows written since 7 Dec say so) a
    per-task target read from task-withheld references."""
    kind = " best-accuracy" if target.get("accuracy_reference") == "best" else ""
    return kind + (TASK_WITHHELD if target.get("calibration") == "task_withheld" else "")


def _entry(
    aimed: Mapping[str, float | None] | None,
    references: Mapping[str, Any] | None,
    retrain: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    if aimed is None or references is None or retrain is None:
        return None
    errors = _differences(aimed, retrain)
    if errors is None:
        return None
    spread = dict(references.get("spread") or {})
    return {
        "error": errors,
        "references": int(references.get("references") or 1),
        "spread": {m: number(spread.get(m)) for m, _ in METRICS},
    }


def _differences(
    values: Mapping[str, float | None] | None, retrain: Mapping[str, Any]
) -> dict[str, float] | None:
    """Per metric, ``values`` minus the retrain's (keyed by the spread's names); ``None`` if one is
    not measured."""
    out = {}
    for spread_key, row_key in METRICS:
        mine, truth = number((values or {}).get(row_key)), number(retrain.get(row_key))
        if mine is None or truth is None:
            return None
        out[spread_key] = mine - truth
    return out


def split(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A group's targets close and, per metric, bias, sd, noise, rest and the sd with N references
    (the module's docstring); ``None`` where fewer than two entries or no spread say it."""
    out: dict[str, Any] = {
        "request_tasks": len(entries),
        "targets_close": sum(all(abs(e["error"][m]) <= CLOSE_TOLERANCE for m, _ in METRICS) for e in entries),
        "out_references": statistics.median(e["references"] for e in entries) if entries else None,
    }
    for metric, _ in METRICS:
        errors = [float(e["error"][metric]) for e in entries]
        spreads = [(e["references"], e["spread"][metric]) for e in entries]
        per_reference = [s**2 / order_factors(n)[1] for n, s in spreads if n >= 2 and s is not None]
        cell: dict[str, Any] = {"bias": statistics.fmean(errors) if errors else None, "sd": None}
        if len(errors) >= 2:
            cell["sd"] = statistics.pstdev(errors)
        if cell["sd"] is not None and per_reference:
            sigma2 = statistics.fmean(per_reference)
            noise2 = statistics.fmean(sigma2 * order_factors(n)[0] for n, _ in spreads)
            rest2 = max(cell["sd"] ** 2 - noise2, 0.0)
            cell |= {
                "sigma": math.sqrt(sigma2),
                "noise": math.sqrt(noise2),
                "rest": math.sqrt(rest2),
                "with": {n: math.sqrt(rest2 + sigma2 * order_factors(n)[0]) for n in PROJECTED},
            }
        seconds = [float(e["retrain_2"][metric]) for e in entries if e.get("retrain_2")]
        if len(seconds) >= 2:
            # two retrains of the same request differ by two draws of a retrain's own randomness
            cell["retrain_sd"] = math.sqrt(statistics.fmean(d**2 for d in seconds) / 2)
            cell["retrain_pairs"] = len(seconds)
            if "rest" in cell:
                cell["rest_beyond_retrain"] = math.sqrt(max(cell["rest"] ** 2 - cell["retrain_sd"] ** 2, 0.0))
        out[metric] = cell
    return out


def _f(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None else fmt.format(value)


def _read_from(design: str) -> str:
    return "task-withheld" if design.endswith(TASK_WITHHELD) else "OUT"


def format_split(group: Group, s: Mapping[str, Any]) -> str:
    workload, design, kind, task = group
    parts = [f"{workload} {design} {kind}:{task}: {s['targets_close']}/{s['request_tasks']} targets close "
             f"(median {_f(s['out_references'], '{:g}')} {_read_from(design)} references)"]  # fmt: skip
    for metric, _ in METRICS:
        c = s[metric]
        line = f"  {metric:<9} bias {_f(c['bias'], '{:+.3f}')}  sd {_f(c['sd'])}"
        if "noise" in c:
            projected = "  ".join(f"N={n} {_f(v)}" for n, v in c["with"].items())
            line += f"  noise {_f(c['noise'])} (σ per reference {_f(c['sigma'])})"
            line += f"  rest {_f(c['rest'])}  | {projected}"
        if "retrain_sd" in c:
            line += f"  | a retrain's own sd {_f(c['retrain_sd'])} ({c['retrain_pairs']} pairs)"
            if "rest_beyond_retrain" in c:
                line += f", rest beyond it {_f(c['rest_beyond_retrain'])}"
        parts.append(line)
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench targets") -> int:
    parser = results_parser(prog, __doc__, "whose rows' targets (default: default)")
    args = parser.parse_args(argv)
    try:
        groups = target_errors((load_result(Path(p)) for p in args.results), args.method)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    if not groups:
        parser.error(f"no {args.method!r} row with a reference target and a retrain in these results")
    splits = {g: split(entries) for g, entries in sorted(groups.items())}
    for g, s in splits.items():
        print(format_split(g, s))
    if args.json_path is not None:
        rows = [
            {"workload": g[0], "references": g[1], "kind": g[2], "task": g[3], **s} for g, s in splits.items()
        ]
        args.json_path.write_text(json.dumps({"files": list(args.results), "groups": rows}, indent=2) + "\n")
    return 0
