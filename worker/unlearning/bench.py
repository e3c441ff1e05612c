"""``lethe bench``: methods × settings × sequential stages × seeds on the default workload.

``run_bench(preset="quick", json_path=..., seeds=...)`` is what the CLI calls. For every seed it
trains v1 once, then for each setting — ``FU`` (full-task client requests) and ``PU:<task>``
(partial-task: one task of one client's samples) — runs 3 sequential stages (a different client each).
At every stage the retain set is the same for all methods, so one ``retrain`` per stage serves both
as the ``retrain`` method's run and as the reference of everybody's UIS. ``original`` does nothing.

``measure_workload`` measures what makes the workload worth auditing (docs/workloads.md): per
client, the original–retrain gap on the forget set (accuracy, loss-MIA AUC) and the retrain's Val
spread over seeds. ``python -m worker.unlearning.bench --help``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import (
    EngineInputs,
    advance_state,
    apply_method,
    compute_reference,
    ensure_base,
    evaluate,
    full_importance_settings,
    precompute_next_importance,
    prepare,
    request_context,
    request_evidence,
    run_round,
    training_data,
)
from worker.unlearning.runtime import runtime_environment
from worker.unlearning.ssd import precompute_full_importance
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig, retrain, train_v1
from worker.unlearning.types import Batch, ForgetSpec, TaskSpec
from worker.unlearning.workload import Workload, deep_merge, load_workload

APPROXIMATE_METHODS = ["ssd", "ia", "default"]  # goal 1 of the issue compares these three
METHODS = ["original", "retrain", *APPROXIMATE_METHODS]


def registered_methods() -> list[str]:
    """Every method of the registry: the bounds first, ``default`` last, the rest by name."""
    from worker.unlearning.methods import available_methods

    names = set(available_methods())
    middle = sorted(names - {"original", "retrain", "default"})
    return (
        [m for m in ("original", "retrain") if m in names]
        + middle
        + (["default"] if "default" in names else [])
    )


@dataclass(frozen=True)
class Preset:
    seeds: tuple[int, ...]
    stages: int
    settings: tuple[str, ...] | None  # None: FU and PU:<task> for every task
    overrides: Mapping[str, Any]
    methods: tuple[str, ...] | None = tuple(METHODS)  # None: every method of the registry


PRESETS: dict[str, Preset] = {
    "quick": Preset(seeds=(0, 1, 2), stages=3, settings=None, overrides={}),
    "full": Preset(seeds=(0, 1, 2, 3, 4), stages=3, settings=None, overrides={}, methods=None),
    # a smoke run for tests: one seed, one setting, a tiny training recipe
    "smoke": Preset(
        seeds=(0,),
        stages=2,
        settings=("FU",),
        overrides={"train": {"epochs": 3, "main_only_epochs": 1}, "pretrain": {"epochs": 2}},
    ),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _settings_list(workload: Workload, preset: Preset) -> list[str]:
    if preset.settings is not None:
        return list(preset.settings)
    return ["FU", *[f"PU:{t.name}" for t in workload.tasks()]]


def _stage_specs(setting: str, clients: Sequence[str], seed: int, stages: int) -> list[ForgetSpec]:
    order = np.random.default_rng(10_000 + seed).permutation(len(clients))[:stages]
    picked = [clients[int(i)] for i in order]
    if setting == "FU":
        return [ForgetSpec(f"fu-{seed}-{k}-{c}", "client", c, None, []) for k, c in enumerate(picked, 1)]
    if setting.startswith("PU:"):
        task = setting.split(":", 1)[1]
        return [
            ForgetSpec(f"pu-{task}-{seed}-{k}-{c}", "task", c, None, [task]) for k, c in enumerate(picked, 1)
        ]
    raise ValueError(f"unknown setting {setting!r}")


def _row(
    setting: str,
    stage: int,
    method: str,
    seed: int,
    evidence: Mapping[str, Any],
    wall: float,
    precompute: float = 0.0,
) -> dict[str, Any]:
    tasks: dict[str, dict[str, float | None]] = {}
    for name, ev in dict(evidence.get("tasks", {})).items():
        tasks[name] = {
            "ret": _num(ev.get("ret")),
            "unl": _num(ev.get("unl")),
            "val": _num(ev.get("val")),
            "mia_auc": _num(ev.get("mia_auc")),
        }
    uis_block = evidence.get("uis")
    uis = uis_block.get("value") if isinstance(uis_block, Mapping) else uis_block
    return {
        "setting": setting,
        "stage": stage,
        "method": method,
        "seed": seed,
        "uis": None if method in ("retrain",) or uis is None else float(uis),
        "wall_s": float(wall),
        # SSD's full-data importance this request read, computed ahead (after the previous request,
        # or for v1 before the first): work moved off the request, reported, not hidden
        "importance_precompute_s": float(precompute),
        "tasks": tasks,
    }


def _num(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return None if math.isnan(f) else f


def _seed_list(seeds: int | Sequence[int] | None, preset: Preset) -> list[int]:
    if isinstance(seeds, int):  # a number of seeds: 0 … seeds−1
        return list(range(seeds))
    return list(seeds) if seeds else list(preset.seeds)


def run_bench(
    preset: str = "quick",
    json_path: Path | str | None = None,
    seeds: int | Sequence[int] | None = None,
    *,
    workload: str | Workload = "digits-clients",
    methods: Sequence[str] | None = None,
    settings_overrides: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the benchmark; print a table (via ``echo``), write ``json_path``; return the JSON.

    ``preset``: ``quick`` (3 seeds, FU + PU:<each task>, 3 stages; ≤ 5 min on 2 cores), ``full``
    (5 seeds) or ``smoke``. ``seeds``: the seeds to run, or how many (0 … n−1); default the preset's.
    ``settings_overrides``: workload setting overrides merged over the preset's, e.g.
    ``{"ia": {"eta2": 0.2}}``.
    """
    # One intra-op thread: the networks are small, and extra threads only spin (measured: 2 threads
    # on a loaded 2-core machine made training ~10× slower).
    torch.set_num_threads(1)
    chosen = PRESETS[preset]
    seed_list = _seed_list(seeds, chosen)
    if not seed_list:
        raise ValueError("the benchmark needs at least one seed")
    if methods:
        method_list = list(methods)
    else:
        method_list = list(chosen.methods) if chosen.methods is not None else registered_methods()
    wl = load_workload(workload) if isinstance(workload, str) else workload
    settings = wl.settings(deep_merge(chosen.overrides, settings_overrides or {}))
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lethe-bench-") as tmp:
        root = Path(tmp)
        DataStore.materialise(root / "data", wl)
        ensure_base(wl, root / "base", settings, seed=0)  # the frozen base is the same for every seed
        for seed in seed_list:
            inputs = EngineInputs.load(
                wl,
                data_dir=root / "data",
                base_dir=root / "base",
                settings=settings,
                seed=seed,
                cache_dir=root / "cache",
            )
            cfg = TrainConfig.from_settings(inputs.settings)
            t0 = time.perf_counter()
            all_data = inputs.full_train_set()
            v1 = train_v1(inputs.base, all_data, inputs.tasks, cfg, seed=seed)
            v1_importance: dict[str, float] = {}  # SSD settings → seconds v1's I_D took (cached after)
            _log(f"[bench] seed {seed}: v1 trained in {time.perf_counter() - t0:.1f}s")
            for setting in _settings_list(wl, chosen):
                runs.extend(
                    _run_setting(inputs, v1, setting, seed, chosen.stages, method_list, v1_importance)
                )
                _log(f"[bench] seed {seed} {setting} done ({time.perf_counter() - t_start:.0f}s elapsed)")
    result: dict[str, Any] = {
        "runs": runs,
        "meta": {
            "preset": preset,
            "workload": wl.name,
            "seeds": seed_list,
            "methods": method_list,
            "stages": chosen.stages,
            "settings_overrides": dict(settings_overrides or {}),
            "torch_threads": torch.get_num_threads(),
            "environment": runtime_environment(),
            "total_wall_s": time.perf_counter() - t_start,
        },
    }
    result["summary"] = summarise(runs)
    result["goals"] = check_goals(result["summary"])
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    if echo is not None:
        echo(format_table(result))
    return result


