"""``lethe bench quality``: methods × settings × sequential stages × seeds on a workload.

``run_bench(preset="quick", json_path=..., seeds=...)`` is what the CLI calls. For every seed it
trains v1 once, then for each setting — ``FU`` (full-task client requests) and ``PU:<task>``
(partial-task: one task of one client's samples) — runs 3 sequential stages (a different client each).
At every stage the retain set is the same for all methods, so one ``retrain`` per stage serves both
as the ``retrain`` method's run and as the reference of everybody's UIS. ``original`` does nothing.

**Fairness** (issue 8, part 6): every method runs with one anchor fraction (the preset's
``anchor_fraction`` replaces the workload's per-method ``anchor_fractions``); each method's main knob
(:data:`TUNING_GRIDS`) is chosen on the *tuning* seeds (``--tune``; without it the preset's
committed choice, :data:`TUNED_QUICK`) and reported on the *evaluation* seeds; UNO runs the paper's
K = 530 steps. The retrain of each stage only *scores* methods; no method sees it. Every stage
also trains a second retrain with another seed (``retrain_2``, the noise floor), and the summary
reports, per (setting, stage, method), the fraction of request-tasks whose forget-set accuracy and
MIA AUC are both within :data:`CLOSE_TOLERANCE` of the reference retrain's.

**Workload protocols.** A workload may declare what a preset runs on it
(``Workload.bench_protocols``, :class:`~worker.unlearning.workload.BenchProtocol`: seeds, stages,
settings, methods, tuned values, bench-only workload options), e.g. a quick preset that fits two
CPU cores for a ViT; the fairness rules above hold for it unchanged. ``jobs`` > 1 runs the seeds in
that many spawned processes, one torch thread each (seeds are independent).

How a run is scored and runs are pooled: :mod:`bench.scoring`; the printed table:
:mod:`bench.report`; the workload's own figures (gaps, Val spread): :mod:`bench.workload_figures`.
``python -m bench quality --help``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from bench.closeness import CLOSE_TOLERANCE
from bench.evidence import failed_checks
from bench.report import format_table
from bench.scoring import (
    APPROXIMATE_METHODS,
    SECOND_RETRAIN,
    SERVED_SUFFIX,
    check_goals,
    earlier_accuracy,
    earlier_gaps,
    median_of,
    registered_methods,
    run_row,
    summarise,
    task_metrics,
)
from bench.seeded_workloads import SeededWorkloads
from bench.training_cache import TrainingCache, timed, trained_adapter, trained_references, tree_digest
from worker.unlearning.acceptance import AcceptanceConfig
from worker.unlearning.audit import AuditConfig
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import (
    EngineInputs,
    Reference,
    RequestContext,
    StageResult,
    accept_round,
    advance_state,
    compute_reference,
    ensure_base,
    evaluate,
    full_importance_settings,
    metrics_on,
    original_val,
    precompute_next_importance,
    reference_retrain,
    request_context,
    request_evidence,
    run_stage,
    training_data,
)
from worker.unlearning.interference.unseen_guard import scoring_rows
from worker.unlearning.partitions import retain_set
from worker.unlearning.reference_adapters import (
    LoadedReferences,
    drop_references_with,
    load_references,
    refresh_references,
)
from worker.unlearning.runtime import runtime_environment
from worker.unlearning.ssd import precompute_full_importance
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig, fresh_adapter
from worker.unlearning.types import Batch, ForgetSpec
from worker.unlearning.workload import (
    BenchProtocol,
    Workload,
    deep_merge,
    workload_factory,
)

METHODS = ["original", "retrain", *APPROXIMATE_METHODS]
SECOND_RETRAIN_SEED_OFFSET = 7_919  # the second retrain's seed is the run's seed + this
#: the seeds the tuning grid is scored on: never an evaluation seed
TUNING_SEEDS = (100, 101, 102)
#: one anchor fraction for every method of quick/full (the value ``default`` and ``ia`` had; the
#: baselines had the workload's 0.1)
FAIR_ANCHOR_FRACTION = 0.5
#: each method's main knob and its small grid (dotted path into the settings, values)
TUNING_GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "ssd": ("ssd.alpha", (3.0, 10.0, 30.0)),
    "ia": ("ia.lr", (1e-3, 3e-3, 1e-2)),
    "default": ("default.ia.eta2", (0.1, 0.3, 1.0)),
    "neggrad_plus": ("neggrad_plus.lr", (3e-4, 1e-3, 3e-3)),
    "orthograd": ("orthograd.lr", (3e-4, 1e-3, 3e-3)),
    "gdr_gma": ("gdr_gma.lr", (3e-5, 1e-4, 3e-4)),
    "uno": ("uno.lr", (3e-4, 1e-3, 3e-3)),
}
#: UNO with the paper's step count (K = 530; one step per epoch on a client-sized D_f)
PAPER_STEPS = {"uno": {"epochs": 530}}
#: the grid values a committed ``--preset quick --tune`` run chose (docs/benchmarks.md, "A fair
#: benchmark"); the quick preset uses them without tuning again. Chosen 1 Dec 2026 on seeds
#: 100–102. ``default``'s choice then (η2 = 1) was dropped on 2 Dec 2026: η2 became the ratio of the
#: balanced forget term's norm to the retain term's (docs/methods.md, "A stronger default"), so a
#: value tuned as a plain weight no longer means the same; ``default`` runs its workload's settings
#: until a new ``--tune`` run on the tuning seeds chooses again.
TUNED_QUICK: dict[str, float] = {"ssd": 3.0, "ia": 3e-3}


@dataclass(frozen=True)
class Preset:
    seeds: tuple[int, ...]
    stages: int
    settings: tuple[str, ...] | None  # None: FU and PU:<task> for every task
    overrides: Mapping[str, Any]
    methods: tuple[str, ...] | None = tuple(METHODS)  # None: every method of the registry
    tuning_seeds: tuple[int, ...] = TUNING_SEEDS
    # one anchor fraction for every method (None: the workload's ``anchor_fraction``)
    anchor_fraction: float | None = FAIR_ANCHOR_FRACTION
    tuned: Mapping[str, float] = dataclasses.field(default_factory=dict)  # method → grid value


PRESETS: dict[str, Preset] = {
    "quick": Preset(seeds=(0, 1, 2, 3, 4), stages=3, settings=None, overrides=PAPER_STEPS, tuned=TUNED_QUICK),
    "full": Preset(
        seeds=(0, 1, 2, 3, 4), stages=3, settings=None, overrides=PAPER_STEPS, methods=None, tuned=TUNED_QUICK
    ),
    # a smoke run for tests: one seed, one setting, a tiny training recipe
    "smoke": Preset(
        seeds=(0,),
        stages=2,
        settings=("FU",),
        overrides={"train": {"epochs": 3, "main_only_epochs": 1}, "pretrain": {"epochs": 2}},
        tuning_seeds=(100,),
        anchor_fraction=None,
    ),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _settings_list(workload: Workload, settings: Sequence[str] | None) -> list[str]:
    if settings is not None:
        return list(settings)
    return ["FU", *[f"PU:{t.name}" for t in workload.tasks()]]


def _chosen_settings(workload: Workload, wanted: Sequence[str]) -> tuple[str, ...]:
    """``wanted`` checked against the workload's settings (``FU`` and ``PU:<task>``), in its order."""
    known = _settings_list(workload, None)
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise ValueError(f"request settings {list(wanted)}: each must be one of {known}")
    return tuple(s for s in known if s in wanted)


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


