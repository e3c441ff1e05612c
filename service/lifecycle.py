"""Request lifecycle on the API side: submit, cancel, retry. Only flushes; the caller commits."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import deadlines, digests
from service.db.models import ForgetRequest, Model, Sample, Subject
from service.db.types import utcnow
from service.errors import ConflictError, NotFoundError, UnprocessableError
from service.fileio import canonical_json
from service.repositories import events as events_repo
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo


@dataclass(frozen=True)
class Submission:
    model: str
    kind: Literal["client", "task"]
    client_id: str | None = None
    sample_ids: list[str] | None = None
    tasks: list[str] | None = None
    external_id: str | None = None

    def payload_hash(self) -> str:
        body = {
            "model": self.model,
            "kind": self.kind,
            "client_id": self.client_id,
            "sample_ids": self.sample_ids,
            "tasks": self.tasks,
            "external_id": self.external_id,
        }
        return hashlib.sha256(canonical_json(body).encode()).hexdigest()


@dataclass(frozen=True)
class SubmitResult:
    request: ForgetRequest
    created: bool


def subject_key(kind: str, client_id: str | None, sample_ids: list[str] | None, tasks: list[str]) -> str:
    body: dict[str, Any] = {"kind": kind, "tasks": sorted(set(tasks))}
    if kind == "client":
        body["client_id"] = client_id
    else:
        body["sample_ids"] = sorted(set(sample_ids or []))
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def submit(
    session: Session,
    submission: Submission,
    *,
    idempotency_key: str,
    api_key_id: int | None,
    actor: str,
    digest_key: bytes | None = None,
    savepoint: bool = True,
) -> SubmitResult:
    """Record a forget request (status ``queued``), or return the one this submission repeats.

    Same idempotency key and body: that request. Same key, other body: 422. Every other submission
    is a request of its own (its id, key and ``external_id``): when a request for the same subject is
    pending, the new one is ``merged`` into it (it follows that request and is not run again). A
    subject already forgotten for everything the submission names: 409. ``digest_key``: the HMAC
    key of the ``external_id`` digest chained in the events (needed when there is an external_id).

    A concurrent submission can win the race to the unique constraints (same key, or same pending
    subject). With ``savepoint`` the insert runs in one and that race is resolved here; without it
    (two statements fewer) the :class:`IntegrityError` propagates, the caller's transaction is
    lost, and the caller submits again in a new one, which then finds the winner.
    """
    payload_hash = submission.payload_hash()
    replay = _replay(session, api_key_id, idempotency_key, payload_hash)
    if replay is not None:
        return SubmitResult(replay, created=False)
    model = ready_model(models_repo.get_model(session, submission.model), submission.model)
    tasks = validate(session, model, submission, api_key_id=api_key_id)
    key = subject_key(submission.kind, submission.client_id, submission.sample_ids, tasks)
    external_digest = None
    if submission.external_id is not None:
        if digest_key is None:
            raise ValueError("a digest key is needed to record an external_id")
        external_digest = digests.keyed_digest(digest_key, submission.external_id)

    now = utcnow()

    def new_request(merged_into: ForgetRequest | None) -> ForgetRequest:
        return build_request(
            model, submission, tasks, key, merged_into,
            idempotency_key=idempotency_key, payload_hash=payload_hash, api_key_id=api_key_id, now=now,
        )  # fmt: skip

    pending = requests_repo.active_for_subject(session, model.id, key)
    request = new_request(pending)
    try:
        with session.begin_nested() if savepoint else contextlib.nullcontext():
            session.add(request)
            session.flush()
    except IntegrityError:
        if not savepoint:
            raise  # the transaction is lost: the caller submits again
        # A concurrent submission won the race (same idempotency key, or same pending subject).
        replay = _replay(session, api_key_id, idempotency_key, payload_hash)
        if replay is not None:
            return SubmitResult(replay, created=False)
        pending = requests_repo.active_for_subject(session, model.id, key)
        if pending is None:
            raise
        request = new_request(pending)
        session.add(request)
        session.flush()
    # pending: no chain lock on the submission path (the sequencer chains them after the commit)
    events_repo.add_pending(session, submission_events(request, model.name, external_digest), actor=actor)
    return SubmitResult(request, created=pending is None)


def build_request(
    model: Model,
    submission: Submission,
    tasks: list[str],
    key: str,
    merged_into: ForgetRequest | None,
    *,
    idempotency_key: str,
    payload_hash: str,
    api_key_id: int | None,
    now: datetime,
) -> ForgetRequest:
    """A new request row: ``queued``, or ``merged`` into the pending request for its subject."""
    return ForgetRequest(
        id=requests_repo.new_request_id(),
        model_id=model.id,
        kind=submission.kind,
        client_id=submission.client_id if submission.kind == "client" else None,
        sample_ids=sorted(set(submission.sample_ids or [])) if submission.kind == "task" else None,
        tasks=tasks,
        subject_key=key,
        status="queued" if merged_into is None else "merged",
        merged_into=None if merged_into is None else merged_into.id,
        idempotency_key=idempotency_key,
        payload_hash=payload_hash,
        api_key_id=api_key_id,
        external_id=submission.external_id,
        received_at=now,
        due_at=deadlines.due_at(now),
        updated_at=now,
        attempts=0,
        crashes=0,
        extended_months=0,
    )


def submission_events(
    request: ForgetRequest, model_name: str, external_digest: str | None
) -> list[events_repo.NewEvent]:
    """A new request's events: ``received``, then ``queued`` or ``merged``. The pending request's id
    is not in the (submitter-visible) ``merged`` event: it may be another key's."""
    detail = {"kind": request.kind, "model": model_name, "external_id_hmac": external_digest}
    return [
        events_repo.NewEvent(request.id, "received", status="received", detail=detail),
        events_repo.NewEvent(request.id, request.status, status=request.status),
    ]


