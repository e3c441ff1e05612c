"""The queue protocol: the worker's only way to change queue state.

Every function takes a SQLAlchemy ``Session`` and only flushes; the caller (the task boundary) owns
the transaction and commits it. The database enforces the invariants:

- at most one live (running / verifying) round per model: a partial unique index on ``rounds``;
- claims of one model are serialised: PostgreSQL locks the model row ``FOR UPDATE SKIP LOCKED`` (a
  second claimer gets ``None`` at once instead of waiting); SQLite transactions are
  ``BEGIN IMMEDIATE``;
- a round's holder is proven by its fencing token: every write re-reads the round row under lock and
  raises :class:`LeaseLost` if the token changed (another worker resumed it) or the round ended.
  A holder whose lease expired but was not taken over keeps its token and may still publish.
- requests are claimed strictly in arrival order (``forget_requests.seq``); a resumed round keeps
  its requests.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metrics
from service.db.models import LIVE_ROUND_STATUSES, ROUND_STAGES, ForgetRequest, Model, Round
from service.db.types import utcnow
from service.fileio import FileDigest
from service.repositories import events as events_repo
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import rounds as rounds_repo
from service.repositories import versions as versions_repo
from service.repositories import workers as workers_repo
from service.webhooks import events as webhook_events

log = logging.getLogger(__name__)

__all__ = [
    "ClaimedRequest",
    "ClaimedRound",
    "FileDigest",
    "LeaseLost",
    "PublishedVersion",
    "RetryPolicy",
    "UnknownModelError",
    "claim_round",
    "fail_round",
    "files_from_json",
    "files_to_json",
    "heartbeat",
    "mark_model_failed",
    "mark_purged",
    "mark_verifying",
    "models_to_wake",
    "publish_round",
    "record_progress",
    "register_prepared_model",
    "renew_lease",
]


@dataclass(frozen=True)
class ClaimedRequest:
    id: str
    kind: Literal["client", "task"]
    client_id: str | None
    sample_ids: list[str] | None
    tasks: list[str]
    attempts: int
    crashes: int = 0


@dataclass(frozen=True)
class ClaimedRound:
    round_id: int
    model_name: str
    fencing_token: int
    worker_id: str
    requests: list[ClaimedRequest]  # arrival order
    method: str
    method_config: dict[str, Any]
    parent_version: int | None
    parent_location: str | None  # latest active version
    #: The model's settings when the round was claimed (``None``: a round claimed before rounds
    #: recorded them; use the model's). A reconfiguration applies from the next round.
    settings: dict[str, Any] | None = None


@dataclass(frozen=True)
class PublishedVersion:
    model_name: str
    version: int
    parent_version: int | None
    location: str
    files: dict[str, FileDigest]
    round_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class RetryPolicy:
    """When a retryable round failure (a method error) is retried.

    Attempt ``n`` that failed is retried after ``min(max, base * 2**(n-1))`` seconds, less up to
    half of it at random ("equal jitter"): retries of requests that failed together spread out, and
    a transient fault (a rename, a full disk, a restarting database) gets minutes, not milliseconds.
    ``max_attempts`` counts method errors only; infrastructure crashes (lease expired, worker lost)
    are capped by ``claim_round(max_crashes=...)``.
    """

    max_attempts: int = 5
    base_seconds: float = 15.0
    max_seconds: float = 300.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        full = min(self.max_seconds, self.base_seconds * 2.0 ** max(0, attempt - 1))
        return float(full / 2 + rand() * full / 2)


class LeaseLost(Exception):  # noqa: N818 (the contract's name)
    """The round is no longer held under this fencing token; the caller must stop and roll back."""


class UnknownModelError(LookupError):
    """No model of that name is registered."""


def files_to_json(files: dict[str, FileDigest]) -> dict[str, Any]:
    return {name: {"sha256": d.sha256, "size": d.size} for name, d in sorted(files.items())}


def files_from_json(files: dict[str, Any]) -> dict[str, FileDigest]:
    return {name: FileDigest(sha256=str(d["sha256"]), size=int(d["size"])) for name, d in files.items()}


# --- claiming -------------------------------------------------------------------------------------


def claim_round(
    session: Session,
    model_name: str,
    worker_id: str,
    *,
    lease_seconds: int,
    max_requests: int,
    max_attempts: int,
    max_crashes: int | None = None,
) -> ClaimedRound | None:
    """Claim the model's next round, or ``None`` when there is nothing to do or someone else holds it.

    Resumes the model's live round whose lease expired (same requests, crashes + 1, new fencing
    token; a round that crashed more than ``max_crashes`` times, default ``max_attempts - 1``, fails
    its requests) or starts a
    round with the oldest queued requests. Requests whose attempts (method errors) reached
    ``max_attempts`` fail instead of being claimed again. A request waiting for its retry time
    (``not_before``) holds back the requests behind it: the order is strict.
    """
    if max_requests < 1:
        raise ValueError("max_requests must be at least 1")
    model = models_repo.lock_model(session, model_name, skip_locked=True)
    if model is None or model.status != "ready":
        return None
    now = utcnow()
    live = rounds_repo.live_round(session, model.id, lock=True)
    if live is not None:
        if live.lease_expires_at is not None and live.lease_expires_at > now:
            return None
        crashes = max_attempts - 1 if max_crashes is None else max_crashes
        resumed = _resume(session, model, live, worker_id, now, lease_seconds, crashes)
        if resumed is not None:
            return resumed
    return _start(session, model, worker_id, now, lease_seconds, max_requests, max_attempts)


def _next_token(model: Model) -> int:
    model.last_fencing_token += 1
    return model.last_fencing_token


def _resume(
    session: Session,
    model: Model,
    live: Round,
    worker_id: str,
    now: datetime,
    lease_seconds: int,
    max_crashes: int,
) -> ClaimedRound | None:
    requests = rounds_repo.covered_requests(session, live.id, lock=True)
    previous_owner = live.lease_owner
    # A round's attempts beyond the first are infrastructure crashes (its lease expired: the
    # worker died or hung), counted apart from the method errors of fail_round.
    if live.attempts > max_crashes:
        error = f"round {live.id} lost its worker {live.attempts - 1} times (lease expired); giving up"
        _end_round(session, live, status="failed", error=error, now=now)
        for request in requests:
            _fail_for_good(session, request, actor="system", error=error, now=now, cause="crashes")
        return None
    live.attempts += 1
    live.fencing_token = _next_token(model)
    live.lease_owner = worker_id
    live.lease_expires_at = now + timedelta(seconds=lease_seconds)
    live.status = "running"
    live.updated_at = now
    # the new attempt starts over: the old attempt's stage is not where this one is
    live.progress_stage = live.progress_step = live.progress_of = live.progress_at = None
    for request in requests:
        request.crashes += 1
        _set_status(
            session,
            request,
            "running",
            actor=worker_id,
            event="resumed",
            now=now,
            detail={
                "round_id": live.id,
                "fencing_token": live.fencing_token,
                "attempt": request.attempts,
                "crashes": request.crashes,
                "previous_owner": previous_owner,
            },
        )
    session.flush()
    return _claimed(session, model, live, worker_id, requests)


def _start(
    session: Session,
    model: Model,
    worker_id: str,
    now: datetime,
    lease_seconds: int,
    max_requests: int,
    max_attempts: int,
) -> ClaimedRound | None:
    # Lock every row first and append events (which take the chain lock) afterwards: a
    # transaction never waits for a row lock while it holds the chain lock.
    chosen: list[ForgetRequest] = []
    exhausted: list[ForgetRequest] = []
    after_seq = 0
    waiting = False
    while len(chosen) < max_requests and not waiting:
        batch = requests_repo.oldest_queued(
            session, model.id, limit=max_requests - len(chosen), after_seq=after_seq, lock=True
        )
        if not batch:
            break
        for request in batch:
            after_seq = request.seq
            if request.attempts >= max_attempts:
                exhausted.append(request)
            elif request.not_before is not None and request.not_before > now:
                waiting = True  # its retry time has not come: it and everything behind it wait
                break
            else:
                chosen.append(request)
    for request in exhausted:
        error = f"gave up after {request.attempts} attempts: {request.error or 'unknown error'}"
        _fail_for_good(session, request, actor="system", error=error, now=now, cause="attempts")
    if not chosen:
        session.flush()
        return None
    parent = versions_repo.latest_active(session, model.id)
    token = _next_token(model)
    round_ = Round(
        model_id=model.id,
        status="running",
        method=model.method,
        method_config=dict(model.method_config),
        settings=dict(model.settings),
        lease_owner=worker_id,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        fencing_token=token,
        attempts=1,
        parent_version=parent.version if parent is not None else None,
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(round_)
            session.flush()
    except IntegrityError:
        # Another live round exists (the partial unique index): not ours to run.
        return None
    rounds_repo.attach_requests(session, round_.id, chosen)
    for request in chosen:
        request.attempts += 1
        request.not_before = None
        request.round_id = round_.id
        _set_status(
            session,
            request,
            "running",
            actor=worker_id,
            event="claimed",
            now=now,
            detail={"round_id": round_.id, "fencing_token": token, "attempt": request.attempts},
        )
    session.flush()
    return _claimed(session, model, round_, worker_id, chosen)


def _claimed(
    session: Session, model: Model, round_: Round, worker_id: str, requests: list[ForgetRequest]
) -> ClaimedRound:
    parent_location = None
    if round_.parent_version is not None:
        parent = versions_repo.get_version(session, model.id, round_.parent_version)
        parent_location = parent.location if parent is not None else None
    return ClaimedRound(
        round_id=round_.id,
        model_name=model.name,
        fencing_token=round_.fencing_token,
        worker_id=worker_id,
        requests=[
            ClaimedRequest(
                id=r.id,
                kind=cast(Literal["client", "task"], r.kind),
                client_id=r.client_id,
                sample_ids=list(r.sample_ids) if r.sample_ids is not None else None,
                tasks=list(r.tasks),
                attempts=r.attempts,
                crashes=r.crashes,
            )
            for r in requests
        ],
        method=round_.method,
        method_config=dict(round_.method_config),
        parent_version=round_.parent_version,
        parent_location=parent_location,
        settings=dict(round_.settings) if round_.settings is not None else None,
    )


# --- holding a round ------------------------------------------------------------------------------


def _held(session: Session, claimed: ClaimedRound) -> Round:
    round_ = rounds_repo.get_round(session, claimed.round_id, lock=True)
    if round_ is None or round_.status not in LIVE_ROUND_STATUSES:
        raise LeaseLost(f"round {claimed.round_id} is no longer live")
    if round_.fencing_token != claimed.fencing_token:
        raise LeaseLost(
            f"round {claimed.round_id} was taken over (token {round_.fencing_token}, "
            f"ours {claimed.fencing_token})"
        )
    return round_


def renew_lease(session: Session, claimed: ClaimedRound, *, lease_seconds: int) -> None:
    round_ = _held(session, claimed)
    now = utcnow()
    round_.lease_expires_at = now + timedelta(seconds=lease_seconds)
    round_.updated_at = now
    session.flush()


def record_progress(session: Session, claimed: ClaimedRound, *, stage: str, step: int, of: int) -> bool:
    """Record the stage of the held round (docs/api.md, "Progress"). Returns False, and writes nothing,
    when the round is no longer ours (ended, or resumed under another token): progress is advisory,
    the next fenced write (lease renewal, publish) raises :class:`LeaseLost`."""
    if stage not in ROUND_STAGES:
        raise ValueError(f"unknown round stage {stage!r} (one of {list(ROUND_STAGES)})")
    if step < 0 or of < 0 or (of and step > of):
        raise ValueError(f"progress step {step} of {of} is out of range")
    return rounds_repo.set_progress(
        session, claimed.round_id, claimed.fencing_token, stage=stage, step=step, of=of, at=utcnow()
    )


def mark_verifying(session: Session, claimed: ClaimedRound) -> None:
    round_ = _held(session, claimed)
    now = utcnow()
    round_.status = "verifying"
    round_.updated_at = now
    for request in rounds_repo.covered_requests(session, round_.id, lock=True):
        _set_status(session, request, "verifying", actor=claimed.worker_id, now=now)
    session.flush()


def publish_round(
    session: Session,
    claimed: ClaimedRound,
    *,
    location: str,
    files: dict[str, FileDigest],
    evidence: dict[str, dict[str, Any]],
    withdraw_versions: list[int],
) -> PublishedVersion:
    """Publish the round's adapter version and complete its requests, after checking the token."""
    round_ = _held(session, claimed)
    now = utcnow()
    model_id = round_.model_id
    version = versions_repo.add_version(
        session,
        model_id=model_id,
        version=versions_repo.next_version_number(session, model_id),
        parent_version=round_.parent_version,
        location=location,
        files=files_to_json(files),
        round_id=round_.id,
    )
    versions_repo.withdraw(session, model_id, withdraw_versions, at=now)
    requests = rounds_repo.covered_requests(session, round_.id, lock=True)
    for request in requests:
        versions_repo.add_evidence(
            session,
            request_id=request.id,
            round_id=round_.id,
            version_id=version.id,
            payload=evidence.get(request.id, {}),
        )
        _mark_forgotten(session, model_id, request, at=now)
        request.version_id = version.id
        request.completed_at = now
    for request in requests:
        _set_status(
            session,
            request,
            "completed",
            actor=claimed.worker_id,
            now=now,
            error=None,
            detail={
                "round_id": round_.id,
                "version": version.version,
                "withdrawn_versions": sorted(withdraw_versions),
            },
        )
    webhook_events.request_results(  # the outbox row commits with the completion it reports
        session,
        requests,
        webhook_events.REQUEST_COMPLETED,
        status="completed",
        data={"version": version.version, "round_id": round_.id},
    )
    _end_round(session, round_, status="completed", error=None, now=now)
    return PublishedVersion(
        model_name=claimed.model_name,
        version=version.version,
        parent_version=version.parent_version,
        location=version.location,
        files=dict(files),
        round_id=round_.id,
        created_at=version.created_at,
    )


