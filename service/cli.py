"""The ``lethe`` console script.

Built-in commands: ``serve``, ``keys create``, ``migrate``, ``sweep``. More commands come from the
entry-point group ``lethe.cli`` (the worker's ``worker``, ``up``, ``demo``, …); they are loaded only
when listed or invoked, and one that fails to import breaks nothing else: invoking it prints why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.engine import make_url

from service import logs
from service.cli_options import api_key_option, api_url_option
from service.db.models import SCOPES, ApiKey
from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy.orm import Session

ENTRY_POINT_GROUP = "lethe.cli"


def _broken_command(name: str, error: BaseException) -> click.Command:
    message = f"the command {name!r} is unavailable: {type(error).__name__}: {error}"

    @click.command(
        name=name,
        help=f"(unavailable: {type(error).__name__})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def broken() -> None:
        raise click.ClickException(message)

    return broken


class LetheGroup(click.Group):
    """A group that adds the commands of the ``lethe.cli`` entry-point group, lazily."""

    def _entry_points(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._entry_points()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        builtin = super().get_command(ctx, cmd_name)
        if builtin is not None:
            return builtin
        ep = self._entry_points().get(cmd_name)
        if ep is None:
            return None
        try:
            loaded = ep.load()
        except Exception as exc:  # an optional part (e.g. the worker's torch) is missing or broken
            return _broken_command(cmd_name, exc)
        if not isinstance(loaded, click.Command):
            return _broken_command(cmd_name, TypeError(f"{ep.value} is not a click command"))
        return loaded


LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


@click.group(cls=LetheGroup)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Python logging level.",
)
def main(log_level: str) -> None:
    """Lethe: right-to-be-forgotten requests turned into versioned model updates."""
    # text unless LETHE_LOG_FORMAT says otherwise; `serve` and `worker` switch to json by default
    logs.configure(Settings().log_format or "text", log_level)


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


@main.command()
def migrate() -> None:
    """Create or upgrade the database to the latest schema."""
    from service.db import migrate as migrations

    settings = Settings()
    migrations.upgrade(settings.resolved_database_url)
    click.echo(f"database at {make_url(settings.resolved_database_url).render_as_string()} is up to date")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--migrate/--no-migrate",
    "run_migrations",
    default=None,
    help="Upgrade the database first (default: only for SQLite, the embedded default).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="API processes sharing the port (PostgreSQL only; SQLite allows one writer: keep 1).",
)
def serve(host: str, port: int, run_migrations: bool | None, workers: int) -> None:
    """Run the HTTP API (no torch in this process)."""
    import uvicorn

    from service.api.app import create_app
    from service.api.wire import ProblemHttpToolsProtocol
    from service.db import migrate as migrations

    settings = Settings()
    logs.configure(settings.log_format or "json", logging.getLogger().level)
    sqlite = _is_sqlite(settings.resolved_database_url)
    if workers > 1 and sqlite:
        raise click.UsageError("--workers > 1 needs PostgreSQL (LETHE_DATABASE_URL); SQLite has one writer")
    if run_migrations or (run_migrations is None and sqlite):
        migrations.upgrade(settings.resolved_database_url)
    # Forwarded headers only from the configured proxies (LETHE_TRUSTED_PROXIES); none by default.
    trusted = settings.trusted_proxies
    os.environ[_LOG_LEVEL_ENV] = logging.getLevelName(logging.getLogger().level)
    # Several processes: uvicorn imports the factory in each (settings from the same environment);
    # each process has its own pool and dispatcher. No sweeper: the workers' heartbeat sweeps.
    uvicorn.run(
        "service.cli:served_app" if workers > 1 else create_app(settings),
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        # uvicorn sets its own loggers' level (the access log's too) from this: follow --log-level,
        # so that --log-level WARNING really has no access-log line per request
        log_level=logging.getLogger().level,
        log_config=None,  # uvicorn's loggers (access log included) propagate to ours: one format
        access_log=True,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        http=ProblemHttpToolsProtocol,  # the server's own 400s as problem+json, too
    )


#: The parent's log level, handed to the processes of ``serve --workers N`` (they start afresh).
_LOG_LEVEL_ENV = "LETHE_SERVE_LOG_LEVEL"


def served_app() -> FastAPI:
    """The app of one ``serve --workers N`` process: its own logging, settings from the environment."""
    from service.api.app import create_app

    settings = Settings()
    logs.configure(settings.log_format or "json", os.environ.get(_LOG_LEVEL_ENV, "INFO"))
    return create_app(settings)


@main.group()
def keys() -> None:
    """API keys."""


def _key_name(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """The API's rule for a key's name (``ApiKeyIn.name``), so that the CLI stores no name the API
    would refuse."""
    from pydantic import TypeAdapter, ValidationError

    from service.api.schemas import ApiKeyIn

    if value is None:
        return None
    rule: Any = ApiKeyIn.model_fields["name"].annotation  # the field's type, its pattern included
    try:
        TypeAdapter(rule).validate_python(value)
    except ValidationError as exc:
        raise click.BadParameter(
            f"the API refuses this name: {exc.errors()[0]['msg']} (no control characters, at most 200)"
        ) from None
    return value


@keys.command("create")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(SCOPES),
    help="submit, admin or serve (repeatable).",
)
@click.option("--name", default=None, callback=_key_name, help="A label for the key.")
def keys_create(scopes: tuple[str, ...], name: str | None) -> None:
    """Create an API key and print it (it is shown only this once)."""
    from service.db.session import create_db_engine, make_session_factory, transaction
    from service.repositories import keys as keys_repo

    engine = create_db_engine(Settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            _, secret = keys_repo.create_key(session, scopes, name=name)
    finally:
        engine.dispose()
    click.echo(secret)
    click.echo(
        f"scopes: {', '.join(sorted(set(scopes)))} (store the key now; only its hash is kept)", err=True
    )


@contextlib.contextmanager
def _key_session() -> Iterator[Session]:
    from service.db.session import create_db_engine, make_session_factory, transaction

    engine = create_db_engine(Settings().resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


def _locked_key(session: Session, key_id: int) -> ApiKey:
    """The key ``key_id``, locked for an update; a CLI error when there is none."""
    from service.repositories import keys as keys_repo

    row = keys_repo.get_key(session, key_id, lock=True)
    if row is None:
        raise click.ClickException(f"API key {key_id} does not exist")
    return row


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


@keys.command("list")
def keys_list() -> None:
    """List API keys: id, prefix, scopes, name, created, last used, rotated, revoked (no secrets)."""
    from service.repositories import keys as keys_repo

    rows = []
    with _key_session() as session:
        for k in keys_repo.list_keys(session):
            state = "revoked" if k.revoked_at is not None else "active"
            rows.append(
                f"{k.id}\t{k.prefix}\t{state}\t{','.join(k.scopes)}\t{k.name or '-'}\t{_when(k.created_at)}"
                f"\t{_when(k.last_used_at)}\t{_when(k.rotated_at)}\t{_when(k.revoked_at)}"
            )
    click.echo("id\tprefix\tstate\tscopes\tname\tcreated\tlast_used\trotated\trevoked")
    for row in rows:
        click.echo(row)


@keys.command("revoke")
@click.argument("key_id", type=click.IntRange(1, 2**31 - 1))
def keys_revoke(key_id: int) -> None:
    """Revoke the key KEY_ID (see `lethe keys list`) at once."""
    from service.repositories import keys as keys_repo

    with _key_session() as session:
        row = _locked_key(session, key_id)
        keys_repo.revoke_key(session, row)
    click.echo(f"key {key_id} revoked", err=True)


@keys.command("rotate")
@click.argument("key_id", type=click.IntRange(1, 2**31 - 1))
def keys_rotate(key_id: int) -> None:
    """Give the key KEY_ID a new secret and print it; the old secret stops working at once."""
    from service.repositories import keys as keys_repo

    with _key_session() as session:
        row = _locked_key(session, key_id)
        if row.revoked_at is not None:
            raise click.ClickException(f"API key {key_id} is revoked; create a new one")
        _, secret = keys_repo.rotate_key(session, row)
    click.echo(secret)
    click.echo(f"key {key_id} rotated (store the new key now; only its hash is kept)", err=True)


@main.group("requests")
def requests_group() -> None:
    """Forget requests, through the API."""


@requests_group.command("follow")
@click.argument("request_id")
@api_url_option
@api_key_option("submit", required=True)
@click.option(
    "--interval", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Seconds between polls."
)
@click.option(
    "--timeout",
    default=None,
    type=click.FloatRange(min=0),
    help="Give up after this many seconds (default: never).",
)
def requests_follow(request_id: str, url: str, api_key: str, interval: float, timeout: float | None) -> None:
    """Follow a request until it is final, with its round's progress bar; exit 1 unless completed."""
    import httpx

    from service.follow import FollowError, follow

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll would bury the bar
    # on a terminal, redraw one line in place; otherwise one line per change (logs)
    tty = sys.stdout.isatty()

    def echo(line: str) -> None:
        click.echo(f"\r\x1b[2K{line}" if tty else line, nl=not tty)

    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            body = follow(client, request_id, echo=echo, interval=interval, timeout=timeout)
    except FollowError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if tty:
            click.echo("")
    if body.get("status") != "completed":
        raise click.ClickException(
            f"request {request_id} {body.get('status')}: {body.get('error') or ''}".rstrip(": ")
        )


@main.command()
def sweep() -> None:
    """Send wake-ups once, now, for every model with queued requests and no live lease.

    A manual nudge, e.g. while no worker sweeps (``LETHE_WORKER_SWEEP=false`` on all of them): the
    workers' heartbeat is the system's only periodic sweeper (worker/liveness.py)."""
    from service import rounds
    from service.db.session import create_db_engine, make_session_factory, transaction
    from service.dispatch import Dispatcher

    settings = Settings()
    if not settings.broker_url:
        raise click.ClickException("LETHE_BROKER_URL is not set: there is no broker to send wake-ups to")
    engine = create_db_engine(settings.resolved_database_url)
    dispatcher = Dispatcher(settings.broker_url, timeout_seconds=settings.dispatch_timeout_seconds)
    try:
        with transaction(make_session_factory(engine)) as session:
            names = rounds.models_to_wake(session)
        woken = [name for name in names if dispatcher.wake(name)]
    finally:
        dispatcher.close()
        engine.dispose()
    click.echo(f"woke: {', '.join(woken)}" if woken else "nothing to wake")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
