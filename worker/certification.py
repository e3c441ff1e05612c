"""Certification off the request path: the body of ``lethe.certify_version`` and the round's snapshot.

- :func:`after_publish` (called by the round pipeline after publishing, *before* the purge): for a
  round chosen by ``LETHE_CERTIFY_SHARE`` (a deterministic draw per model and round), keep a
  certification snapshot of each request's X_f (every label) under
  ``<data dir>/<model>/certification/round-<id>/`` and record a ``sampled`` certification request.
- :func:`run_certification` (``lethe.certify_version(certification_id)``, queue ``lethe.certify``):
  claims the request (``requested`` → ``running``), trains the retrain reference and compares
  (``worker.unlearning.certify.certify_version``), then in one transaction records the verdict,
  appends one evidence row per request of the version (``payload.kind = "certification"``) and a
  chained event (``certified`` / ``flagged`` / ``certification_incomplete``); the snapshot is
  deleted after that commit. Without a snapshot (on demand after the purge) the forget-set terms
  are reported unavailable and the verdict is ``incomplete``.
- :func:`requeue_stale` / :func:`requested` (the sweeper): a certification whose worker died goes back to
  ``requested``; requested ones are (re)sent.

Torch and the ML core are imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from service import certification as certification_service
from service import metrics, rounds
from service.db.models import AdapterVersion, Model
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import certifications as certifications_repo
from service.repositories import events as events_repo
from service.repositories import rounds as rounds_repo
from service.repositories import versions as versions_repo
from service.storage import NotInStoreError
from worker import context
from worker.unlearning.state import STATE_FILE

log = logging.getLogger(__name__)

#: verdict of ``worker.unlearning.certify`` → certification status and request event type
ADAPTER_COPY = "adapter"  # the version's files inside its snapshot
STATUS = {"within_bounds": "certified", "out_of_bounds": "flagged", "incomplete": "incomplete"}
EVENT = {"certified": "certified", "flagged": "flagged", "incomplete": "certification_incomplete"}


def snapshot_dir(ctx: context.WorkerContext, model_name: str, round_id: int) -> Path:
    return ctx.data_dir(model_name) / "certification" / f"round-{round_id}"


def sampled(model_name: str, round_id: int, share: float) -> bool:
    """Whether the round is certified: a deterministic draw (the same on a retried round)."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    digest = hashlib.sha256(f"{model_name}:{round_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


def after_publish(
    ctx: context.WorkerContext, claimed: rounds.ClaimedRound, published: rounds.PublishedVersion
) -> int | None:
    """Snapshot the forget sets of a sampled round and request its certification; the id or None.

    The snapshot also keeps a copy of the version's adapter files: the next round withdraws the
    version and deletes its files, possibly before the certification runs.
    Never raises: the version is published whatever happens here (a crash before this point loses
    the snapshot; certifying that version later reports the forget-set terms unavailable)."""
    if not sampled(claimed.model_name, claimed.round_id, ctx.settings.certify_share):
        return None
    version = published.version
    try:
        from worker.unlearning.certify import forget_sets, save_snapshot
        from worker.unlearning.datastore import DataStore

        data_dir = ctx.data_dir(claimed.model_name)
        with context.model_lock(data_dir):  # the purge takes the same lock
            store = DataStore(data_dir)
            specs = [context._spec(r) for r in claimed.requests]
            snap = save_snapshot(
                snapshot_dir(ctx, claimed.model_name, claimed.round_id), forget_sets(store, specs)
            )
        artifacts = ctx.artifacts(claimed.model_name)
        shutil.copytree(artifacts.resolve(published.location), snap / ADAPTER_COPY)
        # the version's unlearning state is kept worker-side, outside its (served) directory
        shutil.copy2(artifacts.state_file(published.location), snap / ADAPTER_COPY / STATE_FILE)
        with transaction(ctx.session_factory) as session:
            row, _ = certification_service.request_certification(
                session, claimed.model_name, version, actor=ctx.worker_id, trigger="sampled"
            )
            return row.id
    except Exception:
        log.exception("round %d: could not prepare its certification", claimed.round_id)
        # raw data of forgotten subjects is kept only for a certification that will run
        shutil.rmtree(snapshot_dir(ctx, claimed.model_name, claimed.round_id), ignore_errors=True)
        return None


@dataclass(frozen=True)
class _Job:
    certification_id: int
    model: Model
    model_name: str
    version: int
    version_id: int
    round_id: int
    location: str
    requests: list[tuple[str, list[str], dict[str, Any]]]  # id, forgotten tasks, request evidence


def _load_job(ctx: context.WorkerContext, certification_id: int) -> _Job | None:
    with transaction(ctx.session_factory) as session:
        if not certifications_repo.start(session, certification_id, at=utcnow()):
            return None  # not requested: a duplicate message, or another worker has it
        row = certifications_repo.get(session, certification_id)
        assert row is not None
        version = session.get(AdapterVersion, row.version_id)
        model = session.get(Model, row.model_id)
        assert version is not None
        assert model is not None
        assert version.round_id is not None
        evidence = {
            e.request_id: e.payload
            for e in versions_repo.evidence_of_version(session, version.id)
            if e.payload.get("kind") != "certification"
        }
        requests = []
        for req in rounds_repo.covered_requests(session, version.round_id):
            doc = evidence.get(req.id, {})
            tasks = list(doc.get("forget_tasks") or req.tasks or model.tasks)
            requests.append((req.id, tasks, doc))
        session.expunge(model)
        return _Job(
            certification_id, model, model.name, version.version, version.id, version.round_id,
            version.location, requests,
        )  # fmt: skip


def run_certification(ctx: context.WorkerContext, certification_id: int) -> str | None:
    """The body of ``lethe.certify_version``: the final status, or None when there was nothing to do."""
    job = _load_job(ctx, certification_id)
    if job is None:
        return None
    snap = snapshot_dir(ctx, job.model_name, job.round_id)
    try:
        doc = _certify(ctx, job, snap)
    except Exception as exc:
        log.exception("certification %d of %s v%d failed", certification_id, job.model_name, job.version)
        with transaction(ctx.session_factory) as session:
            row = certifications_repo.get(session, certification_id)
            assert row is not None
            certification_service.finish(
                session,
                row,
                status="failed",
                version=job.version,
                at=utcnow(),
                error=f"{type(exc).__name__}: {exc}"[:2000],
            )
        metrics.CERTIFICATION_RESULTS.labels(job.model_name, "failed").inc()
        return "failed"
    status = STATUS[doc["verdict"]]
    metrics.CERTIFICATION_RESULTS.labels(job.model_name, status).inc()
    summary = {k: v for k, v in doc.items() if k != "requests"}
    summary["requests"] = {rid: r["verdict"] for rid, r in doc["requests"].items()}
    with transaction(ctx.session_factory) as session:
        row = certifications_repo.get(session, certification_id)
        assert row is not None
        certification_service.finish(
            session, row, status=status, version=job.version, at=utcnow(), result=summary,
            verdicts=summary["requests"],
        )  # fmt: skip
        for request_id, per_request in doc["requests"].items():
            payload = {
                **summary,
                "certification_id": certification_id,
                **per_request,
                "overall": doc["verdict"],
            }
            payload.pop("requests", None)
            verdict = per_request["verdict"]  # this request's; ``overall`` is the version's
            payload["within_bounds"] = None if verdict == "incomplete" else verdict == "within_bounds"
            versions_repo.add_evidence(
                session,
                request_id=request_id,
                round_id=job.round_id,
                version_id=job.version_id,
                payload=payload,
            )
            events_repo.append_event(
                session,
                request_id,
                EVENT[STATUS[per_request["verdict"]]],
                actor=ctx.worker_id,
                detail={
                    "certification_id": certification_id,
                    "version": job.version,
                    "verdict": per_request["verdict"],
                    "uis": per_request["uis"]["value"],
                },
            )
    shutil.rmtree(snap, ignore_errors=True)  # after the commit: a failed attempt keeps it for a retry
    log.info("certification %d of %s v%d: %s", certification_id, job.model_name, job.version, status)
    return status


def _certify(ctx: context.WorkerContext, job: _Job, snap: Path) -> dict[str, Any]:
    from worker.unlearning.audit import ModelMetrics
    from worker.unlearning.certify import CertifyRequest, certify_version, load_snapshot
    from worker.unlearning.engine import EngineInputs

    workload = context._load_workload(job.model)
    store = ctx.artifacts(job.model_name)
    inputs = EngineInputs.load(
        workload,
        data_dir=ctx.data_dir(job.model_name),
        base_dir=store.fetch_base(job.model.base_files),
        settings=dict(job.model.settings),
        seed=ctx.worker_settings.seed,
        device=ctx.device,
        cache_dir=None,
    )
    snapshot = load_snapshot(snap, workload.collate) or {}
    requests = [
        CertifyRequest(
            request_id=rid,
            forget_tasks=tasks,
            forget=snapshot.get(rid),
            original=ModelMetrics.from_json(doc["original_metrics"]) if doc.get("original_metrics") else None,
        )
        for rid, tasks, doc in job.requests
    ]
    adapter_dir = store.resolve(job.location)
    with contextlib.suppress(NotInStoreError):  # withdrawn since: the snapshot below
        adapter_dir = store.fetch_version(job.location)
    state_file = store.fetch_state(job.location)
    if not (adapter_dir / "adapter_model.safetensors").exists():  # withdrawn since: its files are deleted
        adapter_dir = snap / ADAPTER_COPY
        state_file = adapter_dir / STATE_FILE
        if not (adapter_dir / "adapter_model.safetensors").exists():
            raise FileNotFoundError(
                f"the files of {job.model_name} v{job.version} are deleted and no snapshot kept them"
            )
    result = certify_version(inputs, adapter_dir=adapter_dir, requests=requests, state_file=state_file)
    return result.to_json()


def requeue_stale(ctx: context.WorkerContext) -> list[int]:
    """Certifications ``running`` longer than the hard time limit (their worker died) → ``requested``."""
    cutoff = utcnow() - timedelta(seconds=ctx.worker_settings.hard_time_limit)
    with transaction(ctx.session_factory) as session:
        return certifications_repo.requeue_running(session, started_before=cutoff)


def requested(
    ctx: context.WorkerContext, *, model_name: str | None = None, min_age_seconds: float = 0.0
) -> list[int]:
    """Ids of certifications waiting for a worker (of ``model_name``; requested a while ago)."""
    with transaction(ctx.session_factory) as session:
        model_id = None
        if model_name is not None:
            from service.repositories import models as models_repo

            found = models_repo.get_model(session, model_name)
            if found is None:
                return []
            model_id = found.id
        return certifications_repo.requested_ids(
            session, model_id=model_id, before=utcnow() - timedelta(seconds=min_age_seconds)
        )
