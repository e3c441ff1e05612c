"""Registered models, their subjects (clients) and samples."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import MODEL_NAME_PATTERN, Model, Sample, Subject
from service.errors import NotFoundError

_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
#: Values per ``IN (...)`` list, well under SQLite's and PostgreSQL's bound-parameter limits.
IN_CHUNK = 500


def is_model_name(name: str) -> bool:
    return _MODEL_NAME.fullmatch(name) is not None


def get_model(session: Session, name: str) -> Model | None:
    """The model called ``name``; None also, without a query, for a name no model can have
    (PostgreSQL would refuse some of them, e.g. with a NUL byte)."""
    if not is_model_name(name):
        return None
    return session.scalar(select(Model).where(Model.name == name))


def model_id_filter(session: Session, name: str | None) -> int | None:
    """The id of the model ``name`` for a list filter (``None``: no filter); an unknown name is a
    ``NotFoundError`` naming the ``model`` field."""
    if name is None:
        return None
    model = get_model(session, name)
    if model is None:
        raise NotFoundError(f"model {name!r} is not registered", field="model")
    return model.id


def lock_model(session: Session, name: str, *, skip_locked: bool = False) -> Model | None:
    """The model row, locked for this transaction (PostgreSQL ``FOR UPDATE [SKIP LOCKED]``).

    With ``skip_locked``, a row another transaction holds reads as ``None``. On SQLite the whole
    transaction already holds the write lock (``BEGIN IMMEDIATE``).
    """
    stmt = (
        select(Model)
        .where(Model.name == name)
        .with_for_update(skip_locked=skip_locked)
        .execution_options(populate_existing=True)
    )
    return session.scalar(stmt)


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.name)))


def create_model(
    session: Session,
    name: str,
    *,
    workload: str,
    method: str,
    method_config: dict[str, Any],
    settings: dict[str, Any],
    workload_options: dict[str, Any] | None = None,
) -> Model:
    model = Model(
        name=name,
        workload=workload,
        workload_options=dict(workload_options or {}),
        method=method,
        method_config=method_config,
        settings=settings,
        status="preparing",
        tasks=[],
        base_files={},
        last_fencing_token=0,
    )
    session.add(model)
    session.flush()
    return model


def add_subjects(session: Session, model_id: int, subjects: dict[str, list[str]]) -> None:
    """Insert the model's clients and their samples (bulk)."""
    if not subjects:
        return
    session.execute(
        insert(Subject),
        [
            {"model_id": model_id, "client_id": client, "sample_count": len(samples), "status": "active"}
            for client, samples in subjects.items()
        ],
    )
    rows = [
        {"model_id": model_id, "sample_id": sample, "client_id": client, "purged": False, "purged_tasks": []}
        for client, samples in subjects.items()
        for sample in samples
    ]
    for start in range(0, len(rows), 5000):
        session.execute(insert(Sample), rows[start : start + 5000])


def get_subject(session: Session, model_id: int, client_id: str) -> Subject | None:
    return session.scalar(select(Subject).where(Subject.model_id == model_id, Subject.client_id == client_id))


def chunks(values: Iterable[str]) -> Iterator[list[str]]:
    """The distinct ``values`` in lists of at most :data:`IN_CHUNK`."""
    distinct = list(dict.fromkeys(values))
    for start in range(0, len(distinct), IN_CHUNK):
        yield distinct[start : start + IN_CHUNK]


def get_subjects(session: Session, model_id: int, client_ids: Iterable[str]) -> dict[str, Subject]:
    found: dict[str, Subject] = {}
    for chunk in chunks(client_ids):
        stmt = select(Subject).where(Subject.model_id == model_id, Subject.client_id.in_(chunk))
        found.update({s.client_id: s for s in session.scalars(stmt)})
    return found


def count_subjects(session: Session, model_id: int) -> tuple[int, int]:
    """(all subjects, forgotten subjects) of a model."""
    total = session.scalar(select(func.count()).select_from(Subject).where(Subject.model_id == model_id))
    forgotten = session.scalar(
        select(func.count())
        .select_from(Subject)
        .where(Subject.model_id == model_id, Subject.status == "forgotten")
    )
    return int(total or 0), int(forgotten or 0)


def mark_subjects_forgotten(
    session: Session,
    model_id: int,
    client_ids: Sequence[str],
    *,
    request_id: str,
    at: datetime,
    tasks: Sequence[str] = (),
) -> None:
    """The clients are forgotten in full (``tasks``: every task of the model)."""
    if not client_ids:
        return
    session.execute(
        update(Subject)
        .where(Subject.model_id == model_id, Subject.client_id.in_(client_ids))
        .values(
            status="forgotten",
            forgotten_by_request_id=request_id,
            forgotten_at=at,
            forgotten_tasks=sorted(tasks),
        )
    )


