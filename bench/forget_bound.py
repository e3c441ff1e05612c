"""How often an exact retrain passes the acceptance check's forget bound, with the unseen-data level
taken as exact (one-sample, the bound before 5 Dec 2026) and with its own noise (two-sample,
``acceptance.unseen_noise``): the calibration of the forget bound (docs/methods.md, "The forget
bound's noise").

``python -m bench.forget_bound --workload scenes --preset quick --workload-option
samples_per_client=1500 --seeds 0,1,2,3 --json bench-results/forget-bound-scenes1500.json``

Per worker seed (the frozen base and the data, as ``lethe bench`` builds them): v1 on every
client's data, and per client an exact retrain without it (the exact path of a per-client request
for that client, from another adapter seed). The acceptance check then judges each retrain against
v1 as a round judges its exact path (:func:`worker.unlearning.acceptance.check`, the client's rows
with every task forgotten), once per bound. An exact retrain is a correct unlearning: every
forgotten task whose bound it fails is a false alarm. The same check of v1 itself (no unlearning)
shows what the bound still catches: the client-tasks v1 had memorised beyond it.

With reference adapters (``--references K``; by default the workload's ``audit.reference_adapters``,
trained on v1's data as a model version's are), each retrain and v1 are judged a third time as a
round reads the check (``with_allowance``): the two-sample bound, raised where it fails by the
references' allowance (``acceptance.reference_allowance``: how much better than on the held-out
rows the references that never saw the client do on its rows). One torch thread.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.calibration_cli import calibration_parser, seeds, workload_options, write_json
from bench.seeded_workloads import SeededWorkloads
from bench.training_cache import TrainingCache, trained_adapter, trained_references
from worker.unlearning import acceptance
from worker.unlearning.audit import AuditConfig, model_outputs
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import ensure_base
from worker.unlearning.likelihood_ratio import forget_bound_allowance, out_reference_targets
from worker.unlearning.model import MultiTaskModel
from worker.unlearning.partitions import retain_set
from worker.unlearning.reference_adapters import LoadedReferences, load_references
from worker.unlearning.runtime import runtime_environment
from worker.unlearning.state import RoundState
from worker.unlearning.training import TrainConfig
from worker.unlearning.types import Batch, TaskSpec
from worker.unlearning.workload import Workload

BOUNDS = {"one_sample": False, "two_sample": True}  # name → acceptance.unseen_noise
#: the two-sample bound with the references' allowance: what a round reads
WITH_ALLOWANCE = "with_allowance"


def _forget_checks(checks: Sequence[acceptance.Check]) -> dict[str, acceptance.Check]:
    """The forget-bound checks of one request, by task."""
    n = len(acceptance.FORGET_BOUND)
    return {c.what[n:]: c for c in checks if c.what.startswith(acceptance.FORGET_BOUND)}


def _references(
    workload: Workload, settings: dict[str, Any], base: MultiTaskModel, data: Batch, heldout: Batch,
    client_index: dict[str, int], cfg: TrainConfig, k: int, seed: int, directory: Path, cache: TrainingCache,
) -> tuple[LoadedReferences | None, float]:  # fmt: skip
    """The version's reference adapters, trained on v1's data as the engine trains them, and their
    training seconds."""
    audit = AuditConfig.from_settings(settings)
    tasks = workload.tasks()
    train_s = trained_references(
        cache, base, data, tasks, cfg, directory=directory, client_index=client_index, k=k, seed=seed,
        workload=workload.name, heldout=heldout, in_fraction=audit.reference_in_fraction,
        withhold_tasks=audit.reference_withheld_tasks(tasks),
    )  # fmt: skip
    return load_references(base, directory, heldout=heldout, client_index=client_index), train_s


def _levels(
    model: nn.Module, tasks: Sequence[TaskSpec], forget: Batch, heldout: Batch
) -> dict[str, dict[str, float]]:
    """Per task, ``model``'s metric on the forget set and on the held-out rows (to 6 digits): what
    the bound compares, for reading a check's margin against the references' allowance."""
    on = {
        "forget": (model_outputs(model, forget.inputs), forget),
        "heldout": (model_outputs(model, heldout.inputs), heldout),
    }
    return {
        t.name: {
            key: round(float(t.metric(out[t.name], b.labels[t.name])), 6) for key, (out, b) in on.items()
        }
        for t in tasks
    }


def measure_seed(
    workloads: SeededWorkloads,
    seed: int,
    root: Path,
    clients: int | Sequence[str],
    references: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    cache: TrainingCache | None = None,
) -> dict[str, Any]:
    """``clients``: how many of the active clients (the first ones), or which by name.
    ``references``: how many reference adapters to train for the ``with_allowance`` bound
    (``None``: the workload's ``audit.reference_adapters``; 0: none, that bound is not judged).
    ``overrides``: settings over the workload's (e.g. ``audit.reference_in_fraction``).
    ``cache``: v1, the references and the retrains are read from it where it holds them
    (:mod:`bench.training_cache`)."""
    cache = cache or TrainingCache()
    workload = workloads.of(seed)
    settings = workload.settings(overrides)
    store = DataStore.materialise(root / f"data-{seed}", workload)
    chosen = store.active_clients[:clients] if isinstance(clients, int) else list(clients)
    unknown = sorted(set(chosen) - set(store.active_clients))
    if unknown:  # before anything is trained
        raise ValueError(f"no such clients: {unknown}")
    base = ensure_base(workload, root / f"base-{seed}", settings, seed)
    tasks = workload.tasks()
    names = [t.name for t in tasks]
    client_index = store.client_index()
    data = retain_set(store.client_data(), None, tasks=names, client_index=client_index,
                      state=RoundState(version=1))  # fmt: skip
    heldout = store.heldout().to_batch(client_index)
    cfg = TrainConfig.from_settings(settings)
    v1, _ = trained_adapter(cache, base, data, tasks, cfg, seed=seed)
    out = model_outputs(v1, heldout.inputs)  # v1's held-out level, as the round state keeps it
    original_val = {t.name: float(t.metric(out[t.name], heldout.labels[t.name])) for t in tasks}
    empty = data.select(torch.zeros(0, dtype=torch.long))
    judged_as = settings.get("acceptance", {})  # as a round judges, one bound at a time
    configs = {
        name: acceptance.AcceptanceConfig.from_settings({**judged_as, "unseen_noise": noise})
        for name, noise in BOUNDS.items()
    }
    k = AuditConfig.from_settings(settings).reference_adapters if references is None else references
    loaded = None
    if k:
        loaded, train_s = _references(workload, settings, base, data, heldout, client_index, cfg, k, seed,
                                      root / f"references-{seed}", cache)  # fmt: skip
        print(f"seed {seed}: {k} references trained in {train_s:.1f}s", flush=True)
        configs[WITH_ALLOWANCE] = acceptance.AcceptanceConfig.from_settings(
            {**judged_as, "unseen_noise": True, "reference_allowance": True}
        )
    rows = []
    for client in chosen:
        position = store.active_clients.index(client)  # the retrain's seed does not depend on the choice
        mine = data.subset == client_index[client]
        forget = data.select(torch.nonzero(mine).flatten())
        without = data.select(torch.nonzero(~mine).flatten())
        retrained, retrain_s = trained_adapter(
            cache, base, without, tasks, cfg, seed=seed + 1000 * (position + 1)
        )
        groups = acceptance.Groups(forget=forget, kept=empty, retained=empty, heldout=heldout)
        row: dict[str, Any] = {"client": client, "retrain_s": round(retrain_s, 1)}
        allowance: dict[str, float] = {}
        if loaded is not None:
            allowance = forget_bound_allowance(out_reference_targets(
                loaded, tasks, forget=forget, unseen=heldout, forget_tasks=names, client_index=client_index
            ))  # fmt: skip
            row["allowance"] = {t: round(v, 6) for t, v in allowance.items()}
        row["levels"] = {label: _levels(model, tasks, forget, heldout) for label, model in
                         (("retrain", retrained), ("v1", v1))}  # fmt: skip
        for name, ac in configs.items():
            raise_by = allowance.copy if name == WITH_ALLOWANCE else None
            for label, after in (("retrain", retrained), ("v1", v1)):
                judged = acceptance.check(v1, after, groups, tasks, names, ac, original_val=original_val,
                                          allowance=raise_by)  # fmt: skip
                row[f"{label}_{name}"] = {
                    task: {**c.to_json(), "memorised": not acceptance.nothing_to_show(c)}
                    for task, c in _forget_checks(judged).items()
                }
        rows.append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else {t: x["ok"] if isinstance(x, dict) else x
                                                                 for t, x in v.items()})
                          for k, v in row.items() if k != "levels"}), flush=True)  # fmt: skip
    return {"seed": seed, "heldout_rows": len(heldout), "references": k, "clients": rows}


def summary(seeds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per bound: client-tasks, the exact retrains' false alarms (a forget bound failed) and the
    client-tasks v1 itself fails (what the bound still catches without unlearning). The
    ``with_allowance`` bound only over the seeds that had references."""
    out: dict[str, Any] = {}
    for name in (*BOUNDS, WITH_ALLOWANCE):
        rows = [r for s in seeds for r in s["clients"] if f"retrain_{name}" in r]
        if not rows:
            continue
        retrain = [c for r in rows for c in r[f"retrain_{name}"].values()]
        v1 = [c for r in rows for c in r[f"v1_{name}"].values()]
        out[name] = {
            "client_tasks": len(retrain),
            "retrain_failed": sum(not c["ok"] for c in retrain),
            "v1_caught": sum(not c["ok"] for c in v1),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = calibration_parser("python -m bench.forget_bound", __doc__)
    parser.add_argument("--clients", type=int, default=8, help="clients per seed, each with its own retrain")
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="judge this client (repeatable; instead of the first --clients)",
    )
    parser.add_argument(
        "--settings",
        type=json.loads,
        default={},
        metavar="JSON",
        help='settings over the workload\'s, e.g. {"audit": {"reference_in_fraction": 0.75}}',
    )
    parser.add_argument("--training-cache", type=Path, default=None, metavar="DIR",
                        help="read v1, the references and the retrains from DIR where an earlier run "
                             "trained them; store them there (bench/training_cache.py)")  # fmt: skip
    parser.add_argument("--references", type=int, default=None,
                        help="reference adapters for the with_allowance bound (default: the workload's "
                             "audit.reference_adapters; 0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    if args.references is not None and (args.references < 0 or args.references % 2):
        parser.error("--references must be an even number >= 0")
    torch.set_num_threads(1)
    options = workload_options(parser, args)
    workloads = SeededWorkloads(args.workload, options)
    results = []
    cache = TrainingCache(args.training_cache)
    with tempfile.TemporaryDirectory(prefix="lethe-forget-bound-") as tmp:
        for seed in seeds(args):
            chosen = args.client or args.clients
            try:
                results.append(
                    measure_seed(workloads, seed, Path(tmp), chosen, args.references, args.settings, cache)
                )
            except ValueError as e:  # a client the workload does not have
                parser.error(str(e))
    out = {
        "workload": args.workload,
        "preset": args.preset,
        "workload_options": options,
        "settings": args.settings,
        "environment": runtime_environment(),
        "training_cache": {
            "dir": None if args.training_cache is None else str(args.training_cache),
            **cache.stats(),
        },
        "summary": summary(results),
        "seeds": results,
    }
    for name, s in out["summary"].items():
        print(f"{name}: exact retrains failing a forget bound {s['retrain_failed']}/{s['client_tasks']} "
              f"client-tasks; v1 (no unlearning) caught {s['v1_caught']}/{s['client_tasks']}")  # fmt: skip
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
