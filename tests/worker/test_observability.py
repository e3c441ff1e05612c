"""Issue 10 parts 1-2: Prometheus metrics after a round, and a round's JSON log lines.

A round runs through the real pipeline against SQLite with the stand-in engine of
``test_pipeline`` (no torch); the API's ``/metrics`` is then scraped with a TestClient on the same
database, and the worker's registry is read through the same collector its exporter serves.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from service import logs, metrics
from service.api.app import create_app
from service.db.models import ForgetRequest
from service.db.session import transaction
from service.db.types import utcnow
from tests.worker.requests import submit_client
from tests.worker.test_pipeline import MODEL, _fake_engine, _register, _submit, ctx  # noqa: F401
from worker import pipeline, round_job

OTHER = "m2"  # a second model, for a round of its own

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _scrape(context: pipeline.WorkerContext) -> Samples:
    with TestClient(create_app(context.settings)) as client:
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
        return _parse(response.text)


def test_metrics_after_a_round(ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """/metrics after one published round: queue state from the database, the round's own series."""
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    published_before = _counter("lethe_adapter_versions_published_total", model=MODEL)
    withdrawn_before = _counter("lethe_adapter_versions_withdrawn_total", model=MODEL)
    rounds_before = _counter("lethe_round_duration_seconds_count", model=MODEL, outcome="published")
    pipeline.heartbeat(ctx, queues=["lethe-gpu"], state="idle")
    _submit(ctx, "c0")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    waiting = _submit(ctx, "c1")  # queued behind it, and past its deadline
    with transaction(ctx.session_factory) as session:
        session.execute(
            update(ForgetRequest)
            .where(ForgetRequest.id == waiting)
            .values(due_at=utcnow() - timedelta(days=1), received_at=utcnow() - timedelta(hours=2))
        )

    samples = _scrape(ctx)
    assert _value(samples, "lethe_requests", model=MODEL, status="completed") == 1
    assert _value(samples, "lethe_queue_depth", model=MODEL) == 1
    oldest = _value(samples, "lethe_queue_oldest_age_seconds", model=MODEL)
    assert oldest is not None
    assert 7200 <= oldest < 7300
    assert _value(samples, "lethe_requests_overdue", model=MODEL) == 1
    assert _value(samples, "lethe_rounds", model=MODEL, status="completed") == 1
    assert _value(samples, "lethe_round_crashes", model=MODEL) == 0
    assert _value(samples, "lethe_request_attempts", model=MODEL) == 1
    assert _value(samples, "lethe_adapter_versions", model=MODEL, status="active") == 1
    assert _value(samples, "lethe_adapter_versions", model=MODEL, status="withdrawn") == 1
    age = _value(samples, "lethe_worker_heartbeat_age_seconds", worker="w1", state="idle")
    assert age is not None
    assert 0 <= age < 60
    # this process's counters, served by the API and by the worker's exporter alike
    assert _value(samples, "lethe_adapter_versions_published_total", model=MODEL) == published_before + 1
    assert _value(samples, "lethe_adapter_versions_withdrawn_total", model=MODEL) == withdrawn_before + 1
    count = _value(samples, "lethe_round_duration_seconds_count", model=MODEL, outcome="published")
    assert count == rounds_before + 1

    # the example alert rules name only series that exist
    rules = (Path(__file__).parents[2] / "deploy" / "prometheus" / "lethe-alerts.yml").read_text()
    names = {name for name, _ in samples}
    assert set(re.findall(r"\blethe_[a-z_]+", rules)) <= names

    # the worker's exporter serves the same registry (the collector called directly)
    worker_side = _parse(generate_latest(metrics.build_registry(ctx.session_factory)).decode())
    assert _value(worker_side, "lethe_requests_overdue", model=MODEL) == 1
    assert _value(worker_side, "lethe_queue_depth", model=MODEL) == 1


