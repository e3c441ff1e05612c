"""Request events: an append-only log whose rows form one SHA-256 hash chain.

Each chained row stores its position (``seq``), the hash of the row before it (``prev_hash``) and the
SHA-256 of its own canonical JSON (which includes ``prev_hash``). Editing, deleting or reordering
any chained row breaks the chain at that row, and :func:`verify_chain` names it.

Two ways in:

- :func:`add_pending` (the submission path): the rows are inserted *pending* (no ``seq`` or hashes),
  without the chain lock or a read of the head, so submissions from any number of processes never
  wait for each other.
- :func:`append_event` / :func:`append_events` (everything else): under the chain lock, first
  :func:`chain_pending`, then the new rows at the head.

:func:`chain_pending` (the sequencer) links the pending events it can see into the chain in ``id``
order, under the chain lock: one sequencer at a time, the head read once, one UPDATE per batch.
Who runs it: every :func:`append_event` (so a request's submission events are chained before a
worker's ``claimed`` event of it), the API's background sequencer (``service.sequencer``) shortly
after each submission, and the readers of the chain (:func:`verify_chain`, the events listing)
before they read. A pending event is not yet tamper-evident; it is chained within
``chain_sequence_interval_seconds`` of its commit while an API process runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, select, text, update
from sqlalchemy.orm import Session

from service.db import copy
from service.db.models import RequestEvent
from service.db.types import as_utc, utcnow
from service.fileio import canonical_json

GENESIS_HASH = "0" * 64
#: Key of the PostgreSQL advisory lock that serialises appends to the chain.
CHAIN_LOCK_KEY = 0x4C45_5448_4501
#: Pending events chained per statement batch (bounds one sequencer transaction).
CHAIN_BATCH = 5000
_HASHED = ("request_id", "type", "status", "actor", "detail", "at", "prev_hash")


def _timestamp(value: datetime) -> str:
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(event: RequestEvent) -> str:
    """The SHA-256 of the event's canonical JSON (its ``prev_hash`` included, its own hash not)."""
    return _hash({name: getattr(event, name) for name in _HASHED})


def _hash(fields: dict[str, Any]) -> str:
    body = {
        "request_id": fields["request_id"],
        "type": fields["type"],
        "status": fields["status"],
        "actor": fields["actor"],
        "detail": fields["detail"],
        "at": _timestamp(fields["at"]),
        "prev_hash": fields["prev_hash"],
    }
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _lock_chain(session: Session, *, wait: bool = True) -> bool:
    """Take the chain lock until the transaction ends; ``wait=False``: only if it is free."""
    if session.get_bind().dialect.name == "postgresql":
        if not wait:
            return bool(
                session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
            )
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
    # SQLite: every transaction is BEGIN IMMEDIATE, so appends are already serialised.
    return True


def _head(session: Session) -> tuple[int, str]:
    """(seq, hash) of the chain's last event; (0, genesis) while it is empty."""
    row = session.execute(
        select(RequestEvent.seq, RequestEvent.hash)
        .where(RequestEvent.seq.is_not(None))
        .order_by(RequestEvent.seq.desc())
        .limit(1)
    ).one_or_none()
    if row is None or row[0] is None or row[1] is None:
        return 0, GENESIS_HASH
    return int(row[0]), str(row[1])


def _chain_locked(session: Session, limit: int | None) -> int:
    """Chain the visible pending events (at most ``limit``), in id order; the lock is held."""
    session.flush()
    table: Table = RequestEvent.__table__  # type: ignore[assignment]
    stmt = select(table.c.id, *(table.c[name] for name in _HASHED[:-1])).where(table.c.seq.is_(None))
    rows = session.execute(stmt.order_by(table.c.id).limit(limit)).mappings().all()
    if not rows:
        return 0
    seq, prev = _head(session)
    values = []
    for row in rows:
        seq += 1
        digest = _hash({**row, "prev_hash": prev})
        values.append({"_id": row["id"], "_seq": seq, "_prev": prev, "_hash": digest})
        prev = digest
    session.connection().execute(
        update(table)
        .where(table.c.id == bindparam("_id"))
        .values(seq=bindparam("_seq"), prev_hash=bindparam("_prev"), hash=bindparam("_hash")),
        values,
    )
    return len(values)


def chain_pending(session: Session, *, wait: bool = True, limit: int | None = CHAIN_BATCH) -> int | None:
    """Link the pending events this transaction can see into the chain (the sequencer's step).

    Returns how many were chained, or None when ``wait=False`` and another transaction holds the
    chain lock (it chains them, or the next caller does). The lock is held until the transaction
    ends: the caller commits soon."""
    if not _lock_chain(session, wait=wait):
        return None
    return _chain_locked(session, limit)