def _seed_list(seeds: int | Sequence[int] | None, preset: Preset) -> list[int]:
    if isinstance(seeds, int):  # a number of seeds: 0 … seeds−1
        return list(range(seeds))
    return list(seeds) if seeds else list(preset.seeds)


def _knob_overrides(method: str, value: float) -> dict[str, Any]:
    """``TUNING_GRIDS[method]``'s dotted path set to ``value``, as settings overrides."""
    path = TUNING_GRIDS[method][0].split(".")
    out: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


def _variant(method: str, value: float | None, *, label: str | None = None) -> Variant:
    overrides = {} if value is None or method not in TUNING_GRIDS else _knob_overrides(method, value)
    return Variant(label or method, method, overrides)


def fair_settings(settings: Mapping[str, Any], fraction: float | None) -> dict[str, Any]:
    """``settings`` with one anchor fraction for every method: the per-method ``anchor_fractions``
    removed, ``anchor_fraction`` set to ``fraction`` (``None``: the workload's)."""
    out = dict(settings)
    out.pop("anchor_fractions", None)
    if fraction is not None:
        out["anchor_fraction"] = float(fraction)
    return out


def _prepared_seeds(
    workloads: SeededWorkloads,
    root: Path,
    settings: Mapping[str, Any],
    seeds: Sequence[int],
    references: int = 0,
    reference_log: dict[str, Any] | None = None,
    cache: TrainingCache | None = None,
) -> Iterator[tuple[int, EngineInputs, PeftModel]]:
    """Per seed: the engine inputs (with ``settings`` as they are, fair anchors kept) and v1. The
    seed's data and frozen base are made on first use (the base's init seed is 0 for every seed).
    ``references`` > 0: also that many reference adapters on halves of the clients (v1's recipe,
    off the path, as preparation trains them), in ``inputs.references`` and on disk under
    ``reference_log["dirs"][seed]``; their seconds in ``reference_log["train_s"][seed]``.
    ``cache``: v1 and the references are read from it where an earlier run trained them."""
    cache = cache or TrainingCache()
    for seed in seeds:
        wl, home = workloads.of(seed), workloads.root(root, seed)
        DataStore.materialise(home / "data", wl)
        ensure_base(wl, home / "base", settings, seed=0)
        inputs = EngineInputs.load(
            wl,
            data_dir=home / "data",
            base_dir=home / "base",
            settings=settings,
            seed=seed,
            cache_dir=home / "cache",
        )
        # load() merges the workload's defaults again (its anchor_fractions among them)
        inputs = dataclasses.replace(inputs, settings=dict(settings))
        v1, v1_s = _v1(inputs, seed, cache)
        _log(f"[bench] seed {seed}: v1 trained in {v1_s:.1f}s")
        if references:
            log = reference_log if reference_log is not None else {}
            directory = root / f"references-seed-{seed}"
            train_s = _train_references(inputs, seed, references, directory, cache)
            log.setdefault("dirs", {})[seed] = directory
            log.setdefault("train_s", {})[str(seed)] = train_s
            inputs = dataclasses.replace(inputs, references=_load_references(inputs, directory))
            _log(f"[bench] seed {seed}: {references} references trained in {train_s:.1f}s (off path)")
        yield seed, inputs, v1


def _v1(inputs: EngineInputs, seed: int, cache: TrainingCache) -> tuple[PeftModel, float]:
    """The seed's v1 (v1's recipe on every client's data) and its training seconds."""
    cfg = TrainConfig.from_settings(inputs.settings)
    return trained_adapter(cache, inputs.base, inputs.full_train_set(), inputs.tasks, cfg, seed=seed)