def _run_setting(
    inputs: EngineInputs,
    v1: PeftModel,
    setting: str,
    seed: int,
    stages: int,
    methods: Sequence[str],
    v1_importance: dict[str, float],
) -> list[dict[str, Any]]:
    """One setting of one seed: ``stages`` sequential requests; every method keeps its own model.

    SSD's full-data importance (``I_D``) is computed ahead, as the engine does: v1's before stage 1
    (``prepare`` does it in production), each later model's right after the request that made it;
    the time is the row's ``importance_precompute_s`` (of the request that reads it). v1's is
    computed once per seed and SSD settings (``v1_importance`` keeps its time for every row that
    reads it, in every setting)."""
    rows: list[dict[str, Any]] = []
    specs = _stage_specs(setting, inputs.store.active_clients, seed, stages)
    state = RoundState()
    approx = [m for m in methods if m != "retrain"]
    models: dict[str, PeftModel] = {m: copy.deepcopy(v1) for m in approx}
    pruned: dict[str, list[int]] = {m: [] for m in approx}
    keys: dict[str, str | None] = dict.fromkeys(approx)
    ahead: dict[str, float] = dict.fromkeys(approx, 0.0)
    for stage, spec in enumerate(specs, start=1):
        ctx = request_context(inputs, spec, state, stage=stage, cache_key=None)
        if stage == 1:  # every method starts from v1: one I_D, computed once for all of them
            for method in approx:
                ssd_settings = full_importance_settings(method, inputs.settings)
                if ssd_settings is not None:
                    key, t = precompute_full_importance(
                        v1, training_data(ctx), ctx.tasks, ssd_settings, seed=seed, cache_dir=ctx.cache_dir
                    )
                    known = v1_importance.setdefault(json.dumps(ssd_settings, sort_keys=True), t)
                    keys[method], ahead[method] = key, known
        reference = compute_reference(ctx)
        if "retrain" in methods:
            ev = request_evidence(
                reference.model,
                ctx,
                method="retrain",
                method_info={},
                reference=None,
                original=None,
                timings={"method_s": reference.wall_s},
            )
            rows.append(_row(setting, stage, "retrain", seed, ev, reference.wall_s))
        for method in approx:
            model = models[method]
            # pruning belongs to some methods only: each method keeps its own pruned outputs
            # the method's own partitions (its anchor fraction, engine.anchor_fraction); same retain set
            ctx_m = request_context(inputs, spec, state, stage=stage, cache_key=keys[method], method=method)
            ctx_m.state.pruned_subset_outputs = list(pruned[method])
            original = evaluate(model, ctx_m)
            # no oracle: the method never sees the retrain (it only scores the method, below)
            model, info, newly, wall = apply_method(method, model, ctx_m)
            models[method] = model
            pruned[method] = sorted(set(pruned[method]) | set(newly))
            precompute = ahead[method]
            if stage < len(specs):
                keys[method], ahead[method] = precompute_next_importance(model, ctx_m, method)
            ev = request_evidence(
                model,
                ctx_m,
                method=method,
                method_info=info,
                reference=reference,
                original=original,
                timings={"method_s": wall},
                pruned=newly,
            )
            rows.append(_row(setting, stage, method, seed, ev, wall, precompute))
        advance_state(state, ctx, ctx.prune_outputs)
    return rows


