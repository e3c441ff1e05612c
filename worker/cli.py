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
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

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
@click.option(
    "--loglevel",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False),
)
@click.option(
    "--check",
    is_flag=True,
    help="Health check: exit 0 if a worker of this stack beat recently (LETHE_WORKER_ALIVE_FILE).",
)
def worker_command(gpus: str, loglevel: str, check: bool) -> None:
    """Run Celery workers: one process per GPU (solo pool), or one CPU worker."""
    from service.settings import Settings

    settings = Settings()
    if check:
        from worker.liveness import heartbeat_age

        age = heartbeat_age(settings)
        limit = 3 * WorkerSettings().heartbeat_seconds + 10
        if age > limit:
            since = "yet" if age == float("inf") else f"for {age:.0f} s"
            raise click.ClickException(f"no heartbeat {since} ({settings.resolved_worker_alive_file})")
        click.echo(f"ok: last heartbeat {age:.0f} s ago")
        return
    if not settings.broker_url:
        raise click.ClickException("LETHE_BROKER_URL is not set: there is no broker to take tasks from")
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


def _port_in_use(port: int) -> bool:
    """Whether the API could not listen on 127.0.0.1:``port`` (bound as uvicorn binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@click.command("up")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="API port (127.0.0.1; 0: any).",
)
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Worker processes to start."
)
def up_command(port: int, workers: int) -> None:
    """API + worker + embedded Redis on this machine (no external server); Ctrl-C stops all."""
    from service.settings import Settings
    from worker.embedded import EmbeddedStack

    # checked before anything starts: an API that cannot listen would exit after Redis and the
    # workers had started, while another server answered the health check on that port
    if port and _port_in_use(port):
        raise click.BadParameter(
            f"127.0.0.1:{port} is in use; stop what listens there or pick another port", param_hint="--port"
        )
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


def _json_object(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    """A JSON object option given inline or as ``@file``; None when not given."""
    if not value:
        return None
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value[1:]}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
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


def _check_workload_options(workload: str, options: dict[str, Any]) -> None:
    """Build the workload with ``options`` once (cheap: the built-in workloads load their data
    lazily), so that options its constructor refuses are refused before the model is registered."""
    from worker.unlearning.workload import WorkloadOptionsError, available_workloads, build_workload

    if workload not in available_workloads():
        return  # create_model names the available ones
    try:
        build_workload(workload, options)
    except (WorkloadOptionsError, OSError) as exc:  # OSError: e.g. an option naming a missing path
        raise click.BadParameter(str(exc), param_hint="--workload-option") from None


def _stored_model(name: str) -> dict[str, Any]:
    """The registered model ``name``'s status, workload and its options, method, method_config and
    settings."""
    from service.db.session import create_db_engine, make_session_factory, transaction
    from service.repositories import models as models_repo
    from service.settings import Settings

    engine = create_db_engine(Settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            model = models_repo.get_model(session, name)
            assert model is not None  # create_model found it
            return {
                "status": model.status,
                "workload": model.workload,
                "workload_options": dict(model.workload_options),
                "method": model.method,
                "method_config": dict(model.method_config),
                "settings": dict(model.settings),
            }
    finally:
        engine.dispose()


def _same_as_stored(name: str, given: dict[str, Any]) -> None:
    """Print the stored configuration of the existing model ``name``; refuse what was given
    (None: not given) if it differs, as ``models create`` never changes a model."""
    stored = _stored_model(name)
    differ = [
        f"{key} {json.dumps(value)} (stored: {json.dumps(stored[key])})"
        for key, value in given.items()
        if value is not None and value != stored[key]
    ]
    options = f" {json.dumps(stored['workload_options'])}" if stored["workload_options"] else ""
    summary = f"{stored['status']}, workload {stored['workload']}{options}, method {stored['method']}"
    if differ:
        raise click.ClickException(
            f"model {name} exists ({summary}); nothing changed, as these differ: {'; '.join(differ)}. "
            f"Change its method, method_config or settings with PATCH /v1/admin/models/{name}; "
            "another workload or workload options need a model of another NAME."
        )
    click.echo(f"model {name} exists ({summary})")


@models_command.command("create")
@click.argument("name", default=DEFAULT_MODEL)
@click.option("--workload", default=DEFAULT_WORKLOAD, show_default=True)
@click.option(
    "--workload-option", "workload_option", multiple=True, metavar="KEY=VALUE", help=WORKLOAD_OPTION_HELP
)
@click.option("--method", default=None, help="Unlearning method (default: the engine's default).")
@click.option("--method-config", default=None, callback=_json_object, help="JSON object (or @file).")
@click.option(
    "--settings",
    "settings_json",
    default=None,
    callback=_json_object,
    help="Per-model settings, JSON (or @file).",
)
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
    method_config: dict[str, Any] | None,
    settings_json: dict[str, Any] | None,
    prepare: str,
) -> None:
    """Register model NAME (default: digits) with its workload and options, method, settings, and
    train its v1. A model that exists is left as it is (it must match what is given)."""
    from worker import models as models_ops

    options = _workload_options(workload_option)
    _check_workload_options(workload, options)
    try:
        created = models_ops.create_model(
            name,
            workload=workload,
            workload_options=options,
            method=method,
            method_config=method_config or {},
            settings=settings_json or {},
        )
    except (ValueError, ServiceError) as exc:  # ServiceError: e.g. a method or setting the schemas refuse
        raise click.ClickException(str(exc)) from exc
    if created:
        shown = f" {json.dumps(options)}" if options else ""
        click.echo(f"model {name} registered (workload {workload}{shown})")
    else:
        workload_given = (
            click.get_current_context().get_parameter_source("workload") is not ParameterSource.DEFAULT
        )
        _same_as_stored(
            name,
            {
                "workload": workload if workload_given else None,
                "workload_options": options or None,
                "method": method,
                "method_config": method_config,
                "settings": settings_json,
            },
        )
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
    from sqlalchemy.exc import DBAPIError

    from worker import models as models_ops

    try:
        rows = models_ops.list_models()
    except DBAPIError as exc:  # e.g. a database `lethe migrate` has not created yet
        raise click.ClickException(f"cannot read the models: {exc.orig}; has `lethe migrate` run?") from exc
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models")
    for row in rows:
        options = json.dumps(row["workload_options"]) if row["workload_options"] else ""
        latest = "none" if row["latest_version"] is None else f"v{row['latest_version']}"
        click.echo(
            f"{row['name']:<20} {row['status']:<10} workload={row['workload']}{options} "
            f"method={row['method']} latest={latest} versions={row['versions']}"
        )


# ----------------------------------------------------------------------------------------------
# lethe demo
# ----------------------------------------------------------------------------------------------


@click.command("demo")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True)
@click.option("--reset", is_flag=True, help="Delete $LETHE_HOME first (a fresh run).")
@click.option("--timeout", default=280.0, show_default=True, help="Seconds to wait for the requests.")
@click.option(
    "--settings",
    "settings_json",
    default=None,
    callback=_json_object,
    help="Per-model settings, JSON (or @file), for a new model.",
)
def demo_command(model_name: str, reset: bool, timeout: float, settings_json: dict[str, Any] | None) -> None:
    """The main job: train v1, start everything, forget a client and a task over HTTP, pull, load."""
    from worker.demo import run_demo

    code = run_demo(model_name=model_name, reset=reset, timeout=timeout, settings=settings_json or {})
    if code:
        sys.exit(code)
