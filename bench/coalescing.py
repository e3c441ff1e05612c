"""Coalescing benchmark: N queued requests of one model → rounds and wall time, per round size.

The model (``digits-clients``, small training settings) is prepared once into a template home. For
each ``--sizes`` value k, a copy of the template gets N per-task requests queued in its database
(each forgets the ``digit`` label of one distinct client sample: N subjects, nothing merged), then the
embedded default starts (SQLite, its own Redis, the API and one real worker, ``--gpus none`` unless
``--gpus`` says otherwise) with ``LETHE_MAX_REQUESTS_PER_ROUND=k``; the sweeper wakes the model and
the worker runs rounds until every request is completed. Reported per k: rounds, wall time from the
first claim to the last completion (worker start-up excluded), seconds per request, and how many
rounds published the acceptance check's exact-retrain fallback.

    python -m bench coalescing --requests 100 --sizes 1,4,16 --json bench-results/coalescing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits"
#: the smallest training that still gives the method something to forget (tests/worker/system.py)
SMALL_SETTINGS: dict[str, Any] = {"pretrain": {"epochs": 5}, "train": {"epochs": 6, "main_only_epochs": 2}}


def _prepare_template(home: Path) -> float:
    from service.db.migrate import upgrade
    from service.settings import Settings
    from worker import models as ops

    settings = Settings(home=home, database_url=None)
    upgrade(settings.resolved_database_url)
    t0 = time.monotonic()
    ops.create_model(MODEL, workload="digits-clients", settings=SMALL_SETTINGS, app_settings=settings)
    ops.prepare_here(MODEL, app_settings=settings)
    return time.monotonic() - t0


def _queue_requests(home: Path, count: int) -> list[str]:
    """``count`` per-task requests on distinct client samples, queued straight in the database."""
    from sqlalchemy import select

    from service import lifecycle
    from service.db.models import Model, Sample
    from service.db.session import create_db_engine, make_session_factory, transaction
    from service.settings import Settings

    engine = create_db_engine(Settings(home=home, database_url=None).resolved_database_url)
    factory = make_session_factory(engine)
    try:
        with transaction(factory) as session:
            model_id = session.scalars(select(Model.id).where(Model.name == MODEL)).one()
            samples = list(
                session.scalars(
                    select(Sample.sample_id)
                    .where(Sample.model_id == model_id)
                    .order_by(Sample.id)
                    .limit(count)
                )
            )
            if len(samples) < count:
                raise SystemExit(f"only {len(samples)} samples: use fewer --requests")
            ids = []
            for i, sample in enumerate(samples):
                result = lifecycle.submit(
                    session,
                    lifecycle.Submission(model=MODEL, kind="task", sample_ids=[sample], tasks=["digit"]),
                    idempotency_key=f"bench-{i}",
                    api_key_id=None,
                    actor="coalescing-bench",
                )
                ids.append(result.request.id)
        return ids
    finally:
        engine.dispose()


def _state(home: Path) -> dict[str, Any]:
    """Request statuses, rounds and timings read from the run's database."""
    from sqlalchemy import func, select

    from service.db.models import Evidence, ForgetRequest, Round
    from service.db.session import create_db_engine, make_session_factory
    from service.settings import Settings

    engine = create_db_engine(Settings(home=home, database_url=None).resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            statuses = dict(
                session.execute(
                    select(ForgetRequest.status, func.count()).group_by(ForgetRequest.status)
                ).all()
            )
            rounds = session.execute(select(Round.status, Round.created_at, Round.finished_at)).all()
            last_done = session.scalar(select(func.max(ForgetRequest.completed_at)))
            fallback_rounds = {
                e.round_id
                for e in session.scalars(select(Evidence))
                if (e.payload.get("acceptance") or {}).get("path") == "retrain"
            }
    finally:
        engine.dispose()
    first = min((r.created_at for r in rounds), default=None)
    return {
        "statuses": {str(k): int(v) for k, v in statuses.items()},
        "rounds": len(rounds),
        "rounds_by_status": {s: sum(r.status == s for r in rounds) for s in {r.status for r in rounds}},
        "fallback_rounds": len(fallback_rounds),
        "wall_s": (last_done - first).total_seconds() if first and last_done else None,
    }


def run_size(
    template: Path, work: Path, size: int, requests: int, gpus: str, timeout: float
) -> dict[str, Any]:
    from worker.embedded import EmbeddedStack

    home = work / f"k{size}"
    shutil.copytree(template, home)
    _queue_requests(home, requests)
    env = {
        "LETHE_MAX_REQUESTS_PER_ROUND": str(size),
        "LETHE_WORKER_HEARTBEAT_SECONDS": "1",  # the sweeper that wakes the model runs with it
        "LETHE_LEASE_SECONDS": "120",
        "LETHE_DATABASE_URL": "",
    }
    started = time.monotonic()
    with EmbeddedStack(home=home, env=env, worker_args=["--gpus", gpus], restart_workers=False):
        while True:
            state = _state(home)
            done = state["statuses"].get("completed", 0) + state["statuses"].get("failed", 0)
            if done >= requests:
                break
            if time.monotonic() - started > timeout:
                raise SystemExit(f"k={size}: {state['statuses']} after {timeout:.0f} s")
            time.sleep(1.0)
    state = _state(home)
    state.update(
        max_requests_per_round=size,
        requests=requests,
        total_s=time.monotonic() - started,
        s_per_request=(state["wall_s"] or 0.0) / requests,
    )
    return state


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench coalescing") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--sizes", default="1,4,16", help="max_requests_per_round values, comma-separated")
    parser.add_argument("--gpus", default="none", help="the worker's --gpus (none: CPU)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per size")
    parser.add_argument(
        "--work", type=Path, default=None, help="directory for the homes (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("LETHE_WORKER_TORCH_THREADS", "1")
    work = (args.work or Path(tempfile.mkdtemp(prefix="lethe-coalescing-"))).resolve()
    template = work / "template"
    prepare_s = _prepare_template(template)
    print(f"template prepared in {prepare_s:.1f} s under {work}", flush=True)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        result = run_size(template, work, size, args.requests, args.gpus, args.timeout)
        results.append(result)
        print(
            f"max_requests_per_round={size:>3}: {result['rounds']:>3} rounds, {result['wall_s']:.1f} s "
            f"({result['s_per_request']:.2f} s/request), statuses {result['statuses']}, "
            f"fallback rounds {result['fallback_rounds']}",
            flush=True,
        )
    report = {
        "command": " ".join([prog, *(argv if argv is not None else sys.argv[1:])]),
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "settings": SMALL_SETTINGS,
        "prepare_s": prepare_s,
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0