# ----------------------------------------------------------------------------------------------
# summary and table
# ----------------------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def summarise(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Medians over seeds per (setting, stage, method)."""
    order = {m: i for i, m in enumerate(registered_methods())}
    keys = sorted(
        {(r["setting"], r["stage"], r["method"]) for r in runs},
        key=lambda k: (k[0], k[1], order.get(k[2], len(order)), k[2]),
    )
    out = []
    for setting, stage, method in keys:
        sel = [r for r in runs if (r["setting"], r["stage"], r["method"]) == (setting, stage, method)]
        tasks = sorted({t for r in sel for t in r["tasks"]})
        out.append(
            {
                "setting": setting,
                "stage": stage,
                "method": method,
                "n": len(sel),
                "uis": _median([r["uis"] for r in sel]),
                "wall_s": _median([r["wall_s"] for r in sel]),
                "importance_precompute_s": _median([r.get("importance_precompute_s", 0.0) for r in sel]),
                "wall_with_precompute_s": _median(
                    [r["wall_s"] + r.get("importance_precompute_s", 0.0) for r in sel]
                ),
                "tasks": {
                    t: {
                        k: _median([r["tasks"].get(t, {}).get(k) for r in sel])
                        for k in ("ret", "unl", "val", "mia_auc")
                    }
                    for t in tasks
                },
            }
        )
    return out