def _train_references(
    inputs: EngineInputs, seed: int, k: int, directory: Path, cache: TrainingCache
) -> float:
    """``k`` reference adapters on v1's data written to ``directory``, as preparation trains them;
    their training seconds."""
    audit = AuditConfig.from_settings(inputs.settings)
    return trained_references(
        cache, inputs.base, inputs.full_train_set(), inputs.tasks, TrainConfig.from_settings(inputs.settings),
        directory=directory, client_index=inputs.client_index, k=k, seed=seed, workload=inputs.workload.name,
        heldout=inputs.heldout, withhold_tasks=audit.reference_withheld_tasks(inputs.tasks),
        in_fraction=audit.reference_in_fraction,
    )  # fmt: skip


@dataclass(frozen=True)
class SeedJob:
    """What every seed of a run does (picklable: a worker process runs seeds from it)."""

    workloads: SeededWorkloads
    root: Path
    settings: dict[str, Any]
    stages: int
    setting_names: tuple[str, ...] | None  # None: FU and PU:<task> for every task of the seed's workload
    variants: tuple[Variant, ...]
    references: int = 0
    second_retrain: bool = False
    training_cache: Path | None = None  # :mod:`bench.training_cache`; None: every training runs


def _evaluate_seed(job: SeedJob, seed: int, setting: str | None = None) -> dict[str, Any]:
    """One seed: its v1 (and references), then every setting's stages (``setting``: that one
    only, under a directory of its own, so that units of one seed can run at once). Its rows and
    reference log."""
    torch.set_num_threads(1)  # also in a worker process: one intra-op thread per process
    log: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    importance: dict[str, float] = {}  # this seed's v1 I_D seconds per SSD settings (computed once)
    t0, cpu0 = time.perf_counter(), time.process_time()
    root = job.root if setting is None else job.root / f"unit-{seed}-{setting.replace(':', '-')}"
    cache = TrainingCache(job.training_cache)
    prepared = _prepared_seeds(job.workloads, root, job.settings, [seed], job.references, log, cache)
    for _, inputs, v1 in prepared:
        names = _settings_list(job.workloads.of(seed), job.setting_names) if setting is None else [setting]
        for name in names:
            rows.extend(
                _run_setting(
                    inputs, v1, name, seed, job.stages, job.variants, importance,
                    second_retrain=job.second_retrain, references_dir=log.get("dirs", {}).get(seed),
                    reference_log=log, cache=cache,
                )
            )  # fmt: skip
            _log(f"[bench] seed {seed} {name} done ({time.perf_counter() - t0:.0f}s into the unit)")
    return {
        "runs": rows,
        "train_s": log.get("train_s", {}),
        "refresh_s": log.get("refresh_s", []),
        "training_cache": cache.stats(),
        "process": {
            "seed": seed,
            "setting": setting,
            "pid": os.getpid(),
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
        },
    }


def _seed_worker_init(parent: int) -> None:
    """A seed process: one torch thread, and it exits when the bench that spawned it is gone
    (a killed bench's workers would otherwise train on, orphaned, for the rest of their unit)."""
    torch.set_num_threads(1)
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()


def exit_with_parent(
    parent: int, interval_s: float = 2.0, *, exit: Callable[[int], Any] = os._exit, checks: int | None = None
) -> None:
    """Poll every ``interval_s`` until the parent process ``parent`` is gone (this process was
    re-parented), then ``exit(1)``. ``checks``: stop polling after that many (tests)."""
    n = 0
    while checks is None or n < checks:
        if os.getppid() != parent:
            exit(1)
            return
        n += 1
        time.sleep(interval_s)


def _evaluate_seeds(
    job: SeedJob, seeds: Sequence[int], jobs: int, progress: Path | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every seed of ``seeds``: in this process, or with ``jobs`` > 1 in that many worker processes
    (spawned, one torch thread each). With workers, a unit is one (seed, setting): the seeds and
    settings are independent, each unit trains its seed's v1 again (the same v1: training is
    seeded) and the workers stay busy to the end. Rows in seed and setting order, and the reference
    log (training and refresh seconds) of all units. ``progress``: each finished unit's output is
    appended there as a JSON line (a run stopped early keeps its finished units)."""

    def done(out: dict[str, Any]) -> dict[str, Any]:
        if progress is not None:
            with progress.open("a") as fh:
                fh.write(json.dumps(out) + "\n")
        return out

    units, submitted = work_units(seeds, job.setting_names, jobs)
    if jobs > 1 and len(units) > 1:
        spawn = multiprocessing.get_context("spawn")  # not fork: the parent's torch threads
        with ProcessPoolExecutor(
            min(jobs, len(units)), mp_context=spawn, initializer=_seed_worker_init, initargs=(os.getpid(),)
        ) as pool:
            futures = {pool.submit(_evaluate_seed, job, seed, name): (seed, name) for seed, name in submitted}
            for future in as_completed(futures):
                done(future.result())
            by_unit = {unit: future.result() for future, unit in futures.items()}
            outs = [by_unit[unit] for unit in units]
    else:
        outs = [done(_evaluate_seed(job, seed, name)) for seed, name in units]
    runs = [row for out in outs for row in out["runs"]]
    log: dict[str, Any] = {
        "train_s": {k: v for out in outs for k, v in out["train_s"].items()},
        "refresh_s": [r for out in outs for r in out["refresh_s"]],
        "seed_processes": [out["process"] for out in outs],  # which process ran each unit, how long
        "training_cache": {
            k: sum(out.get("training_cache", {}).get(k, 0) for out in outs)
            for k in ("hits", "misses", "uncached")
        },
    }
    return runs, log


Unit = tuple[int, str | None]  # (seed, setting); setting None: all of the seed's settings


def work_units(seeds: Sequence[int], names: Sequence[str] | None, jobs: int) -> tuple[list[Unit], list[Unit]]:
    """The units of a run in the rows' order (seed, then setting) and in the order they are
    submitted. One process: one unit per seed. Several, with several settings: one per (seed,
    setting), submitted setting by setting, so a seed's units run apart and, with a training
    cache, the later ones read the seed's v1 and references instead of training them beside the
    first."""
    if jobs <= 1 or names is None or len(names) <= 1:
        units: list[Unit] = [(seed, None) for seed in seeds]
        return units, units
    rows: list[Unit] = [(seed, name) for seed in seeds for name in names]
    submitted: list[Unit] = [(seed, name) for name in names for seed in seeds]
    return rows, submitted


def workload_protocol(workload: str | Workload, preset: str) -> BenchProtocol | None:
    """The workload's own protocol for ``preset`` (:attr:`Workload.bench_protocols`), if it declares
    one; read from the class, before the workload is built."""
    cls = type(workload) if isinstance(workload, Workload) else workload_factory(workload)
    protocols: Mapping[str, BenchProtocol] = getattr(cls, "bench_protocols", {})
    return protocols.get(preset)


def with_protocol(preset: Preset, protocol: BenchProtocol | None) -> Preset:
    """``preset`` with what ``protocol`` sets replacing the preset's choices."""
    if protocol is None:
        return preset
    return dataclasses.replace(
        preset,
        seeds=preset.seeds if protocol.seeds is None else tuple(protocol.seeds),
        stages=preset.stages if protocol.stages is None else protocol.stages,
        settings=preset.settings if protocol.settings is None else tuple(protocol.settings),
        methods=preset.methods if protocol.methods is None else tuple(protocol.methods),
        tuned=preset.tuned if protocol.tuned is None else dict(protocol.tuned),
    )


