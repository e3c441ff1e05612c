"""Bulk submission: many forget requests in one transaction, each with its own result.

Same rules as :func:`service.lifecycle.submit`, item by item (its idempotency key, replay, merge
into a pending request, 404 / 409 / 422), but in a fixed number of queries for the whole batch:
one look-up of the keys, one per model for its subjects, samples and pending requests, one batched
INSERT of the requests and one of their events. A bad item gets its error; the others go on.

Concurrent submissions can still collide on the unique constraints (a key or a pending subject
inserted meanwhile): then the batch's inserts are rolled back and the items taken one by one
through :func:`service.lifecycle.submit`, each in its own savepoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import digests, lifecycle
from service.db.models import ForgetRequest, Model, Sample, Subject
from service.db.types import utcnow
from service.errors import ServiceError, UnprocessableError
from service.repositories import events as events_repo
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo

MAX_ITEMS = 1000


@dataclass(frozen=True)
class Item:
    submission: lifecycle.Submission
    idempotency_key: str


Outcome = lifecycle.SubmitResult | ServiceError


class _Prefetched(lifecycle.SubjectLookup):
    """Subjects and samples of every item of one model, read once."""

    def __init__(self, session: Session, model: Model, submissions: Sequence[lifecycle.Submission]) -> None:
        super().__init__(session, model)
        sample_ids = [s for sub in submissions for s in sub.sample_ids or []]
        self._samples = models_repo.find_samples(session, model.id, sample_ids)
        client_ids = [sub.client_id for sub in submissions if sub.client_id is not None]
        client_ids += [sample.client_id for sample in self._samples.values()]
        self._subjects = models_repo.get_subjects(session, model.id, client_ids)

    def subjects(self, client_ids: Iterable[str]) -> dict[str, Subject]:
        return {c: self._subjects[c] for c in client_ids if c in self._subjects}

    def samples(self, sample_ids: Iterable[str]) -> dict[str, Sample]:
        return {s: self._samples[s] for s in sample_ids if s in self._samples}


def submit_many(
    session: Session,
    items: Sequence[Item],
    *,
    api_key_id: int | None,
    actor: str,
    digest_key: bytes | None,
) -> list[Outcome]:
    """One outcome per item, in order. Only flushes; the caller commits (and wakes the models of
    the created requests after the commit)."""
    try:
        with session.begin_nested():
            return _batched(session, items, api_key_id=api_key_id, actor=actor, digest_key=digest_key)
    except IntegrityError:
        return [
            _one(session, item, api_key_id=api_key_id, actor=actor, digest_key=digest_key) for item in items
        ]


def _one(
    session: Session, item: Item, *, api_key_id: int | None, actor: str, digest_key: bytes | None
) -> Outcome:
    try:
        with session.begin_nested():
            return lifecycle.submit(
                session,
                item.submission,
                idempotency_key=item.idempotency_key,
                api_key_id=api_key_id,
                actor=actor,
                digest_key=digest_key if item.submission.external_id is not None else None,
            )
    except ServiceError as error:
        return error


def _batched(
    session: Session, items: Sequence[Item], *, api_key_id: int | None, actor: str, digest_key: bytes | None
) -> list[Outcome]:
    hashes = [item.submission.payload_hash() for item in items]
    existing = requests_repo.by_idempotency_keys(
        session, api_key_id, [item.idempotency_key for item in items]
    )
    outcomes: list[Outcome | None] = [None] * len(items)
    first_with_key: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []  # (item, the earlier item of this batch with its key)
    fresh: dict[str, list[int]] = {}  # model name -> items to insert
    for i, item in enumerate(items):
        key = item.idempotency_key
        if key in existing or key in first_with_key:
            earlier_hash = existing[key].payload_hash if key in existing else hashes[first_with_key[key]]
            if earlier_hash != hashes[i]:
                outcomes[i] = UnprocessableError(
                    "this Idempotency-Key was already used with a different body",
                    field="Idempotency-Key",
                    **({"request_id": existing[key].id} if key in existing else {}),
                )
            elif key in existing:
                outcomes[i] = lifecycle.SubmitResult(existing[key], created=False)
            else:
                repeats.append((i, first_with_key[key]))
            continue
        first_with_key[key] = i
        fresh.setdefault(item.submission.model, []).append(i)

    now = utcnow()
    created: list[ForgetRequest] = []
    new_events: list[events_repo.NewEvent] = []
    for model_name, indices in fresh.items():
        try:
            model = lifecycle.ready_model(models_repo.get_model(session, model_name), model_name)
        except ServiceError as error:
            for i in indices:
                outcomes[i] = error
            continue
        lookup = _Prefetched(session, model, [items[i].submission for i in indices])
        valid: list[tuple[int, list[str], str]] = []
        for i in indices:
            submission = items[i].submission
            try:
                tasks = lifecycle.validate(session, model, submission, api_key_id=api_key_id, lookup=lookup)
            except ServiceError as error:
                outcomes[i] = error
                continue
            if submission.external_id is not None and digest_key is None:
                raise ValueError("a digest key is needed to record an external_id")
            key = lifecycle.subject_key(submission.kind, submission.client_id, submission.sample_ids, tasks)
            valid.append((i, tasks, key))
        pending = requests_repo.active_for_subjects(session, model.id, [key for _, _, key in valid])
        for i, tasks, key in valid:
            item = items[i]
            request = lifecycle.build_request(
                model, item.submission, tasks, key, pending.get(key),
                idempotency_key=item.idempotency_key, payload_hash=hashes[i], api_key_id=api_key_id, now=now,
            )  # fmt: skip
            pending.setdefault(key, request)  # a later item for this subject merges into this one
            external = item.submission.external_id
            digest = (
                digests.keyed_digest(digest_key, external) if external is not None and digest_key else None
            )
            new_events += lifecycle.submission_events(request, model.name, digest)
            created.append(request)
            outcomes[i] = lifecycle.SubmitResult(request, created=request.status == "queued")
    requests_repo.insert_many(session, created)  # one COPY on PostgreSQL
    events_repo.append_events(session, new_events, actor=actor)
    for i, earlier in repeats:
        first = outcomes[earlier]
        outcomes[i] = (
            lifecycle.SubmitResult(first.request, created=False)
            if isinstance(first, lifecycle.SubmitResult)
            else first
        )
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]