def _mark_forgotten(session: Session, model_id: int, request: ForgetRequest, *, at: datetime) -> None:
    """Record what a completed request erased, exactly: a client in full only when the request
    covered every task of the model; otherwise the tasks, per client or per sample."""
    tasks = list(request.tasks)
    if request.kind == "client" and request.client_id is not None:
        model = session.get(Model, model_id)
        assert model is not None
        if set(tasks) >= set(model.tasks):
            models_repo.mark_subjects_forgotten(
                session, model_id, [request.client_id], request_id=request.id, at=at, tasks=model.tasks
            )
        else:
            models_repo.mark_client_tasks_forgotten(session, model_id, request.client_id, tasks)
    elif request.sample_ids:
        models_repo.mark_sample_tasks_forgotten(session, model_id, request.sample_ids, tasks)


def fail_round(
    session: Session,
    claimed: ClaimedRound,
    *,
    error: str,
    retryable: bool,
    retry: RetryPolicy | None = None,
) -> None:
    """End the round as failed. A retryable error queues its requests again after a backoff
    (``retry``; default :class:`RetryPolicy`), unless they used their attempts: then, like a
    permanent error, they fail for good."""
    policy = retry or RetryPolicy()
    round_ = _held(session, claimed)
    now = utcnow()
    for request in rounds_repo.covered_requests(session, round_.id, lock=True):
        detail: dict[str, Any] = {"round_id": round_.id, "retryable": retryable}
        if not retryable:
            _fail_for_good(session, request, actor=claimed.worker_id, error=error, now=now,
                           cause="permanent", detail=detail)  # fmt: skip
        elif request.attempts >= policy.max_attempts:
            _fail_for_good(session, request, actor=claimed.worker_id,
                           error=f"gave up after {request.attempts} attempts: {error}", now=now,
                           cause="attempts", detail=detail)  # fmt: skip
        else:
            delay = policy.delay(request.attempts)
            request.not_before = now + timedelta(seconds=delay)
            detail.update(retry_in_seconds=round(delay, 3), not_before=request.not_before.isoformat())
            _set_status(session, request, "queued", actor=claimed.worker_id, event="requeued",
                        error=error, now=now, detail=detail)  # fmt: skip
    _end_round(session, round_, status="failed", error=error, now=now)