def tune(
    workloads: SeededWorkloads,
    root: Path,
    settings: Mapping[str, Any],
    preset: Preset,
    methods: Sequence[str],
    seeds: Sequence[int],
    references: int = 0,
    jobs: int = 1,
    training_cache: Path | None = None,
) -> dict[str, Any]:
    """Every grid value of every method in ``methods`` on the tuning ``seeds``; the chosen value is
    the one with the lowest median UIS over all its (setting, stage, seed) runs (ties: the earlier
    grid value). The retrain only scores the runs. Returns the tuning record of the JSON."""
    variants = [
        _variant(m, v, label=f"{m}={v:g}") for m in methods if m in TUNING_GRIDS for v in TUNING_GRIDS[m][1]
    ]
    job = SeedJob(
        workloads, root, dict(settings), preset.stages, preset.settings, tuple(variants), references,
        training_cache=training_cache,
    )  # fmt: skip
    runs, _ = _evaluate_seeds(job, seeds, jobs)
    scores: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, float] = {}
    for m in methods:
        if m not in TUNING_GRIDS:
            continue
        table: list[dict[str, Any]] = []
        best: tuple[float, float] | None = None  # (median UIS, value): the first lowest wins
        for value in TUNING_GRIDS[m][1]:
            sel = [r for r in runs if r["method"] == f"{m}={value:g}"]
            med = median_of([r["uis"] for r in sel])
            table.append({"value": value, "median_uis": med, "n": len(sel)})
            if med is not None and (best is None or med < best[0]):
                best = (med, value)
        if best is not None:
            chosen[m] = best[1]
        scores[m] = table
    return {"seeds": list(seeds), "ran": True, "scores": scores, "chosen": chosen}