def test_metrics_count_final_failures_and_fallbacks(
    ctx: pipeline.WorkerContext,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A permanent error fails the request for good (cause ``permanent``); a round whose evidence
    says the acceptance check fell back to retrain counts a fallback, one that continued the
    update before the exact path a continuation (whether the continuation then passed or not), and
    one whose published model still fails its check (even the exact path) a failed publication."""

    def broken(*_: object, **__: object) -> round_job.EngineResult:
        raise ValueError("bad input")

    failures_before = _counter("lethe_request_failures_total", model=MODEL, cause="permanent")
    monkeypatch.setattr(round_job, "_run_engine", broken)
    _submit(ctx, "c0")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "failed"
    assert _counter("lethe_request_failures_total", model=MODEL, cause="permanent") == failures_before + 1

    fake = _fake_engine()
    _register(ctx, OTHER, {"d0": ["s9"], "d1": ["s8"]}, ["t"])

    def continued_then(path: str, passed: bool) -> Any:
        """An engine whose round continued the update, then published ``path`` (``passed``: the
        published model's check)."""

        def engine(*args: Any, **kwargs: Any) -> round_job.EngineResult:
            evidence = fake(*args, **kwargs).evidence
            accepted = {"checked": True, "passed": passed, "path": path, "continuation": {"runs": []}}
            return round_job.EngineResult({rid: {"acceptance": accepted} for rid in evidence}, None)

        return engine

    # a continuation that failed again before the exact path counts both; one that passed, one;
    # an exact path that still fails its check is counted as published with a failed check
    cases = (
        (MODEL, "c1", "retrain", False),
        (OTHER, "d0", "default+continuation", True),
        (OTHER, "d1", "retrain", True),
    )
    for model, client, path, passed in cases:
        fallbacks_before = _counter("lethe_acceptance_fallbacks_total", model=model)
        continuations_before = _counter("lethe_acceptance_continuations_total", model=model)
        failed_before = _counter("lethe_acceptance_failed_published_total", model=model)
        monkeypatch.setattr(round_job, "_run_engine", continued_then(path, passed))
        submit_client(ctx, model, client)
        result = pipeline.run_one_round(ctx, model)
        assert result is not None
        assert result.status == "published"
        assert _counter("lethe_acceptance_continuations_total", model=model) == continuations_before + 1
        fell_back = _counter("lethe_acceptance_fallbacks_total", model=model) - fallbacks_before
        assert fell_back == (path == "retrain")  # a continuation that passed is no fallback
        failed = _counter("lethe_acceptance_failed_published_total", model=model) - failed_before
        assert failed == (not passed)

    samples = _scrape(ctx)
    assert _value(samples, "lethe_requests", model=MODEL, status="failed") == 1
    assert _value(samples, "lethe_requests", model=MODEL, status="completed") == 1
    assert _value(samples, "lethe_rounds", model=MODEL, status="failed") == 1
    failures = _value(samples, "lethe_request_failures_total", model=MODEL, cause="permanent")
    assert failures == failures_before + 1


def test_metrics_can_be_turned_off(ctx: pipeline.WorkerContext) -> None:  # noqa: F811
    settings = ctx.settings.model_copy(update={"metrics_enabled": False})
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger's lines in the JSON format, as ``lethe worker`` writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_round_logs_are_json_with_round_and_model_and_no_subject_id(
    ctx: pipeline.WorkerContext,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    json_lines: io.StringIO,
) -> None:
    """Every line of a round is one JSON object carrying the round id and the model; the client id
    being forgotten appears in none."""
    client = "subject-alice-7f3e"
    _register(ctx, "m2", {client: ["sample-alice-1", "sample-alice-2"], "other": ["o1"]}, ["t"])
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    with transaction(ctx.session_factory) as session:
        from service import lifecycle

        lifecycle.submit(
            session,
            lifecycle.Submission(model="m2", kind="client", client_id=client),
            idempotency_key="k-alice",
            api_key_id=None,
            actor="test",
        )
    with logs.bound(task_id="task-1"):
        result = pipeline.run_one_round(ctx, "m2")
    assert result is not None
    assert result.status == "published"
    text = json_lines.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    round_lines = [line for line in lines if line["logger"] in ("worker.round_job", "worker.cleanup")]
    assert any("published" in line["message"] for line in round_lines)
    assert round_lines
    for line in round_lines:
        assert line["round_id"] == result.round_id
        assert line["model"] == "m2"
        assert line["task_id"] == "task-1"
        assert {"ts", "level", "message"} <= set(line)
    assert client not in text
    assert "sample-alice" not in text


def test_log_context_and_text_format() -> None:
    """Unknown context fields are refused (nothing but ids is bound); the text format keeps
    lines readable and appends the ids."""
    with pytest.raises(ValueError, match="client_id"):
        logs.bind(client_id="c0")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    with logs.bound(round_id=3, model="m1"):
        text = logs.TextFormatter().format(record)
        doc = json.loads(logs.JsonFormatter().format(record))
    assert text.endswith("x: hello world [round_id=3 model=m1]")
    assert doc["message"] == "hello world"
    assert doc["round_id"] == 3
    assert "round_id" not in json.loads(logs.JsonFormatter().format(record))


def test_http_responses_carry_a_request_id(ctx: pipeline.WorkerContext) -> None:  # noqa: F811
    with TestClient(create_app(ctx.settings)) as client:
        given = client.get("/healthz", headers={"X-Request-ID": "proxy-42"})
        made = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert given.headers["x-request-id"] == "proxy-42"
    assert len(made.headers["x-request-id"]) == 32


def test_configure_writes_json_lines_and_replaces_only_its_own_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`lethe serve` / `lethe worker` logging: one JSON object a line with the bound ids; a second
    configure replaces the first handler and leaves other handlers (a test runner's) alone."""
    root = logging.getLogger()
    level = root.level
    before = [h for h in root.handlers if not isinstance(h, logs._LetheHandler)]  # a CLI test's may linger
    try:
        logs.configure("text")
        logs.configure("json", "INFO")
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1
        assert all(h in root.handlers for h in before)
        with logs.bound(model="m9", round_id=7):
            logging.getLogger("lethe.test").info("round %d done", 7)
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        [doc] = [d for d in lines if d["logger"] == "lethe.test"]
        assert doc == {**doc, "level": "info", "message": "round 7 done", "model": "m9", "round_id": 7}
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def test_each_gpu_process_gets_its_own_exporter_port() -> None:
    """`lethe worker` with several GPUs: the children's exporters must not fight over one port."""
    from worker.cli import metrics_port_of_slot

    port = "LETHE_WORKER_METRICS_PORT"
    assert metrics_port_of_slot({port: "9100"}, 2)[port] == "9102"
    assert metrics_port_of_slot({port: "0"}, 2)[port] == "0"
    assert "LETHE_WORKER_METRICS_PORT" not in metrics_port_of_slot({}, 1)