def _fail_for_good(
    session: Session,
    request: ForgetRequest,
    *,
    actor: str,
    error: str,
    now: datetime,
    cause: Literal["permanent", "attempts", "crashes"],
    detail: dict[str, Any] | None = None,
) -> None:
    """The one place a request fails for good: a ``failed`` event with the reason and its cause,
    the submitter's webhook delivery (an outbox row in the same transaction), and a log line."""
    body = {**(detail or {}), "cause": cause, "attempts": request.attempts, "crashes": request.crashes}
    request.not_before = None  # an admin retry starts at once
    _set_status(session, request, "failed", actor=actor, event="failed", error=error, now=now, detail=body)
    webhook_events.request_results(  # no error text: it may quote subject or sample ids
        session,
        [request],
        webhook_events.REQUEST_FAILED,
        status="failed",
        data={"cause": cause, "attempts": request.attempts, "crashes": request.crashes},
    )
    model = session.get(Model, request.model_id)
    # counted when decided: if this transaction rolls back the counter is one ahead (the
    # lethe_requests{status="failed"} gauge, read from the database, is exact)
    metrics.REQUEST_FAILURES.labels(model.name if model else "?", cause).inc()
    log.warning(
        "forget request %s failed for good (%s, %d attempts, %d crashes): %s",
        request.id, cause, request.attempts, request.crashes, _clean(error),
    )  # fmt: skip