def ready_model(model: Model | None, name: str) -> Model:
    """``model`` if it accepts requests: 404 when it is not registered, 409 until it is ready."""
    if model is None:
        raise NotFoundError(f"model {name!r} is not registered", field="model")
    if model.status != "ready":
        raise ConflictError(
            f"model {model.name!r} is {model.status}, not ready; forget requests are accepted once "
            "it is prepared",
            field="model",
            model_status=model.status,
        )
    return model


def _replay(session: Session, api_key_id: int | None, key: str, payload_hash: str) -> ForgetRequest | None:
    existing = requests_repo.by_idempotency_key(session, api_key_id, key)
    if existing is None:
        return None
    if existing.payload_hash != payload_hash:
        raise UnprocessableError(
            "this Idempotency-Key was already used with a different body",
            field="Idempotency-Key",
            request_id=existing.id,
        )
    return existing


def _already_forgotten(detail: str, field: str, by: str | None) -> ConflictError:
    """409 "already forgotten"; ``forgotten_by`` names the request only when it is the caller's."""
    return ConflictError(detail, field=field, **({} if by is None else {"forgotten_by": by}))


class SubjectLookup:
    """The subjects and samples a validation reads: from the database, one query per call.
    Bulk submission (``service.bulk``) answers from rows it fetched for every item at once."""

    def __init__(self, session: Session, model: Model) -> None:
        self.session = session
        self.model = model

    def subjects(self, client_ids: Iterable[str]) -> dict[str, Subject]:
        return models_repo.get_subjects(self.session, self.model.id, client_ids)

    def samples(self, sample_ids: Iterable[str]) -> dict[str, Sample]:
        return models_repo.find_samples(self.session, self.model.id, sample_ids)


def validate(
    session: Session,
    model: Model,
    submission: Submission,
    *,
    api_key_id: int | None,
    lookup: SubjectLookup | None = None,
) -> list[str]:
    """Check the subject against the model; returns the tasks the request covers.

    A subject is forgotten exactly for what was erased: a client for the tasks of its completed client
    requests (all of them once forgotten in full), a sample also for those of its task requests. A
    submission is refused (409) only when everything it names is forgotten already.
    """
    lookup = lookup or SubjectLookup(session, model)
    if submission.tasks is not None:
        unknown = sorted(set(submission.tasks) - set(model.tasks))
        if unknown:
            raise UnprocessableError(
                f"unknown task(s) {unknown} for model {model.name!r} (tasks: {model.tasks})",
                field="tasks",
                unknown=unknown,
            )
    if submission.kind == "client":
        assert submission.client_id is not None  # the schema guarantees it
        subject = lookup.subjects([submission.client_id]).get(submission.client_id)
        if subject is None:
            raise NotFoundError(
                f"client {submission.client_id!r} is not a subject of model {model.name!r}",
                field="client_id",
            )
        tasks = sorted(set(submission.tasks)) if submission.tasks else list(model.tasks)
        whole = set(tasks) >= set(model.tasks)
        # A client forgotten task by task is not forgotten in full (its membership is still known):
        # a request for the whole client proceeds until one completed.
        if subject.status == "forgotten" or (not whole and set(tasks) <= set(subject.forgotten_tasks)):
            raise _already_forgotten(
                f"client {submission.client_id!r} was already forgotten"
                + ("" if subject.status == "forgotten" else f" for tasks {tasks}"),
                "client_id",
                _own(session, subject.forgotten_by_request_id, api_key_id),
            )
        return tasks

    sample_ids = submission.sample_ids or []
    found = lookup.samples(sample_ids)
    unknown = sorted(set(sample_ids) - set(found))
    if unknown:
        shown = unknown[:20]
        raise NotFoundError(
            f"{len(unknown)} unknown sample id(s) for model {model.name!r}: {shown}",
            field="sample_ids",
            unknown=shown,
        )
    tasks = sorted(set(submission.tasks or []))
    subjects = lookup.subjects(s.client_id for s in found.values())
    full: Subject | None = None
    for sample in found.values():
        subject = subjects.get(sample.client_id)
        if subject is not None and subject.status == "forgotten":
            full = full or subject
            continue
        covered = set(sample.forgotten_tasks) | set(subject.forgotten_tasks if subject is not None else ())
        if not set(tasks) <= covered:
            return tasks  # something the request names is still there
    by = _own(session, full.forgotten_by_request_id, api_key_id) if full is not None else None
    raise _already_forgotten(f"every sample named was already forgotten for tasks {tasks}", "sample_ids", by)