def mark_client_tasks_forgotten(
    session: Session, model_id: int, client_id: str, tasks: Sequence[str]
) -> None:
    """A client request for some of the tasks completed: the client is forgotten for those."""
    subject = get_subject(session, model_id, client_id)
    if subject is not None:
        subject.forgotten_tasks = sorted(set(subject.forgotten_tasks) | set(tasks))
        session.flush()


def mark_sample_tasks_forgotten(
    session: Session, model_id: int, sample_ids: Sequence[str], tasks: Sequence[str]
) -> None:
    """A task request completed: its samples are forgotten for its tasks."""
    for sample in find_samples(session, model_id, sample_ids).values():
        merged = sorted(set(sample.forgotten_tasks) | set(tasks))
        if merged != sample.forgotten_tasks:
            sample.forgotten_tasks = merged
    session.flush()


def find_samples(session: Session, model_id: int, sample_ids: Iterable[str]) -> dict[str, Sample]:
    found: dict[str, Sample] = {}
    for chunk in chunks(sample_ids):
        stmt = select(Sample).where(Sample.model_id == model_id, Sample.sample_id.in_(chunk))
        found.update({s.sample_id: s for s in session.scalars(stmt)})
    return found


def mark_clients_purged(session: Session, model_id: int, client_ids: Sequence[str], *, at: datetime) -> None:
    if not client_ids:
        return
    session.execute(
        update(Subject)
        .where(Subject.model_id == model_id, Subject.client_id.in_(client_ids))
        .values(purged_at=at)
    )
    session.execute(
        update(Sample)
        .where(Sample.model_id == model_id, Sample.client_id.in_(client_ids))
        .values(purged=True)
    )


def mark_sample_tasks_purged(
    session: Session, model_id: int, sample_tasks: Sequence[tuple[str, str]], *, all_tasks: Sequence[str] = ()
) -> None:
    """Record purged labels; a sample none of whose ``all_tasks`` labels is left is purged whole (the
    data store deletes its inputs then: nothing of it is kept)."""
    by_sample: dict[str, set[str]] = {}
    for sample_id, task in sample_tasks:
        by_sample.setdefault(sample_id, set()).add(task)
    samples = find_samples(session, model_id, by_sample)
    for sample_id, tasks in by_sample.items():
        sample = samples.get(sample_id)
        if sample is not None:
            sample.purged_tasks = sorted(set(sample.purged_tasks) | tasks)
            if all_tasks and set(sample.purged_tasks) >= set(all_tasks):
                sample.purged = True
    session.flush()


def purged_client_ids(session: Session, model_id: int, client_ids: Iterable[str]) -> set[str]:
    """Those of ``client_ids`` whose data is recorded as purged (one statement)."""
    stmt = select(Subject.client_id).where(
        Subject.model_id == model_id, Subject.purged_at.is_not(None), Subject.client_id.in_(list(client_ids))
    )
    return set(session.scalars(stmt))


def samples_of(
    session: Session, model_id: int, *, sample_ids: Iterable[str], client_ids: Iterable[str]
) -> list[Sample]:
    """The samples named in ``sample_ids`` and every sample of ``client_ids`` (one statement)."""
    stmt = select(Sample).where(
        Sample.model_id == model_id,
        or_(Sample.sample_id.in_(list(sample_ids)), Sample.client_id.in_(list(client_ids))),
    )
    return list(session.scalars(stmt))


def clients_page(
    session: Session, model_id: int, *, status: str | None, after_id: int | None, limit: int
) -> list[Subject]:
    """Up to ``limit`` of the model's clients (``status``: only those) after the subject ``after_id``,
    in registration order."""
    stmt = select(Subject).where(Subject.model_id == model_id)
    if status is not None:
        stmt = stmt.where(Subject.status == status)
    if after_id is not None:
        stmt = stmt.where(Subject.id > after_id)
    return list(session.scalars(stmt.order_by(Subject.id).limit(limit)))


def kept_samples_page(
    session: Session, model_id: int, client_id: str, *, task: str | None, after: str | None, limit: int
) -> list[Sample]:
    """Up to ``limit`` of the client's samples whose inputs are kept (with ``task``: whose label of
    ``task`` is kept too), by sample id, after the sample id ``after``.

    The task test reads the JSON list in Python (portable across SQLite and PostgreSQL), a batch at
    a time, so a page costs a few statements however many labels were purged before it."""
    out: list[Sample] = []
    while len(out) < limit:
        stmt = select(Sample).where(
            Sample.model_id == model_id, Sample.client_id == client_id, Sample.purged.is_(False)
        )
        if after is not None:
            stmt = stmt.where(Sample.sample_id > after)
        batch = list(session.scalars(stmt.order_by(Sample.sample_id).limit(max(limit, 100))))
        out.extend(s for s in batch if task is None or task not in s.purged_tasks)
        if len(batch) < max(limit, 100):
            break
        after = batch[-1].sample_id
    return out[:limit]
