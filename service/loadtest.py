"""API throughput, Lethe beside a bare FastAPI endpoint, in one run (issue 10 part 5).

    python -m service.loadtest --database-url postgresql+psycopg://…/postgres --duration 15 \\
        --json bench-results/api-throughput.json --markdown -

Creates a scratch database on that PostgreSQL server (dropped at the end), seeds a ready model
with enough clients that no submission merges, then measures with ``--concurrency`` clients (one
kept-alive HTTP/1.1 connection each) for ``--duration`` seconds each, split over
``--client-processes`` load-generator processes (one uvloop each, started together, results merged).
The client is a minimal HTTP/1.1 exchange on asyncio streams, not httpx: on a machine it shares
with the servers, every CPU millisecond the load generator spends per call is taken from them, and
one process of httpx clients capped the bare endpoint at ~145 req/s:

- ``bare POST`` (1 and 2 processes): :func:`bare_app`, FastAPI validating the same body and
  header and inserting one row with SQLAlchemy;
- ``Lethe POST``: ``lethe serve --workers N`` (auth, idempotency, validation, merge check, the
  hash-chained events, the dispatcher note);
- ``Lethe 304``: ``GET /v1/models/{m}/adapters/latest`` with the current ``If-None-Match``;
- ``Lethe bulk``: ``--bulk`` requests in calls of 1,000 (wall time).

Every answer is checked (201 for a POST, 304 for the conditional GET) and the rows are counted:
each 201 must be stored exactly once. The load generator shares the machine's cores with the
servers, as in the issue's measurements.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import click
import httpx
from fastapi import FastAPI, Header
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, UniqueConstraint, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.api import schemas
from service.db.session import create_db_engine

#: The bare endpoint's one table (in the scratch database, beside Lethe's).
bare_metadata = MetaData()
bare_requests = Table(
    "bare_requests",
    bare_metadata,
    Column("id", Integer, primary_key=True),
    Column("idempotency_key", String(200), nullable=False),
    Column("model", String(100), nullable=False),
    Column("body", JSON, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("idempotency_key"),
)
BARE_DB_ENV = "LETHE_BARE_DATABASE_URL"
MODEL = "bench"


def bare_app() -> FastAPI:
    """The reference: validate the body and ``Idempotency-Key`` as Lethe does, insert one row."""
    engine = create_db_engine(os.environ[BARE_DB_ENV], pool_size=5, max_overflow=10)
    app = FastAPI()

    @app.post("/v1/forget-requests", status_code=201)
    def create(
        body: schemas.ForgetRequestIn,
        idempotency_key: Annotated[
            str, Header(alias="Idempotency-Key", pattern=schemas.IDEMPOTENCY_KEY_PATTERN)
        ],
    ) -> dict[str, Any]:
        payload = body.root.model_dump(mode="json")
        with Session(engine) as session, session.begin():
            row_id = session.execute(
                bare_requests.insert()
                .values(
                    idempotency_key=idempotency_key,
                    model=payload["model"],
                    body=payload,
                    received_at=datetime.now(UTC),
                )
                .returning(bare_requests.c.id)
            ).scalar_one()
        return {"id": row_id, **payload}

    return app


@dataclass
class Result:
    scenario: str
    processes: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    stored: int | None = None
    note: str = ""


@dataclass
class Report:
    environment: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(args: list[str], env: dict[str, str], port: int, ready_path: str, log: Path) -> Iterator[str]:
    """A server subprocess (its own process group); yields its base URL once it answers."""
    with log.open("ab") as sink:
        proc = subprocess.Popen(args, env=env, stdout=sink, stderr=sink, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise click.ClickException(f"{args} exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(base + ready_path, timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise click.ClickException(f"{args} did not answer within 60 s; see {log}")
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Call:
    """One scenario's request, picklable for the client processes: ``{n}`` in ``idempotency`` and
    ``client_id`` becomes the call's number (unique across every process of the run)."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None = None
    idempotency: str | None = None

    def request(self, host: str, n: int) -> bytes:
        """The HTTP/1.1 request of call number ``n``, as bytes."""
        headers = {"Host": host, **self.headers}
        if self.idempotency is not None:
            headers["Idempotency-Key"] = self.idempotency.format(n=n)
        body = b""
        if self.body is not None:
            body = json.dumps({**self.body, "client_id": f"c{n}"}).encode()
            headers.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return f"{self.method} {self.path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a kept-alive connection and read its whole answer; its status code.

    A minimal HTTP/1.1 client (status line, ``Content-Length`` bodies): it costs the load generator
    a fraction of httpx's CPU per call, which on a shared machine is CPU the servers keep."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise ConnectionError("a chunked answer: the load client reads Content-Length bodies only")
    if length:
        await reader.readexactly(length)
    return int(head[9:12])