def _own(session: Session, request_id: str | None, api_key_id: int | None) -> str | None:
    """``request_id`` when the caller's key submitted it (a submitter never learns others' ids)."""
    if request_id is None:
        return None
    row = requests_repo.get_request(session, request_id)
    return request_id if row is not None and row.api_key_id == api_key_id else None


def cancel(session: Session, request_id: str, *, actor: str) -> ForgetRequest:
    """Cancel a request that has not started. A merged request is detached from the one it follows
    (which goes on); cancelling a followed request cancels its merged ones with it (they show its
    status)."""
    request = _locked(session, request_id)
    followed = _followed(session, request)
    if (followed or request).status not in ("received", "queued"):
        status = (followed or request).status
        raise ConflictError(
            f"request is {status}; only a request that has not started can be cancelled", status_now=status
        )
    request.status = "cancelled"
    request.updated_at = utcnow()
    events_repo.append_event(session, request.id, "cancelled", actor=actor, status="cancelled")
    return request


def retry(session: Session, request_id: str, *, actor: str) -> ForgetRequest:
    request = _locked(session, request_id)
    followed = _followed(session, request)
    if followed is not None:
        raise ConflictError(
            f"request follows request {followed.id} (merged into it); retry that one",
            merged_into=followed.id,
        )
    if request.status != "failed":
        raise ConflictError(
            f"request is {request.status}; only a failed request can be retried", status_now=request.status
        )
    previous_error = request.error
    try:
        with session.begin_nested():
            request.status = "queued"
            request.attempts = 0
            request.error = None
            request.updated_at = utcnow()
            session.flush()
    except IntegrityError:
        session.refresh(request)
        pending = requests_repo.active_for_subject(session, request.model_id, request.subject_key)
        raise ConflictError(
            "another request for the same subject is pending",
            pending_request=pending.id if pending is not None else None,
        ) from None
    events_repo.append_event(
        session,
        request.id,
        "retried",
        actor=actor,
        status="queued",
        detail={"previous_error": previous_error},
    )
    return request


def extend_deadline(
    session: Session, request_id: str, *, months: int, reason: str, actor: str
) -> ForgetRequest:
    """Extend an open request's deadline by ``months`` (at most two months in total, Art. 12(3));
    the reason is recorded as a ``deadline_extended`` event."""
    request = _locked(session, request_id)
    if request.status not in deadlines.OPEN_STATUSES:
        raise ConflictError(
            f"request is {request.status}; only an open request's deadline can be extended",
            status_now=request.status,
        )
    total = request.extended_months + months
    if total > deadlines.MAX_EXTENSION_MONTHS:
        raise ConflictError(
            f"the deadline was already extended by {request.extended_months} month(s); at most "
            f"{deadlines.MAX_EXTENSION_MONTHS} in total",
            field="months",
            extended_months=request.extended_months,
        )
    previous = request.due_at
    request.extended_months = total
    request.due_at = deadlines.due_at(request.received_at, total)
    request.updated_at = utcnow()
    events_repo.append_event(
        session,
        request.id,
        "deadline_extended",
        actor=actor,
        status=request.status,
        detail={
            "months": months,
            "extended_months": total,
            "reason": reason,
            "previous_due_at": previous.isoformat(),
            "due_at": request.due_at.isoformat(),
        },
    )
    return request


def _followed(session: Session, request: ForgetRequest) -> ForgetRequest | None:
    """The request a ``merged`` request follows (None for any other)."""
    if request.status != "merged" or request.merged_into is None:
        return None
    return requests_repo.get_request(session, request.merged_into)


def _locked(session: Session, request_id: str) -> ForgetRequest:
    request = requests_repo.get_request(session, request_id, lock=True)
    if request is None:
        raise NotFoundError(f"forget request {request_id!r} does not exist")
    return request