def run_bench(
    preset: str = "quick",
    json_path: Path | str | None = None,
    seeds: int | Sequence[int] | None = None,
    *,
    workload: str | Workload = "digits-clients",
    workload_options: Mapping[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    settings_overrides: Mapping[str, Any] | None = None,
    tune_grid: bool = False,
    tuning_seeds: Sequence[int] | None = None,
    echo: Callable[[str], None] | None = print,
    plots: bool = True,
    references: int | None = None,
    extra_variants: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    jobs: int = 1,
    served: Sequence[str] = (),
    request_settings: Sequence[str] | None = None,
    second_retrain: bool = True,
    training_cache: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark; print a table (via ``echo``), write ``json_path``; return the JSON.

    ``preset``: ``quick`` (evaluation seeds 0–4, FU + PU:<each task>, 3 stages; ≤ 10 min on 2
    cores), ``full`` (every registered method) or ``smoke``. ``seeds``: the evaluation seeds, or
    how many (0 … n−1); default the preset's. ``tune_grid``: choose each method's main knob on the
    tuning seeds (``tuning_seeds``, default the preset's; they must not overlap the evaluation
    seeds) first; otherwise the preset's committed choice. ``settings_overrides``: workload
    setting overrides merged over the preset's, e.g. ``{"ia": {"eta2": 0.2}}``. ``workload``: a
    registered name, built per seed with ``workload_options`` (:class:`SeededWorkloads`: the data
    seed follows the evaluation / tuning seed), or an instance used for every seed.
    ``plots``: with ``json_path``, also the PNG plots beside it (:mod:`bench.plots`; needs the
    ``bench`` extra, checked before any work).
    ``references``: K reference adapters per seed (even; 0: none) trained after v1 off the timed
    path, dropped and refreshed between stages as the worker does after a purge (the refresh is
    timed apart, ``meta.references``); methods with ``ia.target: "references"`` read them.
    ``None``: as many as the workload's settings give a model (``audit.reference_adapters``), so
    that its ``default`` runs as the worker runs it.
    ``extra_variants``: label → (method, settings overrides) rows run beside the methods, e.g.
    ``{"default@refs": ("default", {"default": {"ia": {"target": "references"}}})}``.
    ``jobs``: seeds run in that many worker processes at once (one torch thread each).
    ``served``: methods whose every row gets a twin ``<label>+served``, scored on what a round
    publishes — the update after the engine's acceptance check and its continuation, or, where a
    check still fails, the exact path (the stage's second retrain): :func:`_serve`.
    ``request_settings``: which of the protocol's settings run (``"FU"``, ``"PU:<task>"``; any of
    the workload's), e.g. ``["FU"]`` where a larger pool makes every stage dear; default the
    preset's.
    ``second_retrain``: also train the stage's second retrain (``retrain_2``, the noise floor and
    the served rows' exact path). ``False`` skips it where an earlier run of the same seeds measured
    it: a variant comparison then costs about a fifth less on scenes, and the goals' close-share ratio
    is not computed (``--no-second-retrain``; not with ``served``).
    ``training_cache``: a directory where v1, the references, their refreshes and the retrains are
    stored and read back (:mod:`bench.training_cache`): a run on seeds an earlier run on this
    machine trained costs only its methods' rounds. ``None``: every training runs.

    A workload may declare its own protocol for ``preset`` (:attr:`Workload.bench_protocols`:
    seeds, stages, settings, methods, tuned values, bench-only workload options); it replaces the
    preset's choices, and explicit ``seeds`` / ``methods`` / ``workload_options`` still win.
    """
    missing = plotting_missing() if plots and json_path is not None else None
    if missing is not None:
        raise ValueError(missing)
    # One intra-op thread: the networks are small, and extra threads only spin (measured: 2 threads
    # on a loaded 2-core machine made training ~10× slower).
    torch.set_num_threads(1)
    protocol = workload_protocol(workload, preset)
    chosen = with_protocol(PRESETS[preset], protocol)
    options = dict(workload_options or {})
    if protocol is not None and protocol.workload_options:
        if isinstance(workload, Workload):
            raise ValueError(
                f"the {preset!r} protocol of {workload.name!r} sets workload options "
                f"{dict(protocol.workload_options)}: pass the workload by its registered name"
            )
        options = {**protocol.workload_options, **options}  # the user's options win
    seed_list = _seed_list(seeds, chosen)
    if not seed_list:
        raise ValueError("the benchmark needs at least one seed")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    tuning_list = list(tuning_seeds) if tuning_seeds is not None else list(chosen.tuning_seeds)
    if tune_grid and (not tuning_list or set(tuning_list) & set(seed_list)):
        raise ValueError(
            f"tuning seeds {tuning_list} must be given and differ from the evaluation seeds {seed_list}"
        )
    if methods:
        method_list = list(methods)
    else:
        method_list = list(chosen.methods) if chosen.methods is not None else registered_methods()
    workloads = SeededWorkloads(workload, options)
    wl = workloads.of(seed_list[0])  # its default settings and name (the same for every seed)
    # the tasks are the same for every seed
    names = (
        tuple(_settings_list(wl, chosen.settings))
        if request_settings is None
        else _chosen_settings(wl, request_settings)
    )
    settings = fair_settings(
        wl.settings(deep_merge(chosen.overrides, settings_overrides or {})), chosen.anchor_fraction
    )
    if references is None:
        references = AuditConfig.from_settings(settings).reference_adapters
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lethe-bench-") as tmp:
        root = Path(tmp)
        if tune_grid:
            tuning = tune(
                workloads, root, settings, chosen, method_list, tuning_list, references, jobs, training_cache
            )
            _log(
                f"[bench] tuned on seeds {tuning_list}: {tuning['chosen']} "
                f"({time.perf_counter() - t_start:.0f}s)"
            )
        else:
            tuning = {"seeds": tuning_list, "ran": False, "scores": {}, "chosen": dict(chosen.tuned)}
        picked = {m: v for m, v in tuning["chosen"].items() if m in method_list}
        variants = [_variant(m, picked.get(m)) for m in method_list]
        for label, (method, extra) in dict(extra_variants or {}).items():
            base_overrides = _variant(method, picked.get(method)).overrides
            variants.append(Variant(label, method, deep_merge(base_overrides, extra)))
        unknown = sorted(set(served) - {v.method for v in variants if v.method != "retrain"})
        if unknown:
            raise ValueError(f"--served {unknown}: not an approximate method of this run")
        if served and not second_retrain:
            raise ValueError("--served publishes the second retrain on the exact path: it must run")
        variants += [
            dataclasses.replace(v, label=f"{v.label}{SERVED_SUFFIX}", served=True)
            for v in list(variants)
            if v.method in served
        ]
        job = SeedJob(
            workloads, root, settings, chosen.stages, names, tuple(variants), references,
            second_retrain=second_retrain, training_cache=training_cache,
        )  # fmt: skip
        progress = None if json_path is None else Path(json_path).with_suffix(".partial.jsonl")
        if progress is not None:
            progress.parent.mkdir(parents=True, exist_ok=True)
            progress.unlink(missing_ok=True)
        runs, reference_log = _evaluate_seeds(job, seed_list, jobs, progress)
        if progress is not None:
            progress.unlink()  # every unit finished: the JSON below has them all
    # CPU seconds of this process and of its finished worker processes (the tuning's too)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    untuned = sorted(m for m in method_list if m in TUNING_GRIDS and m not in picked)
    result: dict[str, Any] = {
        "runs": runs,
        "meta": {
            "preset": preset,
            "workload": wl.name,
            "workload_options": workloads.options,
            "data_seed_follows_seeds": workloads.follows_seed,
            "seeds": seed_list,
            "evaluation_seeds": seed_list,
            "tuning": {
                **tuning,
                "grids": {
                    m: {"knob": TUNING_GRIDS[m][0], "values": list(TUNING_GRIDS[m][1])}
                    for m in method_list
                    if m in TUNING_GRIDS
                },
            },
            "method_settings": {v.label: v.overrides for v in variants},
            "served": sorted(v.label for v in variants if v.served),
            "references": {
                "k": references,
                "train_s": reference_log.get("train_s", {}),
                "refresh_s": reference_log.get("refresh_s", []),
            },
            "anchor_fraction": settings.get("anchor_fraction"),
            "paper_steps": {m: v for m, v in PAPER_STEPS.items() if m in method_list},
            "second_retrain": second_retrain,
            "second_retrain_seed_offset": SECOND_RETRAIN_SEED_OFFSET,
            "close_tolerance": CLOSE_TOLERANCE,
            "methods": method_list,
            "stages": chosen.stages,
            "settings_overrides": dict(settings_overrides or {}),
            # the workload's own protocol for this preset (Workload.bench_protocols), or None
            "protocol": None if protocol is None else {"declared_by": wl.name, **_jsonable(protocol)},
            "setting_names": list(names),
            # methods with a tuning knob run with the workload's own settings (no tuned value)
            "untuned_methods": untuned,
            "jobs": min(jobs, len(seed_list)),
            "seed_processes": reference_log["seed_processes"],
            # trainings read from --training-cache (hits), trained and stored (misses), or trained
            # and not stored (uncached: they drew from the global RNG)
            "training_cache": {
                "dir": None if training_cache is None else str(training_cache),
                **reference_log["training_cache"],
            },
            "torch_threads": torch.get_num_threads(),
            "environment": runtime_environment(),
            "total_wall_s": time.perf_counter() - t_start,
            "cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            # peak resident set of this process and of the largest worker process (ru_maxrss: KiB)
            "max_rss_mb": {"main": own.ru_maxrss / 1024, "largest_worker": children.ru_maxrss / 1024},
        },
    }
    result["summary"] = summarise(runs)
    result["goals"] = check_goals(result["summary"])
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        if plots:
            from bench.plots import write_plots

            for png in write_plots(result, path):
                _log(f"[bench] plot: {png}")
    if echo is not None:
        echo(format_table(result))
    return result


def _jsonable(protocol: BenchProtocol) -> dict[str, Any]:
    out = dataclasses.asdict(protocol)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def plotting_missing() -> str | None:
    """Why the PNG plots cannot be drawn (matplotlib, the ``bench`` extra, is missing), or ``None``:
    checked before an hour of benchmark, not after it."""
    if importlib.util.find_spec("matplotlib") is None:
        return "the PNG plots need matplotlib: pip install 'lethe[bench]' (or run without plots: --no-plots)"
    return None


@dataclass(frozen=True)
class Variant:
    """One method run of a stage: its row label, the method, and the settings merged over the
    workload's for it alone (a tuning grid value, or the chosen one)."""

    label: str
    method: str
    overrides: Mapping[str, Any]
    # scored on what a round publishes: the acceptance check, its continuation and, on a failure,
    # the exact path (:func:`_serve`), not on the method's update alone
    served: bool = False


def _run_setting(
    inputs: EngineInputs,
    v1: PeftModel,
    setting: str,
    seed: int,
    stages: int,
    variants: Sequence[Variant],
    v1_importance: dict[str, float],
    *,
    second_retrain: bool = False,
    references_dir: Path | None = None,
    reference_log: dict[str, Any] | None = None,
    cache: TrainingCache | None = None,
) -> list[dict[str, Any]]:
    """One setting of one seed: ``stages`` sequential requests; every variant keeps its own model.

    The stage's retrain is the reference that scores every variant; no variant sees it (no oracle).
    ``second_retrain``: also a retrain with another seed, scored like a method (``retrain_2``).

    SSD's full-data importance (``I_D``) is computed ahead, as the engine does: v1's before stage 1
    (``prepare`` does it in production), each later model's right after the request that made it;
    the time is the row's ``importance_precompute_s`` (of the request that reads it). v1's is
    computed once per seed and SSD settings (``v1_importance`` keeps its time for every row that
    reads it, in every setting).

    ``references_dir``: the seed's reference adapters as trained on v1's clients; each setting
    works on its own copy, and after every stage but the last the references trained on the
    stage's client are dropped and retrained on their half minus the forgotten clients
    (:func:`_refresh`: what the worker does after a purge, off the request path and the timed
    method; its seconds in ``reference_log["refresh_s"]``).

    ``cache``: the retrains and the refreshes are read from it where an earlier run trained them."""
    cache = cache or TrainingCache()
    rows: list[dict[str, Any]] = []
    specs = _stage_specs(setting, inputs.store.active_clients, seed, stages)
    work: Path | None = None
    if references_dir is not None:
        work = references_dir.with_name(f"{references_dir.name}-{setting.replace(':', '-')}")
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(references_dir, work)
        inputs = dataclasses.replace(inputs, references=_load_references(inputs, work))
    state = RoundState()
    approx = [v for v in variants if v.method != "retrain"]
    own = {
        v.label: dataclasses.replace(inputs, settings=deep_merge(inputs.settings, v.overrides))
        for v in approx
    }
    models: dict[str, PeftModel] = {v.label: copy.deepcopy(v1) for v in approx}
    # each variant's own state: the same forgotten data as everybody's, its own pruned outputs
    states: dict[str, RoundState] = {v.label: RoundState() for v in approx}
    keys: dict[str, str | None] = {v.label: None for v in approx}
    ahead: dict[str, float] = {v.label: 0.0 for v in approx}
    before_second: PeftModel = v1  # retrain_2's model before the request (its UIS on kept tasks)
    if any(v.served for v in approx):
        if not second_retrain:
            raise ValueError("served variants publish the second retrain on the exact path: it must run")
        # the original version's held-out level, which the acceptance check holds every version to
        v1_val = original_val(metrics_on(v1, inputs.heldout, inputs.tasks))
        for v in approx:
            if v.served:
                states[v.label].original_val = dict(v1_val)
    second: tuple[PeftModel, float] | None = None  # the stage's second retrain and its seconds
    # the forget sets of the stages so far: every later model is scored on them too, against the
    # stage's reference retrain (what a later request undid of an earlier one's forgetting)
    earlier: list[Batch] = []
    rest = scoring_rows(inputs.heldout)  # held-out rows no method differentiates (ia.unseen_guard)
    for stage, spec in enumerate(specs, start=1):
        ctx = request_context(inputs, spec, state, stage=stage, cache_key=None)
        request_tasks = list(ctx.partitions.forget_tasks)
        if stage == 1:  # every method starts from v1: one I_D per SSD settings, computed once
            for v in approx:
                ssd_settings = full_importance_settings(v.method, own[v.label].settings)
                if ssd_settings is not None:
                    key, t = precompute_full_importance(
                        v1, training_data(ctx), ctx.tasks, ssd_settings, seed=seed, cache_dir=ctx.cache_dir
                    )
                    known = v1_importance.setdefault(json.dumps(ssd_settings, sort_keys=True), t)
                    keys[v.label], ahead[v.label] = key, known
        reference = _reference(ctx, cache)
        ref_metrics = task_metrics(reference.metrics)
        ref_earlier = earlier_accuracy(reference.model, earlier, ctx.tasks)
        if any(v.method == "retrain" for v in variants):
            ev = request_evidence(
                reference.model,
                ctx,
                method="retrain",
                method_info={},
                reference=None,
                original=None,
                timings={"method_s": reference.wall_s},
            )
            rows.append(
                run_row(
                    setting, stage, "retrain", seed, ev, reference.wall_s,
                    val_rest=metrics_on(reference.model, rest, ctx.tasks),
                )
            )  # fmt: skip
        if second_retrain:  # the noise floor: how close another exact retrain comes to the reference
            other, wall = _retrain(ctx, seed + SECOND_RETRAIN_SEED_OFFSET, cache)
            second = (other, wall)
            ev = request_evidence(
                other,
                ctx,
                method=SECOND_RETRAIN,
                method_info={"seed": seed + SECOND_RETRAIN_SEED_OFFSET},
                reference=reference,
                original=evaluate(before_second, ctx),
                timings={"method_s": wall},
            )
            before_second = other
            rows.append(
                run_row(
                    setting,
                    stage,
                    SECOND_RETRAIN,
                    seed,
                    ev,
                    wall,
                    reference=ref_metrics,
                    request_tasks=request_tasks,
                    earlier=earlier_gaps(earlier_accuracy(other, earlier, ctx.tasks), ref_earlier),
                    val_rest=metrics_on(other, rest, ctx.tasks),
                )
            )
        for v in approx:
            # the variant's own settings; the same anchor fraction and retain set for every method.
            # No oracle: the method never sees the retrain (it only scores the method, below)
            precompute = ahead[v.label]
            round_input = copy.deepcopy(models[v.label]).eval() if v.served else None
            models[v.label], done = run_stage(
                own[v.label],
                models[v.label],
                spec,
                states[v.label],
                method=v.method,
                stage=stage,
                cache_key=keys[v.label],
                # a served variant's next I_D belongs to the model it publishes: computed below
                precompute_next=stage < len(specs) and not v.served,
            )
            wall = done.timings["method_s"]
            if round_input is not None and second is not None:
                pruned = states[v.label].pruned_subset_outputs  # after the request, as a round's
                models[v.label], served = _serve(
                    own[v.label], v.method, round_input, models[v.label], done, pruned, second
                )
                done.info = {**done.info, "served": served}
                wall += served["continuation_s"] + (served["exact_path_s"] or 0.0)
                if stage < len(specs):
                    done.next_cache_key, done.timings["importance_precompute_s"] = precompute_next_importance(
                        models[v.label], done.ctx, v.method
                    )
            if stage < len(specs):
                keys[v.label], ahead[v.label] = done.next_cache_key, done.timings["importance_precompute_s"]
            ev = request_evidence(
                models[v.label],
                done.ctx,
                method=v.method,
                method_info=done.info,
                reference=reference,
                original=done.original,
                timings={"method_s": wall},
                pruned=done.pruned,
            )
            rows.append(
                run_row(
                    setting,
                    stage,
                    v.label,
                    seed,
                    ev,
                    wall,
                    precompute,
                    reference=ref_metrics,
                    request_tasks=request_tasks,
                    earlier=earlier_gaps(earlier_accuracy(models[v.label], earlier, ctx.tasks), ref_earlier),
                    val_rest=metrics_on(models[v.label], rest, ctx.tasks),
                )
            )
        earlier.append(ctx.partitions.forget)
        advance_state(state, ctx, ctx.prune_outputs)
        if work is not None and stage < len(specs):
            loaded = _refresh(inputs, work, ctx.resolved.client_id, state, reference_log, cache)
            own = {label: dataclasses.replace(i, references=loaded) for label, i in own.items()}
    return rows


def _serve(
    inputs: EngineInputs,
    method: str,
    round_input: torch.nn.Module,
    model: PeftModel,
    done: StageResult,
    pruned: Sequence[int],
    second_retrain: tuple[PeftModel, float],
) -> tuple[PeftModel, dict[str, Any]]:
    """What a one-request round publishes after ``done``'s update of ``round_input``: the engine's
    acceptance check, its continuation and its exact path
    (:func:`~worker.unlearning.engine.accept_round`), whose model here is the stage's second retrain
    and whose seconds its training time (``retrain_2``: the round's own retrain would be the
    scoring reference itself, seed for seed). ``pruned``: every subset-ID output suppressed after
    the request. Returns the model and what happened (the row's ``served``)."""
    retrained, seconds = second_retrain
    decided = accept_round(
        inputs, round_input, model, [done], AcceptanceConfig.from_settings(inputs.settings.get("acceptance")),
        method, pruned, lambda _: None, exact_path=lambda *_: (copy.deepcopy(retrained), seconds),
    )  # fmt: skip
    entry = decided.evidence[done.ctx.spec.request_id]
    exact = entry.get("path") == "retrain"
    # the checks of the model the round had before its exact path: the continued update's, or the update's
    before_exact = (entry.get("continuation") or {}).get("checks") or entry.get("method_checks", [])
    final = [c["what"] for c in entry.get("checks", []) if not c["ok"]]
    served: dict[str, Any] = {
        "path": entry.get("path", method),
        "checked": bool(entry.get("checked")),
        "method_failed": [c["what"] for c in failed_checks(entry)],
        "continued": "continuation" in entry,
        "continuation_s": decided.continuation_s,
        "failed": [c["what"] for c in before_exact if not c["ok"]] if exact else final,
        "exact_path_s": decided.fallback_s if exact else None,
    }
    if exact:  # checked in turn, as a round checks it (a failure there is published with a warning)
        served["exact_path_failed"] = final
    return decided.model, served


def _reference(ctx: RequestContext, cache: TrainingCache) -> Reference:
    """The stage's reference retrain (:func:`compute_reference`), or the cache's copy of it."""
    made: list[Reference] = []

    def train() -> tuple[PeftModel, float]:
        made.append(compute_reference(ctx))
        return made[0].model, made[0].wall_s

    model, wall = _cached_retrain(ctx, ctx.seed, cache, train)
    return made[0] if made else Reference(model=model, metrics=evaluate(model, ctx), wall_s=wall)


def _retrain(ctx: RequestContext, seed: int, cache: TrainingCache) -> tuple[PeftModel, float]:
    """A retrain of the stage's retain set with ``seed`` (``retrain_2``) and its seconds."""
    return _cached_retrain(
        ctx, seed, cache,
        lambda: timed(lambda: reference_retrain(ctx.base, ctx.retain, ctx.tasks, ctx.settings, seed=seed,
                                                pruned=ctx.pruned_after, device=ctx.device)),
    )  # fmt: skip


def _cached_retrain(
    ctx: RequestContext, seed: int, cache: TrainingCache, train: Callable[[], tuple[PeftModel, float]]
) -> tuple[PeftModel, float]:
    cfg = TrainConfig.from_settings(ctx.settings)
    parts = {"data": ctx.retain, "tasks": ctx.tasks, "cfg": cfg, "seed": seed, "pruned": ctx.pruned_after,
             "device": ctx.device}  # fmt: skip
    fresh = lambda: fresh_adapter(ctx.base, cfg, seed=seed).to(ctx.device)  # noqa: E731
    return cache.adapter("retrain", parts, ctx.base, train, fresh)


def _refresh(
    inputs: EngineInputs,
    directory: Path,
    client: str | None,
    state: RoundState,
    reference_log: dict[str, Any] | None,
    cache: TrainingCache | None = None,
) -> LoadedReferences | None:
    """After a stage: drop the references trained on the stage's client (the purge does) and
    retrain them on their half minus every forgotten client, from the retain data (the forgotten
    samples and labels of ``state`` gone); the reloaded set. ``cache``: the refreshed set is read
    from it where an earlier run trained it from the same set and data."""
    cache = cache or TrainingCache()
    t0 = time.perf_counter()
    dropped = drop_references_with(directory, [client] if client is not None else [])
    names, index = inputs.task_names, inputs.client_index
    data = retain_set(inputs.data, None, tasks=names, client_index=index, state=state)
    cfg = TrainConfig.from_settings(inputs.settings)
    forgotten = sorted(state.forgotten_clients)
    prepared_s = time.perf_counter() - t0
    parts = {"before": tree_digest(directory), "data": data, "tasks": inputs.tasks, "cfg": cfg,
             "client_index": index, "forgotten": forgotten, "heldout": inputs.heldout,
             "device": inputs.device}  # fmt: skip

    def refresh() -> tuple[list[int], float]:
        t = time.perf_counter()
        done = refresh_references(
            inputs.base, data, inputs.tasks, cfg, client_index=index, directory=directory,
            forgotten=forgotten, device=inputs.device, heldout=inputs.heldout,
        )  # fmt: skip
        return done, time.perf_counter() - t

    refreshed, seconds = cache.tree("refresh", parts, inputs.base, refresh, directory)
    if reference_log is not None:
        reference_log.setdefault("refresh_s", []).append(
            {"dropped": dropped, "refreshed": refreshed, "s": prepared_s + seconds}
        )
    return _load_references(inputs, directory)


def _load_references(inputs: EngineInputs, directory: Path) -> LoadedReferences | None:
    """The references of ``directory`` as a worker's round loads them: their outputs computed at
    training (held-out split, the clients' samples) are read instead of forwarded."""
    return load_references(inputs.base, directory, device=inputs.device, heldout=inputs.heldout,
                           client_index=inputs.client_index)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# summary and table
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# workload measurability (docs/workloads.md)
# ----------------------------------------------------------------------------------------------