def has_pending(session: Session) -> bool:
    """Whether any committed event is not chained yet (one indexed read, no lock)."""
    stmt = select(RequestEvent.id).where(RequestEvent.seq.is_(None)).limit(1)
    return session.scalar(stmt) is not None


@dataclass(frozen=True)
class NewEvent:
    request_id: str
    type: str
    status: str | None = None
    detail: dict[str, Any] | None = None


def _rows(events: Sequence[NewEvent], actor: str, at: datetime) -> list[dict[str, Any]]:
    return [
        {
            "request_id": new.request_id,
            "type": new.type,
            "status": new.status,
            "actor": actor,
            "detail": dict(new.detail or {}),
            "at": at,
        }
        for new in events
    ]


def add_pending(session: Session, events: Sequence[NewEvent], *, actor: str) -> None:
    """Insert ``events`` pending, in order (one INSERT; no chain lock, no read of the head): the
    sequencer chains them after the commit."""
    rows = _rows(events, actor, utcnow())
    for row in rows:
        row.update(seq=None, prev_hash=None, hash=None)
    copy.insert_rows(session, RequestEvent, rows)


def append_event(
    session: Session,
    request_id: str,
    type: str,
    *,
    actor: str,
    status: str | None = None,
    detail: dict[str, Any] | None = None,
) -> RequestEvent:
    """Append one event at the head of the chain, after the pending events (the lock is held until
    the transaction ends)."""
    _lock_chain(session)
    _chain_locked(session, None)
    seq, prev = _head(session)
    event = RequestEvent(
        request_id=request_id,
        type=type,
        status=status,
        actor=actor,
        detail=dict(detail or {}),
        at=utcnow(),
        seq=seq + 1,
        prev_hash=prev,
    )
    event.hash = event_hash(event)
    session.add(event)
    session.flush()
    return event


def append_events(session: Session, events: Sequence[NewEvent], *, actor: str) -> None:
    """Append ``events`` in order at the head of the chain, after the pending events: one lock, one
    read of the head, one batched insert (the lock is held until the transaction ends, so the fewer
    round trips the better)."""
    if not events:
        return
    _lock_chain(session)
    _chain_locked(session, None)
    seq, prev = _head(session)
    rows = _rows(events, actor, utcnow())
    for row in rows:
        seq += 1
        row.update(seq=seq, prev_hash=prev)
        row["hash"] = prev = _hash(row)
    copy.insert_rows(session, RequestEvent, rows)


def events_for_request(session: Session, request_id: str, *, after_id: int = 0) -> list[RequestEvent]:
    stmt = (
        select(RequestEvent)
        .where(RequestEvent.request_id == request_id, RequestEvent.id > after_id)
        .order_by(RequestEvent.id)
    )
    return list(session.scalars(stmt))


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    head_hash: str
    first_broken_event_id: int | None = None
    first_broken_request_id: str | None = None
    reason: str | None = None
    #: events committed after this check chained the pending ones (not yet in the chain)
    pending: int = 0


def verify_chain(session: Session, *, batch_size: int = 1000, chain_first: bool = True) -> ChainReport:
    """Recompute every chained event's hash in chain order and report the first row that does not
    match. ``chain_first``: chain the pending events first (in this transaction), so that the check
    covers every event committed before it; ``pending`` counts those committed since."""
    if chain_first:
        chain_pending(session, limit=None)
    expected_prev = GENESIS_HASH
    checked = 0
    last_seq = 0
    while True:
        rows = list(
            session.scalars(
                select(RequestEvent)
                .where(RequestEvent.seq > last_seq)
                .order_by(RequestEvent.seq)
                .limit(batch_size)
                .execution_options(populate_existing=True)
            )
        )
        if not rows:
            pending = session.scalar(select(func.count()).where(RequestEvent.seq.is_(None)))
            return ChainReport(ok=True, checked=checked, head_hash=expected_prev, pending=int(pending or 0))
        for event in rows:
            reason = None
            if event.prev_hash != expected_prev:
                reason = "prev_hash does not match the hash of the event before it"
            elif event_hash(event) != event.hash:
                reason = "stored hash does not match the event's content"
            if reason is not None or event.hash is None or event.seq is None:
                return ChainReport(
                    ok=False,
                    checked=checked,
                    head_hash=expected_prev,
                    first_broken_event_id=event.id,
                    first_broken_request_id=event.request_id,
                    reason=reason or "a chained event has no hash",
                )
            expected_prev = event.hash
            checked += 1
            last_seq = event.seq
