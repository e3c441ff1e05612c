"""Worker-side ``lethe`` commands (entry-point group ``lethe.cli``): worker, up, demo, models
(``lethe bench`` is the bench package's, :mod:`bench.cli`).

Importing this module loads neither torch nor the ML core: commands import them when they run, and
``lethe worker`` initialises CUDA only inside the per-GPU child processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from service import logs
from service.errors import ServiceError
from worker.config import WorkerSettings

DEFAULT_MODEL = "digits"
DEFAULT_WORKLOAD = "digits-clients"


# ----------------------------------------------------------------------------------------------
# lethe worker
# ----------------------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """GPU ids this host offers, without initialising CUDA here (CUDA_VISIBLE_DEVICES, nvidia-smi)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def _keep_our_logging(**_: object) -> None:
    """Logging is configured by :func:`service.logs.configure`; Celery leaves it alone."""


def run_celery_worker(loglevel: str, slot: str) -> None:
    """Run one Celery worker in this process: solo pool, one task at a time."""
    from service.settings import Settings
    from worker import tasks
    from worker.celery_app import configure

    settings = Settings()
    worker_settings = WorkerSettings()
    app = configure(settings, worker_settings)
    tasks.register(settings, worker_settings)
    log_format = settings.log_format or "json"
    logs.configure(log_format, loglevel)
    from celery import signals

    # a receiver of setup_logging stops Celery from adding its own handlers: one format for all lines
    signals.setup_logging.connect(_keep_our_logging, weak=False)
    if worker_settings.metrics_port:
        from worker.exporter import start_exporter

        start_exporter(settings, host=worker_settings.metrics_host, port=worker_settings.metrics_port)
    app.worker_main(
        [
            *(["--quiet"] if log_format == "json" else []),  # no banner on stdout between the JSON lines
            "worker",
            "--pool=solo",
            "--concurrency=1",
            f"--hostname=lethe-{slot}-{os.getpid()}@%h",
            "--queues",
            ",".join(worker_settings.queues),
            "--loglevel",
            loglevel.upper(),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def child_command(gpu: str, loglevel: str) -> tuple[list[str], dict[str, str]]:
    """Command and environment of the worker process for one GPU: it sees only that GPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, LETHE_WORKER_DEVICE="cuda")
    code = "import sys; from service.cli import main; sys.argv[0] = 'lethe'; main()"
    return [sys.executable, "-c", code, "worker", "--gpus", "inherit", "--loglevel", loglevel], env


def metrics_port_of_slot(env: dict[str, str], slot: int) -> dict[str, str]:
    """One exporter per GPU process: the ports LETHE_WORKER_METRICS_PORT, + 1, … (0 stays off)."""
    base = int(env.get("LETHE_WORKER_METRICS_PORT") or 0)
    return {**env, "LETHE_WORKER_METRICS_PORT": str(base + slot)} if base else env


def supervise(gpus: list[str], loglevel: str) -> int:
    """One child process per GPU (CUDA_VISIBLE_DEVICES=<gpu>), restarted when it dies."""
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def spawn(gpu: str) -> subprocess.Popen[bytes]:
        args, env = child_command(gpu, loglevel)
        return subprocess.Popen(args, env=metrics_port_of_slot(env, gpus.index(gpu)))

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for gpu in gpus:
        children[gpu] = spawn(gpu)
    while True:
        time.sleep(1.0)
        if stopping:
            for proc in children.values():
                proc.wait()
            return 0
        for gpu, proc in list(children.items()):
            if proc.poll() is not None:
                click.echo(f"lethe worker: GPU {gpu} worker exited ({proc.returncode}); restarting", err=True)
                time.sleep(2.0)
                children[gpu] = spawn(gpu)


@click.command("worker")
@click.option(
    "--gpus",
    default="auto",
    show_default=True,
    help="auto: one process per visible GPU (CPU when none); none: CPU; or a list like 0,1.",
)
@click.option("--loglevel", default="info", show_default=True)
@click.option("--check", is_flag=True, help="Health check: exit 0 if this host's worker beat recently.")
def worker_command(gpus: str, loglevel: str, check: bool) -> None:
    """Run Celery workers: one process per GPU (solo pool), or one CPU worker."""
    if check:
        from worker.liveness import ALIVE_FILE

        age = time.time() - ALIVE_FILE.stat().st_mtime if ALIVE_FILE.exists() else float("inf")
        limit = 3 * WorkerSettings().heartbeat_seconds + 10
        if age > limit:
            raise click.ClickException(f"no heartbeat for {age:.0f} s")
        click.echo(f"ok: last heartbeat {age:.0f} s ago")
        return
    if gpus == "inherit":  # a supervised child: CUDA_VISIBLE_DEVICES is already set
        run_celery_worker(loglevel, f"gpu{os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
        return
    if gpus == "auto":
        gpu_list = visible_gpus()
    elif gpus == "none":
        gpu_list = []
    else:
        gpu_list = [g.strip() for g in gpus.split(",") if g.strip()]
    if not gpu_list:
        os.environ.setdefault("LETHE_WORKER_DEVICE", "cpu")
        run_celery_worker(loglevel, "cpu")
        return
    if len(gpu_list) == 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_list[0]  # before anything imports torch
        os.environ.setdefault("LETHE_WORKER_DEVICE", "cuda")
        run_celery_worker(loglevel, f"gpu{gpu_list[0]}")
        return
    sys.exit(supervise(gpu_list, loglevel))


# ----------------------------------------------------------------------------------------------
# lethe up
# ----------------------------------------------------------------------------------------------


@click.command("up")
@click.option("--port", default=8000, show_default=True, help="API port (127.0.0.1).")
@click.option("--workers", default=1, show_default=True)
def up_command(port: int, workers: int) -> None:
    """API + worker + embedded Redis on this machine (no external server); Ctrl-C stops all."""
    from service.settings import Settings
    from worker.embedded import EmbeddedStack

    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings()
    env = {
        "LETHE_LEASE_SECONDS": os.environ.get("LETHE_LEASE_SECONDS", "30"),
        "LETHE_WORKER_HEARTBEAT_SECONDS": os.environ.get("LETHE_WORKER_HEARTBEAT_SECONDS", "2"),
    }
    stack = EmbeddedStack(home=settings.resolved_home, api_port=port, workers=workers, env=env)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with stack:
        click.echo(f"Lethe is up: API {stack.api_url} (docs {stack.api_url}/docs), broker {stack.redis.url}")
        click.echo(f"state: {stack.home}; logs: {stack.home / 'logs'}")
        click.echo("create a key: lethe keys create --scope admin   (Ctrl-C stops everything)")
        while not stopping:
            time.sleep(0.5)
            if stack.api is not None and stack.api.poll() is not None:
                raise click.ClickException(
                    f"the API exited ({stack.api.returncode}); see {stack.home / 'logs'}"
                )
    click.echo("stopped")


# ----------------------------------------------------------------------------------------------
# lethe models
# ----------------------------------------------------------------------------------------------


@click.group("models")
def models_command() -> None:
    """Register and list models."""


def _json_option(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    data = json.loads(text)
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object")
    return data


def _workload_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    from service.workload_options import parse_pairs

    try:
        return parse_pairs(pairs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--workload-option") from exc


WORKLOAD_OPTION_HELP = (
    "KEY=VALUE passed to the workload's constructor (repeatable; VALUE parsed as JSON, else a string)."
)


@models_command.command("create")
@click.argument("name", default=DEFAULT_MODEL)
@click.option("--workload", default=DEFAULT_WORKLOAD, show_default=True)
@click.option(
    "--workload-option", "workload_option", multiple=True, metavar="KEY=VALUE", help=WORKLOAD_OPTION_HELP
)
@click.option("--method", default=None, help="Unlearning method (default: the engine's default).")
@click.option("--method-config", default=None, help="JSON object (or @file).")
@click.option("--settings", "settings_json", default=None, help="Per-model settings, JSON (or @file).")
@click.option(
    "--prepare",
    type=click.Choice(["here", "queue", "none"]),
    default="here",
    show_default=True,
    help="Train v1 in this process, on a worker (lethe.prepare_model), or later.",
)
def models_create(
    name: str,
    workload: str,
    workload_option: tuple[str, ...],
    method: str | None,
    method_config: str | None,
    settings_json: str | None,
    prepare: str,
) -> None:
    """Register model NAME (workload and its options, method, settings) and train its v1."""
    from worker import models as models_ops

    options = _workload_options(workload_option)
    try:
        created = models_ops.create_model(
            name,
            workload=workload,
            workload_options=options,
            method=method,
            method_config=_json_option(method_config),
            settings=_json_option(settings_json),
        )
    except (ValueError, ServiceError) as exc:  # ServiceError: e.g. a method or setting the schemas refuse
        raise click.ClickException(str(exc)) from exc
    shown = f" {json.dumps(options)}" if options else ""
    click.echo(f"model {name} {'registered' if created else 'exists'} (workload {workload}{shown})")
    if prepare == "here":
        started = time.monotonic()
        version = models_ops.prepare_here(name)
        took = time.monotonic() - started
        click.echo(f"model {name}: v{version} ready ({took:.1f} s)" if version else f"model {name}: ready")
    elif prepare == "queue":
        models_ops.queue_prepare(name)
        click.echo(f"model {name}: lethe.prepare_model sent")


@models_command.command("reapply-erasures")
@click.argument("names", nargs=-1)
@click.option(
    "--quarantine-unknown",
    is_flag=True,
    help="Move sealed version directories the database does not know to <model>/quarantine/.",
)
def models_reapply_erasures(names: tuple[str, ...], quarantine_unknown: bool) -> None:
    """After a restore (workers stopped): re-apply every recorded erasure to the artifacts and the
    data store of the models NAMES (default: all), then check the database against the artifacts.
    Exits 1 if they still disagree (the problems are printed)."""
    from service.settings import Settings
    from worker import restore
    from worker.config import WorkerSettings
    from worker.context import WorkerContext
    from worker.liveness import ready_models

    ctx = WorkerContext.create(Settings(), WorkerSettings(device="cpu"), worker_id="reapply-erasures")
    disagree = False
    try:
        for name in names or tuple(ready_models(ctx)):
            try:
                report = restore.reapply_erasures(ctx, name, quarantine_unknown=quarantine_unknown)
            except LookupError as exc:
                raise click.ClickException(str(exc)) from exc
            click.echo(
                f"{name}: withdrew {report.withdrawn or 'none'}, "
                f"deleted files of {report.deleted or 'none'}, "
                f"purged the data of {report.purged_requests} completed request(s), "
                f"quarantined {report.quarantined or 'none'}"
            )
            for problem in report.problems:
                disagree = True
                click.echo(f"{name}: DISAGREES: {problem}", err=True)
    finally:
        ctx.close()
    if disagree:
        sys.exit(1)


@models_command.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json: bool) -> None:
    """List registered models with their latest version."""
    from worker import models as models_ops

    rows = models_ops.list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models")
    for row in rows:
        options = json.dumps(row["workload_options"]) if row["workload_options"] else ""
        click.echo(
            f"{row['name']:<20} {row['status']:<10} workload={row['workload']}{options} "
            f"method={row['method']} latest=v{row['latest_version']} versions={row['versions']}"
        )


# ----------------------------------------------------------------------------------------------
# lethe demo
# ----------------------------------------------------------------------------------------------


@click.command("demo")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True)
@click.option("--reset", is_flag=True, help="Delete $LETHE_HOME first (a fresh run).")
@click.option("--timeout", default=280.0, show_default=True, help="Seconds to wait for the requests.")
@click.option("--settings", "settings_json", default=None, help="Per-model settings (JSON) for a new model.")
def demo_command(model_name: str, reset: bool, timeout: float, settings_json: str | None) -> None:
    """The main job: train v1, start everything, forget a client and a task over HTTP, pull, load."""
    from worker.demo import run_demo

    code = run_demo(model_name=model_name, reset=reset, timeout=timeout, settings=_json_option(settings_json))
    if code:
        sys.exit(code)