def check_goals(summary: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's goals, per (setting, stage): is ``default``'s median UIS the lowest among
    ``ssd``, ``ia`` and ``default`` (and, recorded too, among every approximate method run), and its
    median wall time ≤ 1/10 of ``retrain``'s — the method's own time, and with the full-data
    importance it read (computed ahead) added?"""
    by_key: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for row in summary:
        by_key.setdefault((row["setting"], int(row["stage"])), {})[row["method"]] = row
    checks: list[dict[str, Any]] = []
    for (setting, stage), rows in sorted(by_key.items()):
        approx = {m: rows[m]["uis"] for m in APPROXIMATE_METHODS if m in rows and rows[m]["uis"] is not None}
        # ties go to default (the goal is "lowest", not "strictly lowest")
        best = min(approx, key=lambda m: (approx[m], m != "default")) if approx else None
        others = {
            m: r["uis"] for m, r in rows.items() if m not in ("original", "retrain") and r["uis"] is not None
        }
        d_wall = rows["default"]["wall_s"] if "default" in rows else None
        d_total = rows["default"].get("wall_with_precompute_s") if "default" in rows else None
        r_wall = rows["retrain"]["wall_s"] if "retrain" in rows else None
        ratio = d_wall / r_wall if d_wall is not None and r_wall else None
        ratio_total = d_total / r_wall if d_total is not None and r_wall else None
        checks.append(
            {
                "setting": setting,
                "stage": stage,
                "lowest_uis_method": best,
                # ties count for default
                "default_lowest_uis": (approx["default"] <= min(approx.values()))
                if "default" in approx
                else None,
                "lowest_uis_all_methods": min(others, key=lambda m: (others[m], m != "default"))
                if others
                else None,
                "default_over_retrain_wall": ratio,
                "default_with_precompute_over_retrain_wall": ratio_total,
                "wall_goal_met": None if ratio is None else ratio <= 0.1,
                "wall_goal_met_with_precompute": None if ratio_total is None else ratio_total <= 0.1,
            }
        )
    met = [bool(c["default_lowest_uis"]) for c in checks if c["default_lowest_uis"] is not None]
    walls = [bool(c["wall_goal_met"]) for c in checks if c["wall_goal_met"] is not None]
    walls_total = [
        bool(c["wall_goal_met_with_precompute"])
        for c in checks
        if c["wall_goal_met_with_precompute"] is not None
    ]
    ratios = [c["default_over_retrain_wall"] for c in checks if c["default_over_retrain_wall"] is not None]
    return {
        "per_stage": checks,
        "default_lowest_uis_everywhere": bool(met) and all(met),
        "default_lowest_uis_count": f"{sum(met)}/{len(met)}",
        "wall_goal_met_everywhere": bool(walls) and all(walls),
        "wall_goal_met_count": f"{sum(walls)}/{len(walls)}",
        "wall_goal_met_with_precompute_count": f"{sum(walls_total)}/{len(walls_total)}",
        "median_default_over_retrain_wall": _median(ratios),
    }


def _fmt(v: float | None, width: int = 6, digits: int = 3) -> str:
    return f"{'—':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def format_table(result: Mapping[str, Any]) -> str:
    summary = result["summary"]
    tasks = sorted({t for row in summary for t in row["tasks"]})
    head = f"{'setting':<16}{'stage':>5} {'method':<13}{'UIS':>7}{'wall_s':>8}{'ahead_s':>8}"
    for t in tasks:
        head += f" | {t[:10]:<10} {'ret':>5} {'unl':>5} {'val':>5} {'mia':>5}"
    lines = [f"lethe bench — medians over seeds {result['meta']['seeds']}", head, "-" * len(head)]
    for row in summary:
        line = f"{row['setting']:<16}{row['stage']:>5} {row['method']:<13}"
        line += f"{_fmt(row['uis'], 7)}{_fmt(row['wall_s'], 8, 2)}"
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
    lines.append(f"total wall: {result['meta']['total_wall_s']:.0f}s")
    return "\n".join(lines)


def markdown_summary(result: Mapping[str, Any]) -> str:
    """The summary as a Markdown table (medians over seeds), for docs/benchmarks.md."""
    summary = result["summary"]
    tasks = sorted({t for row in summary for t in row["tasks"]})
    cols = ["setting", "stage", "method", "UIS", "wall s", "ahead s"]
    for t in tasks:
        cols += [f"{t} ret", f"{t} unl", f"{t} val", f"{t} MIA"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v: float | None, digits: int = 2) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    for row in summary:
        cells = [
            row["setting"],
            str(row["stage"]),
            row["method"],
            f(row["uis"], 3),
            f(row["wall_s"]),
            f(row.get("importance_precompute_s")),
        ]
        for t in tasks:
            m = row["tasks"].get(t, {})
            cells += [f(m.get(k)) for k in ("ret", "unl", "val", "mia_auc")]
        if row["method"] == "default":
            cells = [f"**{c}**" if i in (2, 3) else c for i, c in enumerate(cells)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# workload measurability (docs/workloads.md)
# ----------------------------------------------------------------------------------------------


def _auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """ROC-AUC of the score −loss for members vs non-members (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([-members.numpy(), -nonmembers.numpy()])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    return float(roc_auc_score(labels, scores))


def _eval(model: torch.nn.Module, batch: Batch, task: TaskSpec) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = model(batch.x)[task.name]
    target = batch.labels[task.name]
    supervised = target >= 0
    return task.metric(out, target), task.per_sample_loss(out, target)[supervised]


def measure_workload(
    workload: str = "digits-clients", seeds: Sequence[int] = (0, 1, 2), clients: Sequence[str] | None = None
) -> dict[str, Any]:
    """Original vs retrain on each forgotten client: accuracy and loss-MIA gaps; retrain Val spread."""
    torch.set_num_threads(1)
    wl = load_workload(workload)
    settings = wl.settings()
    with tempfile.TemporaryDirectory(prefix="lethe-measure-") as tmp:
        root = Path(tmp)
        DataStore.materialise(root / "data", wl)
        ensure_base(wl, root / "base", settings, seed=0)
        inputs = EngineInputs.load(
            wl, data_dir=root / "data", base_dir=root / "base", settings=settings, seed=0
        )
    cfg = TrainConfig.from_settings(inputs.settings)
    data = inputs.full_train_set()
    owners = inputs.data.client_ids
    picked = list(clients) if clients else wl.clients()
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        v1 = train_v1(inputs.base, data, inputs.tasks, cfg, seed=seed)
        for client in picked:
            idx = torch.tensor([o == client for o in owners], dtype=torch.bool)
            forget, keep = data.select(idx), data.select(~idx)
            ref = retrain(inputs.base, keep, inputs.tasks, cfg, seed=seed)
            row: dict[str, Any] = {"seed": seed, "client": client, "n": len(forget), "tasks": {}}
            for task in inputs.tasks:
                acc_o, loss_o = _eval(v1, forget, task)
                acc_r, loss_r = _eval(ref, forget, task)
                val_o, vloss_o = _eval(v1, inputs.heldout, task)
                val_r, vloss_r = _eval(ref, inputs.heldout, task)
                row["tasks"][task.name] = {
                    "acc_original": acc_o,
                    "acc_retrain": acc_r,
                    "acc_gap": acc_o - acc_r,
                    "mia_original": _auc(loss_o, vloss_o),
                    "mia_retrain": _auc(loss_r, vloss_r),
                    "val_original": val_o,
                    "val_retrain": val_r,
                }
                row["tasks"][task.name]["mia_gap"] = (
                    row["tasks"][task.name]["mia_original"] - row["tasks"][task.name]["mia_retrain"]
                )
            rows.append(row)
            _log(
                f"[measure] seed {seed} {client}: "
                + json.dumps({k: round(v["acc_gap"], 3) for k, v in row["tasks"].items()})
            )
    summary: dict[str, Any] = {}
    for task in inputs.tasks:
        t = task.name
        acc_gaps = [r["tasks"][t]["acc_gap"] for r in rows]
        mia_gaps = [r["tasks"][t]["mia_gap"] for r in rows]
        # Val spread of the retrain over seeds, per forgotten client (max − min), then its median/max.
        spreads = []
        for client in picked:
            vals = [r["tasks"][t]["val_retrain"] for r in rows if r["client"] == client]
            spreads.append(max(vals) - min(vals))
        summary[t] = {
            "median_acc_gap": statistics.median(acc_gaps),
            "min_acc_gap": min(acc_gaps),
            "median_mia_gap": statistics.median(mia_gaps),
            "min_mia_gap": min(mia_gaps),
            "clients_acc_gap_ge_0.10": sum(
                1
                for c in picked
                if statistics.median([r["tasks"][t]["acc_gap"] for r in rows if r["client"] == c]) >= 0.10
            ),
            "clients_mia_gap_ge_0.10": sum(
                1
                for c in picked
                if statistics.median([r["tasks"][t]["mia_gap"] for r in rows if r["client"] == c]) >= 0.10
            ),
            "median_val_retrain": statistics.median([r["tasks"][t]["val_retrain"] for r in rows]),
            "median_val_original": statistics.median([r["tasks"][t]["val_original"] for r in rows]),
            "median_val_spread_over_seeds": statistics.median(spreads),
            "max_val_spread_over_seeds": max(spreads),
        }
    return {"workload": workload, "seeds": list(seeds), "clients": picked, "rows": rows, "summary": summary}


def measure_latency(
    workload: str = "digits-clients", method: str = "default", seed: int = 0
) -> dict[str, Any]:
    """Wall time of ``prepare`` and of three ``run_round`` calls (client, partial-task, both)."""
    torch.set_num_threads(1)
    wl = load_workload(workload)
    clients = wl.clients()
    task = wl.tasks()[0].name
    rounds = {
        "client request": [ForgetSpec("a", "client", clients[3], None, [])],
        "partial-task request": [ForgetSpec("b", "task", clients[5], None, [task])],
        "client + partial-task": [
            ForgetSpec("c", "client", clients[1], None, []),
            ForgetSpec("d", "task", clients[7], None, [task]),
        ],
    }
    out: dict[str, Any] = {"workload": workload, "method": method, "seed": seed, "rounds": {}}
    with tempfile.TemporaryDirectory(prefix="lethe-latency-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        prepare(
            wl,
            data_dir=root / "data",
            base_dir=root / "base",
            adapter_dir=root / "v1",
            settings={},
            seed=seed,
        )
        out["prepare_s"] = time.perf_counter() - t0
        for i, (name, specs) in enumerate(rounds.items()):
            t0 = time.perf_counter()
            outcome = run_round(
                wl, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1",
                adapter_out=root / f"v{i + 2}", requests=specs, method=method, settings={}, seed=seed,
                cache_dir=root / "cache",
            )  # fmt: skip
            out["rounds"][name] = {
                "wall_s": time.perf_counter() - t0,
                "per_request": {rid: ev["timings_s"] for rid, ev in outcome.evidence.items()},
            }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.unlearning.bench")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument(
        "--seeds", default=None, help="a number N (seeds 0…N−1, as `lethe bench --seeds N`) or a list: 3,4"
    )
    parser.add_argument(
        "--settings", default=None, help='workload setting overrides (JSON), e.g. \'{"ia": {"eta2": 0.5}}\''
    )
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the preset's)")
    parser.add_argument("--measure-workload", action="store_true", help="measure the workload's gaps instead")
    parser.add_argument("--latency", action="store_true", help="time prepare and three rounds instead")
    args = parser.parse_args(argv)
    seeds: int | list[int] | None = None
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",") if s] if "," in args.seeds else int(args.seeds)
    if args.latency:
        print(json.dumps(measure_latency(), indent=2))
        return 0
    if args.measure_workload:
        listed = list(range(seeds)) if isinstance(seeds, int) else seeds
        result = measure_workload(seeds=listed or (0, 1, 2))
        print(json.dumps(result["summary"], indent=2))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    run_bench(args.preset, args.json_path, seeds, methods=methods,
              settings_overrides=json.loads(args.settings) if args.settings else None)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
