"""How often ``lethe demo``'s unlearning checks pass, and by what margin (docs/benchmarks.md).

The demo submits, on a fresh v1 of the default model, a per-client request (the first client) and
a per-task request (the last task of 40 samples of the second client) and checks on the serving host
that the new version forgot and kept the rest (``worker/demo_checks.py``). The demo is one
reproducible draw: the anchor subset of a request is seeded by the worker seed, the request's
content and ``settings["anchor_draw"]`` (0), see ``partitions.anchor_key``. This script runs the
same two requests through the same engine with ``anchor_draw`` = 0 … trials−1 (draw 0 is the
demo's own), in process (no API, broker or worker: what they add does not touch the numbers), and
reports the pass rate and each check's margin (median, worst). ``--seed`` changes the worker seed
(the frozen base, v1 and the engine's randomness): another machine's demo, in effect. With
``--rounds two`` each draw's ``after_rounds`` has every group's accuracy after round 1 as well, so
that a drift over the two rounds can be put on the round that made it, and the per-task request's
kept tasks are judged against round 1's version (the one that request was applied to), as the
demo judges them.

    python -m bench reliability --trials 20 --seed 0 --json bench-results/demo-reliability-s0.json

``--rejudge JSON…`` runs nothing: it judges the draws stored in earlier results again with today's
checks (:func:`rejudge`), so a change to a check's definition is measured on the draws already made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from worker import demo_checks
from worker.demo import KEPT_GROUP, Subjects, _predictions, _remembered_first, demo_groups
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import prepare, run_round
from worker.unlearning.runtime import runtime_environment
from worker.unlearning.types import ForgetSpec
from worker.unlearning.workload import load_workload

WORKLOAD = "digits-clients"


def _subjects(store: DataStore, tasks: list[str], predict: demo_checks.Predict) -> Subjects:
    """The demo's choice on a fresh model (``worker.demo._choose_subjects``): the two clients that
    the version behind ``predict`` (v1) remembers most clearly."""
    client, task_client = _remembered_first(store, store.heldout(), predict)(
        tasks, list(store.active_clients)
    )[:2]
    task = tasks[-1]
    samples = sorted(store.sample_ids_of(task_client))[:40]
    return Subjects(client=client, task_client=task_client, task_samples=samples, task=task, tasks=tasks)


def _requests(subjects: Subjects, trial: int) -> list[ForgetSpec]:
    return [
        ForgetSpec(f"client-{trial}", "client", subjects.client, None, []),
        ForgetSpec(f"task-{trial}", "task", None, subjects.task_samples, [subjects.task]),
    ]


def run(trials: int, *, seed: int, rounds: str, settings: dict[str, Any], method: str) -> dict[str, Any]:
    workload = load_workload(WORKLOAD)
    with tempfile.TemporaryDirectory(prefix="lethe-demo-reliability-") as tmp:
        root = Path(tmp)
        data_dir, base_dir, v1, cache = root / "data", root / "base", root / "v1", root / "cache"
        refs = root / "references"  # trained when the settings ask for them, as the worker does
        t0 = time.perf_counter()
        prepared = prepare(workload, data_dir=data_dir, base_dir=base_dir, adapter_dir=v1,
                           settings=settings, seed=seed, cache_dir=cache, references_dir=refs)  # fmt: skip
        print(f"v1 prepared in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        store = DataStore(data_dir)
        subjects = _subjects(store, prepared.tasks, partial(_predictions, v1, base_dir))
        client_set = store.client_samples(subjects.client)
        task_rows = store.client_samples(subjects.task_client)
        heldout = store.heldout()
        if client_set is None or task_rows is None:
            raise RuntimeError("a fresh store has every client")
        pick = [i for i, s in enumerate(task_rows.sample_ids) if s in set(subjects.task_samples)]
        groups = demo_groups(
            subjects,
            client_set,
            {k: v[pick] for k, v in task_rows.inputs.items()},
            {t: y[pick] for t, y in task_rows.labels.items()},
            heldout,
        )
        # v1 is the same for every draw and round: its predictions on each group once per run
        v1_predict = _once_per_group(partial(_predictions, v1, base_dir))
        results: list[dict[str, Any]] = []
        for trial in range(trials):
            t1 = time.perf_counter()
            requests = _requests(subjects, trial)
            drawn = {**settings, "anchor_draw": trial}
            parent = v1
            batches = [requests] if rounds == "one" else [[r] for r in requests]
            evidence: dict[str, Any] = {}
            # every group's accuracy after each round but the last (two rounds: which round moved it)
            between: list[list[dict[str, Any]]] = []
            for i, batch in enumerate(batches):
                out = root / f"t{trial}-r{i}"
                outcome = run_round(workload, data_dir=data_dir, base_dir=base_dir, adapter_in=parent,
                                    adapter_out=out, requests=batch, method=method, settings=drawn,
                                    seed=seed, cache_dir=cache, references_dir=refs)  # fmt: skip
                evidence.update(outcome.evidence)
                parent = out
                if i < len(batches) - 1:
                    between.append(
                        _after(demo_checks.measure(v1_predict, partial(_predictions, out, base_dir), groups))
                    )
            measured = demo_checks.measure(v1_predict, partial(_predictions, parent, base_dir), groups)
            checks = _checks(measured, between, groups)
            ok = all(c.ok for c in checks)
            results.append(
                {
                    "anchor_draw": trial,
                    "ok": ok,
                    "seconds": time.perf_counter() - t1,
                    # every (group, task): accuracy of v1 and of the last version on the serving host
                    "measured": [dataclasses.asdict(m) for m in measured],
                    "after_rounds": between,
                    "checks": [
                        {"what": c.what, "ok": c.ok, "margin": c.margin, "detail": c.detail} for c in checks
                    ],
                    "requests": {rid: _request_summary(ev) for rid, ev in evidence.items()},
                }
            )
            failed = [c.what for c in checks if not c.ok]
            print(f"anchor_draw {trial}: {'pass' if ok else 'FAIL ' + '; '.join(failed)} "
                  f"({time.perf_counter() - t1:.1f} s)", file=sys.stderr)  # fmt: skip
            for d in (root / f"t{trial}-r{i}" for i in range(len(batches))):
                shutil.rmtree(d, ignore_errors=True)
    return {
        "trials": trials,
        "seed": seed,
        "rounds": rounds,
        "method": method,
        "settings": settings,
        # what the engine ran with: the workload's defaults with ``settings`` merged over them (the
        # overrides alone do not say which defaults a result was measured under)
        "effective_settings": workload.settings(settings),
        "passed": sum(r["ok"] for r in results),
        "fallbacks": sum(any(q.get("path") == "retrain" for q in r["requests"].values()) for r in results),
        # draws in which a round continued a failed update before the exact path (passed or not)
        "continuations": sum(any(q.get("continued") for q in r["requests"].values()) for r in results),
        "environment": runtime_environment(),
        "summary": summarise(results),
        "rise": sequential_rise(results, client_group=groups[0].label) if rounds == "two" else None,
        "results": results,
    }


def rejudge(result: dict[str, Any]) -> list[bool]:
    """Each stored draw of a ``run`` result judged again by today's checks, from the accuracies the
    draw stored (v1's and the last version's on every group, and round 1's in two rounds); no
    model runs. What changed in the checks' definition can so be measured on the draws already
    made. A group is a forgotten one where its stored check was a forget check."""
    verdicts = []
    for draw in result["results"]:
        measured = [demo_checks.Measured(**m) for m in draw["measured"]]
        labels = list(dict.fromkeys(m.group for m in measured))
        forgotten = {c["what"].split(": ", 1)[1].rsplit(", ", 1)[0] for c in draw["checks"]
                     if c["what"].startswith("forgotten: ")}  # fmt: skip
        tasks = {label: [m.task for m in measured if m.group == label] for label in labels}
        groups = [demo_checks.Group(label, None, {}, tasks[label], label in forgotten) for label in labels]
        verdicts.append(all(c.ok for c in _checks(measured, draw.get("after_rounds") or [], groups)))
    return verdicts


def _once_per_group(predict: demo_checks.Predict) -> demo_checks.Predict:
    """``predict`` computed once per inputs object (the groups' inputs live for the whole run)."""
    seen: dict[int, Any] = {}

    def cached(x: Any) -> Any:
        if id(x) not in seen:
            seen[id(x)] = predict(x)
        return seen[id(x)]

    return cached


def _checks(
    measured: Sequence[demo_checks.Measured],
    between: Sequence[Sequence[dict[str, Any]]],
    groups: Sequence[demo_checks.Group],
) -> list[demo_checks.Check]:
    """The demo's checks of one draw; in two rounds (``between``: round 1's accuracies) the kept
    group is judged against round 1's version."""
    judged = measured if not between else _kept_since_round_1(measured, between[0], groups)
    return demo_checks.checks(judged, groups, heldout_label=groups[-1].label)


def _kept_since_round_1(
    measured: Sequence[demo_checks.Measured],
    round_1: Sequence[dict[str, Any]],
    groups: Sequence[demo_checks.Group],
) -> list[demo_checks.Measured]:
    """Two rounds: the per-task request's kept tasks judged against round 1's version, the one that
    request was applied to, as the demo does (``worker.demo._applied_to``)."""
    kept = groups[KEPT_GROUP].label
    before = {r["task"]: r["after"] for r in round_1 if r["group"] == kept}
    return demo_checks.since(measured, kept, before, "round 1's version")


def _after(measured: Sequence[demo_checks.Measured]) -> list[dict[str, Any]]:
    """(group, task, accuracy) of one intermediate version, from :func:`demo_checks.measure`."""
    return [{"group": m.group, "task": m.task, "after": m.after} for m in measured]


def _request_summary(evidence: dict[str, Any]) -> dict[str, Any]:
    """What explains a check's margin: Unl accuracy before and after, the engine's acceptance check
    (passed, the path published: the method or the retrain fallback), and the interference-aware
    stage's early stopping (kept epoch, MIA AUC and retain drop per epoch)."""
    ia = (evidence.get("method_info") or {}).get("ia") or {}
    accepted = evidence.get("acceptance") or {}

    def unl(metrics: Any) -> dict[str, Any]:
        return {t: m.get("unl") for t, m in (metrics or {}).items()}

    return {
        "forget_tasks": evidence.get("forget_tasks"),
        "unl": unl(evidence.get("tasks")),
        "original_unl": unl(evidence.get("original_metrics")),
        "acceptance_passed": accepted.get("passed"),
        "path": accepted.get("path"),
        "continued": "continuation" in accepted,
        "failed_method_checks": [c["what"] for c in accepted.get("method_checks", []) if not c["ok"]],
        "ia_best_epoch": ia.get("best_epoch"),
        "ia_history": [(h["epoch"], h["mia_auc"], round(h["retain_drop"], 3)) for h in ia.get("history", [])],
        "mia_target": ia.get("mia_target"),
    }


def sequential_rise(results: Sequence[dict[str, Any]], client_group: str) -> dict[str, Any]:
    """One round per request: how far the forgotten client's forget-set accuracy rose again, per
    task, from right after its own round (the request's evidence) to after the next round (the
    serving host's measurement) — over the draws in which both rounds published the method's own
    update (a retrain fallback forgets exactly, so it says nothing about the method). ``median``
    per task and the ``n`` draws counted. A rise is a later request undoing an earlier one's
    forgetting (docs/methods.md, "The retain term's targets")."""
    rises: dict[str, list[float]] = {}
    for r in results:
        requests = r["requests"]
        client = next((q for rid, q in requests.items() if rid.startswith("client-")), None)
        if client is None or any(q.get("path") == "retrain" for q in requests.values()):
            continue
        for m in r["measured"]:
            own = (client.get("unl") or {}).get(m["task"])
            if m["group"] == client_group and own is not None:
                rises.setdefault(m["task"], []).append(float(m["after"]) - float(own))
    return {
        "median": {t: statistics.median(v) for t, v in rises.items()},
        "n": max((len(v) for v in rises.values()), default=0),
    }


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per check: how often it passed, its median and worst margin (accuracy points)."""
    names = [c["what"] for c in results[0]["checks"]] if results else []
    out = []
    for i, name in enumerate(names):
        margins = [r["checks"][i]["margin"] for r in results]
        out.append({"check": name, "passed": sum(r["checks"][i]["ok"] for r in results),
                    "median_margin": statistics.median(margins), "worst_margin": min(margins)})  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench reliability") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the worker's seed (v1 and the engine)")
    parser.add_argument(
        "--rounds",
        choices=("one", "two"),
        default="one",
        help="both requests in one round, or one round each (the demo gets either)",
    )
    parser.add_argument("--method", default="default")
    parser.add_argument("--settings", default="{}", help="workload settings overrides (JSON)")
    parser.add_argument("--json", type=Path, help="write the full result here")
    parser.add_argument(
        "--rejudge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: judge the draws stored in these results again with today's checks",
    )
    args = parser.parse_args(argv)
    if args.rejudge:
        for path in args.rejudge:
            stored = json.loads(path.read_text())
            now = rejudge(stored)
            draws = zip(stored["results"], now, strict=True)
            flipped = [d["anchor_draw"] for d, ok in draws if ok != d["ok"]]
            print(f"{path}: {stored['passed']}/{stored['trials']} stored, {sum(now)}/{len(now)} now; "
                  f"draws judged otherwise: {flipped or 'none'}")  # fmt: skip
        return 0
    torch.set_num_threads(int(os.environ.get("LETHE_WORKER_TORCH_THREADS", "1")))  # as the demo's worker
    result = run(args.trials, seed=args.seed, rounds=args.rounds, settings=json.loads(args.settings),
                 method=args.method)  # fmt: skip
    env = result["environment"]
    print(
        f"\n{result['passed']}/{result['trials']} trials passed every check ({args.rounds} round(s)); "
        f"the acceptance check continued the update in {result['continuations']} and fell back to "
        f"retrain in {result['fallbacks']}; "
        f"torch {env['torch']}, CPU path {env['cpu_capability']}, {env['threads']} thread(s)"
    )
    if result["rise"] is not None:
        rise = result["rise"]
        print(
            f"the forgotten client's forget-set accuracy, next round minus its own (median over the "
            f"{rise['n']} draws that published the method's update twice): "
            + ", ".join(f"{t} {v:+.3f}" for t, v in rise["median"].items())
        )
    print(f"{'check':70} {'passed':>7} {'median':>8} {'worst':>8}")
    for row in result["summary"]:
        print(f"{row['check'][:70]:70} {row['passed']:>7} {100 * row['median_margin']:+8.1f} "
              f"{100 * row['worst_margin']:+8.1f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    return 0