@dataclass
class Measured:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def merge(self, other: Measured) -> None:
        self.latencies += other.latencies
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.seconds = max(self.seconds, other.seconds)


async def _load(
    base: str, call: Call, *, concurrency: int, duration: float, first: int = 0, stride: int = 1
) -> Measured:
    """``concurrency`` clients sending ``call`` back to back for ``duration`` seconds; the calls are
    numbered ``first``, ``first + stride``, … (so that processes never share a number)."""
    measured = Measured()
    counter = iter(range(first, 10**12, stride))
    url = httpx.URL(base)
    host, port = url.host, url.port or 80
    start = time.perf_counter()
    stop = start + duration

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop:
                request = call.request(f"{host}:{port}", next(counter))
                sent = time.perf_counter()
                try:
                    status = str(await asyncio.wait_for(_exchange(reader, writer, request), 30))
                except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                    status = "error"  # counted, and the connection is opened again
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                measured.latencies.append(time.perf_counter() - sent)
                measured.statuses[status] = measured.statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    measured.seconds = time.perf_counter() - start
    return measured


def _run(coroutine: Coroutine[Any, Any, Measured]) -> Measured:
    """Run on uvloop when it is installed (uvicorn's ``standard`` extra): a cheaper event loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _client_process(
    base: str,
    call: Call,
    concurrency: int,
    duration: float,
    index: int,
    processes: int,
    start: Any,
    results: Any,
) -> None:
    """One load-generator process: waits for the others (``start``, a barrier), then measures."""
    start.wait()
    measured = _run(
        _load(base, call, concurrency=concurrency, duration=duration, first=index, stride=processes)
    )
    results.put(asdict(measured))


def measure(base: str, call: Call, *, concurrency: int, duration: float, processes: int = 1) -> Measured:
    """``concurrency`` clients split over ``processes`` load-generator processes (one asyncio loop
    each, started together), so that one Python process's CPU does not cap the rate; results merged."""
    if processes <= 1:
        return _run(_load(base, call, concurrency=concurrency, duration=duration))
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or sockets
    start = ctx.Barrier(processes)
    results = ctx.Queue()
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    workers = [
        ctx.Process(
            target=_client_process,
            args=(base, call, share, duration, i, processes, start, results),
            name=f"lethe-load-{i}",
        )
        for i, share in enumerate(shares)
    ]
    for worker in workers:
        worker.start()
    merged = Measured()
    try:
        for _ in workers:
            merged.merge(Measured(**results.get(timeout=duration + 120)))
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
    return merged


def _result(scenario: str, processes: int, measured: Measured, **extra: Any) -> Result:
    latencies = measured.latencies
    return Result(
        scenario=scenario,
        processes=processes,
        requests=len(latencies),
        seconds=round(measured.seconds, 2),
        rps=round(len(latencies) / measured.seconds, 1),
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 1),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 1),
        statuses=measured.statuses,
        **extra,
    )


def _seed(url: str, clients: int) -> tuple[str, str]:
    """Migrate, register a ready model with ``clients`` clients and v1; returns (submit, serve) keys."""
    from service import rounds
    from service.db import migrate
    from service.db.session import create_db_engine, make_session_factory, transaction
    from service.repositories import keys as keys_repo
    from service.repositories import models as models_repo

    migrate.upgrade(url)
    engine = create_db_engine(url)
    bare_metadata.create_all(engine)
    digest = rounds.FileDigest(sha256="0" * 64, size=1)
    with transaction(make_session_factory(engine)) as session:
        models_repo.create_model(
            session, MODEL, workload="digits-clients", method="ssd", method_config={}, settings={}
        )
        rounds.register_prepared_model(
            session,
            MODEL,
            subjects={f"c{i}": [f"s{i}"] for i in range(clients)},
            location=f"{MODEL}/adapters/v1",
            files={"adapter_model.safetensors": digest},
            evidence={},
            tasks=["digit"],
            base_location=f"{MODEL}/base",
            base_files={"model.safetensors": digest},
        )
        _, submit = keys_repo.create_key(session, ["submit"])
        _, serve = keys_repo.create_key(session, ["serve"])
    engine.dispose()
    return submit, serve


def _truncate_bare(url: str) -> None:
    engine = sa_create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(bare_requests.delete())
    finally:
        engine.dispose()


def _count(url: str, sql: str) -> int:
    engine = sa_create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


