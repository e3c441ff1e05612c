"""Prometheus metrics (docs/operations.md, "Metrics").

Two kinds of series:

* **queue state**, computed from the database at scrape time by :class:`DatabaseCollector` (a few
  grouped queries), so that every API process and every worker report the same numbers and a
  restart loses nothing;
* **events of this process** (round durations, final failures, acceptance fallbacks, certification
  results, versions published / withdrawn): counters and a histogram in the default registry,
  incremented where the event happens (the worker, and ``service.rounds`` for final failures).

Torch-free: the API and the worker both use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from service.db.models import ACTIVE_REQUEST_STATUSES
from service.db.types import utcnow
from service.repositories import metrics as metrics_repo

#: statuses that wait for a round (queue depth); running / verifying are in a round already
QUEUED_STATUSES = ("received", "queued")

ROUND_DURATION = Histogram(
    "lethe_round_duration_seconds",
    "Wall time of a round attempt in this worker, from claim to its end, by outcome "
    "(published, failed, lease_lost).",
    ["model", "outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
REQUEST_FAILURES = Counter(
    "lethe_request_failures_total",
    "Forget requests that failed for good, by cause (permanent, attempts, crashes).",
    ["model", "cause"],
)
ACCEPTANCE_FALLBACKS = Counter(
    "lethe_acceptance_fallbacks_total",
    "Rounds whose method failed the acceptance check and that published the exact path (retrain).",
    ["model"],
)
ACCEPTANCE_CONTINUATIONS = Counter(
    "lethe_acceptance_continuations_total",
    "Rounds whose update failed only forget bounds of the acceptance check and was continued "
    "(the interference-aware stage once more) before the exact path, whatever the second check said.",
    ["model"],
)
ACCEPTANCE_FAILED = Counter(
    "lethe_acceptance_failed_published_total",
    "Rounds that published a model failing its acceptance check (after the exact path, or with "
    "acceptance.fallback none the update itself): the requests' evidence carries the warning.",
    ["model"],
)
CERTIFICATION_RESULTS = Counter(
    "lethe_certification_results_total",
    "Certifications finished by this worker, by result (certified, flagged, incomplete).",
    ["model", "result"],
)
VERSIONS_PUBLISHED = Counter(
    "lethe_adapter_versions_published_total", "Adapter versions published by this worker's rounds.", ["model"]
)
VERSIONS_WITHDRAWN = Counter(
    "lethe_adapter_versions_withdrawn_total",
    "Adapter versions withdrawn by this worker's rounds (they held a forgotten subject).",
    ["model"],
)


class DatabaseCollector(Collector):
    """Queue-state gauges read from the database at each scrape (one short transaction)."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self._sessions() as session:
            models = metrics_repo.model_names(session)
            groups = metrics_repo.request_groups(session)
            overdue = metrics_repo.overdue_counts(session, now=now)
            round_rows = metrics_repo.round_counts(session)
            versions = metrics_repo.version_counts(session)
            certifications = metrics_repo.certification_counts(session)
            workers = metrics_repo.worker_heartbeats(session)
            session.rollback()  # read only: release the snapshot at once

        requests = GaugeMetricFamily(
            "lethe_requests",
            "Forget requests by model and status (every status, ever).",
            labels=["model", "status"],
        )
        depth = GaugeMetricFamily(
            "lethe_queue_depth", "Requests waiting for a round (received or queued).", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "lethe_queue_oldest_age_seconds",
            "Age of the oldest request not yet finished (received, queued, running, verifying); 0 if none.",
            labels=["model"],
        )
        attempts = GaugeMetricFamily(
            "lethe_request_attempts",
            "Round attempts (method runs) summed over the model's requests.",
            labels=["model"],
        )
        crashes = GaugeMetricFamily(
            "lethe_request_crashes",
            "Lost workers (expired leases) summed over the model's requests.",
            labels=["model"],
        )
        depth_of = dict.fromkeys(models, 0)
        oldest_of = dict.fromkeys(models, 0.0)
        attempts_of = dict.fromkeys(models, 0)
        crashes_of = dict.fromkeys(models, 0)
        for g in groups:
            requests.add_metric([g.model, g.status], g.count)
            attempts_of[g.model] = attempts_of.get(g.model, 0) + g.attempts
            crashes_of[g.model] = crashes_of.get(g.model, 0) + g.crashes
            if g.status in QUEUED_STATUSES:
                depth_of[g.model] = depth_of.get(g.model, 0) + g.count
            if g.status in ACTIVE_REQUEST_STATUSES and g.oldest_received_at is not None:
                age = max(0.0, (now - g.oldest_received_at).total_seconds())
                oldest_of[g.model] = max(oldest_of.get(g.model, 0.0), age)
        _fill(depth, depth_of)
        _fill(oldest, oldest_of)
        _fill(attempts, attempts_of)
        _fill(crashes, crashes_of)
        overdue_gauge = GaugeMetricFamily(
            "lethe_requests_overdue",
            "Requests past their deadline (due_at), not completed, cancelled or rejected (failed count).",
            labels=["model"],
        )
        _fill(overdue_gauge, {**dict.fromkeys(models, 0), **overdue})
        rounds_gauge = GaugeMetricFamily(
            "lethe_rounds", "Rounds by model and status.", labels=["model", "status"]
        )
        round_crashes = GaugeMetricFamily(
            "lethe_round_crashes", "Round attempts beyond the first (a worker was lost).", labels=["model"]
        )
        crashes_by_model: dict[str, int] = dict.fromkeys(models, 0)
        for model, status, n, extra in round_rows:
            rounds_gauge.add_metric([model, status], n)
            crashes_by_model[model] = crashes_by_model.get(model, 0) + extra
        _fill(round_crashes, crashes_by_model)
        versions_gauge = GaugeMetricFamily(
            "lethe_adapter_versions",
            "Adapter versions by model and status (active, withdrawn).",
            labels=["model", "status"],
        )
        for model, status, n in versions:
            versions_gauge.add_metric([model, status], n)
        certs = GaugeMetricFamily(
            "lethe_certifications",
            "Certifications by model and status (requested, running, certified, flagged, incomplete,"
            " failed).",
            labels=["model", "status"],
        )
        for model, status, n in certifications:
            certs.add_metric([model, status], n)
        heartbeat = GaugeMetricFamily(
            "lethe_worker_heartbeat_age_seconds",
            "Seconds since each known worker's last heartbeat.",
            labels=["worker", "state"],
        )
        for worker_id, state, at in workers:
            heartbeat.add_metric([worker_id, state], max(0.0, (now - at).total_seconds()))
        yield from (
            requests, depth, oldest, overdue_gauge, attempts, crashes, rounds_gauge, round_crashes,
            versions_gauge, certs, heartbeat,
        )  # fmt: skip


def _fill(family: GaugeMetricFamily, values: dict[str, Any]) -> None:
    for model, value in sorted(values.items()):
        family.add_metric([model], value)


class _ProcessMetrics(Collector):
    """This process's own series (the default registry: counters above, process and GC metrics)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def build_registry(sessions: Callable[[], Session]) -> CollectorRegistry:
    """What ``/metrics`` (API) and the worker's exporter serve: the database's queue state and this
    process's own series. One registry per app / exporter (the database collector is not global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    registry.register(_ProcessMetrics())
    return registry