def _clean(error: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; keep errors readable and bounded."""
    return None if error is None else error.replace("\x00", "\ufffd")[:4000]


def _end_round(session: Session, round_: Round, *, status: str, error: str | None, now: datetime) -> None:
    round_.status = status
    round_.error = _clean(error)
    round_.lease_expires_at = None
    round_.finished_at = now
    round_.updated_at = now
    session.flush()


def _set_status(
    session: Session,
    request: ForgetRequest,
    status: str,
    *,
    actor: str,
    now: datetime,
    event: str | None = None,
    error: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    error = _clean(error)
    request.status = status
    request.updated_at = now
    if error is not None or status == "completed":
        request.error = error
    body = dict(detail or {})
    if error is not None:
        body["error"] = error
    events_repo.append_event(session, request.id, event or status, actor=actor, status=status, detail=body)


# --- sweeper, heartbeats, preparation, purge ------------------------------------------------------


def models_to_wake(session: Session) -> list[str]:
    """Models with queued requests (or an expired live round) and no live lease."""
    return rounds_repo.models_to_wake(session, now=utcnow())


def heartbeat(session: Session, worker_id: str, *, hostname: str, queues: list[str], state: str) -> None:
    workers_repo.upsert_heartbeat(
        session, worker_id, hostname=hostname, queues=queues, state=state, at=utcnow()
    )


def register_prepared_model(
    session: Session,
    model_name: str,
    *,
    subjects: dict[str, list[str]],
    location: str,
    files: dict[str, FileDigest],
    evidence: dict[str, Any],
    tasks: list[str] | None = None,
    base_location: str | None = None,
    base_files: dict[str, FileDigest] | None = None,
) -> PublishedVersion:
    """Record a prepared model: v1 (``location``/``files``), its tasks, subjects, samples and base.

    The model must have been registered (status ``preparing``); it becomes ``ready``. Idempotent:
    when v1 already exists it is returned unchanged.
    """
    model = models_repo.lock_model(session, model_name)
    if model is None:
        raise UnknownModelError(model_name)
    existing = versions_repo.get_version(session, model.id, 1)
    if existing is not None:
        return _published(
            model.name,
            existing.version,
            existing.parent_version,
            existing.location,
            existing.files,
            existing.round_id,
            existing.created_at,
        )
    now = utcnow()
    models_repo.add_subjects(session, model.id, subjects)
    version = versions_repo.add_version(
        session,
        model_id=model.id,
        version=1,
        parent_version=None,
        location=location,
        files=files_to_json(files),
        round_id=None,
        evidence=evidence,
    )
    if tasks is not None:
        model.tasks = list(tasks)
    if base_location is not None:
        model.base_location = base_location
    if base_files is not None:
        model.base_files = files_to_json(base_files)
    model.status = "ready"
    model.error = None
    model.prepared_at = now
    session.flush()
    return _published(model.name, 1, None, location, version.files, None, version.created_at)


def _published(
    name: str,
    version: int,
    parent: int | None,
    location: str,
    files: dict[str, Any],
    round_id: int | None,
    created_at: datetime,
) -> PublishedVersion:
    return PublishedVersion(
        model_name=name,
        version=version,
        parent_version=parent,
        location=location,
        files=files_from_json(files),
        round_id=round_id,
        created_at=created_at,
    )


def mark_model_failed(session: Session, model_name: str, *, error: str) -> None:
    """Preparation failed: the model is ``failed`` with the error (re-register to try again)."""
    model = models_repo.lock_model(session, model_name)
    if model is None:
        raise UnknownModelError(model_name)
    model.status = "failed"
    model.error = _clean(error)
    session.flush()


def mark_purged(
    session: Session,
    model_name: str,
    *,
    client_ids: list[str],
    sample_tasks: list[tuple[str, str]],
    request_ids: list[str] | None = None,
) -> None:
    """Record that the raw data was deleted: clients' samples, and (sample id, task) labels, and
    that the purge of ``request_ids`` is done (they are not checked again)."""
    model = models_repo.get_model(session, model_name)
    if model is None:
        raise UnknownModelError(model_name)
    now = utcnow()
    models_repo.mark_clients_purged(session, model.id, client_ids, at=now)
    models_repo.mark_sample_tasks_purged(session, model.id, sample_tasks, all_tasks=model.tasks)
    requests_repo.mark_purged(session, request_ids or [], at=now)
    session.flush()