@contextmanager
def _scratch_database(server_url: str) -> Iterator[str]:
    admin = sa_create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"lethe_load_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def run(
    server_url: str,
    *,
    broker_url: str | None,
    duration: float,
    concurrency: int,
    workers: int,
    bulk_total: int,
    log_dir: Path,
    client_processes: int = 1,
) -> Report:
    python = sys.executable
    report = Report(
        environment={
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            # other work on the machine moves req/s (not the ratios within one run as much): say it
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        settings={
            "duration_s": duration,
            "concurrency": concurrency,
            "lethe_workers": workers,
            "bulk_total": bulk_total,
            "broker": bool(broker_url),
            "client_processes": client_processes,
        },
    )
    post_budget = int(duration * 3000)  # distinct clients: no submission merges
    with _scratch_database(server_url) as url:
        submit, serve = _seed(url, post_budget + bulk_total)
        body = {"model": MODEL, "kind": "client"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
        env.update(PYTHONPATH=os.pathsep.join(sys.path), LETHE_HOME=str(log_dir / "home"))

        def post(prefix: str, key: str) -> Call:
            headers = {"Authorization": f"Bearer {key}"}
            return Call("POST", "/v1/forget-requests", headers, body=body, idempotency=prefix + "-{n}")

        def load(call: Call) -> Measured:
            return measure(base, call, concurrency=concurrency, duration=duration, processes=client_processes)

        # the bare endpoint, 1 and 2 processes
        for processes in (1, 2):
            port = _free_port()
            args = [python, "-m", "uvicorn", "--factory", "service.loadtest:bare_app", "--port", str(port)]
            args += ["--workers", str(processes), "--no-access-log", "--log-level", "warning"]
            _truncate_bare(url)
            with _server(args, {**env, BARE_DB_ENV: url}, port, "/docs", log_dir / "bare.log") as base:
                measured = load(post("bare", "x"))
            stored = _count(url, "SELECT count(*) FROM bare_requests")
            report.results.append(_result("bare POST", processes, measured, stored=stored))

        # Lethe
        port = _free_port()
        lethe_env = {**env, "LETHE_DATABASE_URL": url, "LETHE_LOG_FORMAT": "json"}
        if broker_url:
            lethe_env["LETHE_BROKER_URL"] = broker_url
        args = [python, "-c", "from service.cli import main; main()", "--log-level", "WARNING", "serve"]
        args += ["--port", str(port), "--workers", str(workers), "--no-migrate"]
        with _server(args, lethe_env, port, "/readyz", log_dir / "lethe.log") as base:
            measured = load(post("post", submit))
            stored = _count(url, "SELECT count(*) FROM forget_requests WHERE idempotency_key LIKE 'post-%'")
            report.results.append(_result("Lethe POST", workers, measured, stored=stored))

            latest = httpx.get(
                f"{base}/v1/models/{MODEL}/adapters/latest", headers={"Authorization": f"Bearer {serve}"}
            )
            conditional = {"Authorization": f"Bearer {serve}", "If-None-Match": latest.headers["etag"]}
            measured = load(Call("GET", f"/v1/models/{MODEL}/adapters/latest", conditional))
            report.results.append(_result("Lethe 304", workers, measured))

            report.results.append(_bulk(base, submit, url, total=bulk_total, first_client=post_budget))
    report.environment["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    _check(report)
    return report


def _bulk(base: str, key: str, url: str, *, total: int, first_client: int) -> Result:
    """``total`` submissions in calls of 1,000, one after another; wall time of them all."""
    from service.bulk import MAX_ITEMS

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    created = 0
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, timeout=120) as client:
        start = time.perf_counter()
        for offset in range(0, total, MAX_ITEMS):
            items = [
                {
                    "idempotency_key": f"bulk-{n}",
                    "request": {"model": MODEL, "kind": "client", "client_id": f"c{first_client + n}"},
                }
                for n in range(offset, min(total, offset + MAX_ITEMS))
            ]
            sent = time.perf_counter()
            response = client.post("/v1/forget-requests/bulk", json={"items": items}, headers=headers)
            latencies.append(time.perf_counter() - sent)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if response.status_code == 200:
                created += int(response.json()["created"])
        elapsed = time.perf_counter() - start
    stored = _count(url, "SELECT count(*) FROM forget_requests WHERE idempotency_key LIKE 'bulk-%'")
    return Result(
        scenario="Lethe bulk",
        processes=0,
        requests=created,
        seconds=round(elapsed, 2),
        rps=round(created / elapsed, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 1),
        p99_ms=round(max(latencies) * 1000, 1),
        statuses=statuses,
        stored=stored,
        note=f"{len(latencies)} calls of up to {MAX_ITEMS}; latencies are per call",
    )


def _check(report: Report) -> None:
    """Each 201 stored exactly once; the goals of issue 10 part 5."""
    by = {(r.scenario, r.processes): r for r in report.results}
    lethe = next(r for r in report.results if r.scenario == "Lethe POST")
    bare = max((r for r in report.results if r.scenario == "bare POST"), key=lambda r: r.rps)
    not_modified = next(r for r in report.results if r.scenario == "Lethe 304")
    bulk = next(r for r in report.results if r.scenario == "Lethe bulk")
    report.checks = {
        "stored_exactly_once": all(
            r.stored == r.statuses.get("201", 0) for r in report.results if r.scenario.endswith("POST")
        )
        and bulk.stored == bulk.requests,
        "only_expected_statuses": all(
            set(r.statuses) <= {"201"} for r in report.results if "POST" in r.scenario
        )
        and set(not_modified.statuses) == {"304"}
        and set(bulk.statuses) == {"200"},
        "post_vs_best_bare_rps": round(lethe.rps / bare.rps, 2),
        "post_p99_vs_best_bare_p99": round(lethe.p99_ms / bare.p99_ms, 2),
        "304_vs_post_rps": round(not_modified.rps / lethe.rps, 2),
        "bulk_seconds": bulk.seconds,
        "best_bare": f"{bare.processes} process(es)",
        "bare_1_vs_2": [by[("bare POST", 1)].rps, by[("bare POST", 2)].rps],
    }


def markdown(report: Report) -> str:
    lines = [
        "| scenario | processes | requests | req/s | p50 ms | p99 ms | statuses | rows stored |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        stored = "—" if r.stored is None else str(r.stored)
        lines.append(
            f"| {r.scenario} | {r.processes or '—'} | {r.requests} | {r.rps} | {r.p50_ms} | {r.p99_ms} "
            f"| {statuses} | {stored} |"
        )
    c = report.checks
    env, settings = report.environment, report.settings
    lines += [
        "",
        f"- {settings['concurrency']} clients in {settings.get('client_processes', 1)} load-generator "
        f"process(es); load average (1, 5, 15 min) before {env.get('load_average_before')}, after "
        f"{env.get('load_average_after')}",
        f"- Lethe POST / best bare POST throughput: **{c['post_vs_best_bare_rps']}×** (goal ≥ 0.8×)",
        f"- Lethe POST p99 / best bare p99: **{c['post_p99_vs_best_bare_p99']}×** (goal ≤ 1.5×)",
        f"- Lethe 304 / Lethe POST rate: **{c['304_vs_post_rps']}×** (goal ≥ 3×)",
        f"- {report.settings['bulk_total']} requests in bulk: **{c['bulk_seconds']} s** (goal ≤ 10 s)",
        f"- every 201 stored exactly once: **{c['stored_exactly_once']}**; "
        f"only the expected statuses: **{c['only_expected_statuses']}**",
    ]
    return "\n".join(lines) + "\n"


@click.command()
@click.option(
    "--database-url",
    envvar="LETHE_TEST_POSTGRES_URL",
    required=True,
    help="A PostgreSQL server URL (a scratch database is created there and dropped).",
)
@click.option("--broker-url", envvar="LETHE_TEST_REDIS_URL", default=None, help="Redis for Lethe's wakes.")
@click.option("--duration", default=15.0, show_default=True, help="Seconds per scenario.")
@click.option("--concurrency", default=32, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Lethe's processes (lethe serve --workers).")
@click.option(
    "--client-processes",
    default=2,
    show_default=True,
    help="Load-generator processes (the --concurrency clients are split over them).",
)
@click.option("--bulk", "bulk_total", default=10_000, show_default=True, help="Requests submitted in bulk.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@click.option(
    "--logs", "log_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Servers' logs."
)
def main(
    database_url: str,
    broker_url: str | None,
    duration: float,
    concurrency: int,
    workers: int,
    client_processes: int,
    bulk_total: int,
    json_out: Path | None,
    markdown_out: str,
    log_dir: Path | None,
) -> None:
    """Measure Lethe's API throughput beside a bare FastAPI endpoint (see the module docstring)."""
    if make_url(database_url).get_backend_name() != "postgresql":
        raise click.BadParameter("a PostgreSQL URL is needed", param_hint="--database-url")
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lethe-load-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"server logs: {log_dir}", err=True)
    report = run(
        database_url,
        broker_url=broker_url,
        duration=duration,
        concurrency=concurrency,
        workers=workers,
        bulk_total=bulk_total,
        log_dir=log_dir.resolve(),
        client_processes=client_processes,
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    with click.open_file(markdown_out, "w") as sink:
        sink.write(markdown(report))
    if not report.checks["stored_exactly_once"] or not report.checks["only_expected_statuses"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
