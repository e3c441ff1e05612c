"""Request events: an append-only log whose rows form one SHA-256 hash chain.

Each row stores the hash of the row before it (``prev_hash``) and the SHA-256 of its own canonical
JSON (which includes ``prev_hash``). Editing, deleting or reordering any row breaks the chain at
that row, and :func:`verify_chain` names it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.db import copy
from service.db.models import RequestEvent
from service.db.types import as_utc, utcnow
from service.fileio import canonical_json

GENESIS_HASH = "0" * 64
#: Key of the PostgreSQL advisory lock that serialises appends to the chain.
CHAIN_LOCK_KEY = 0x4C45_5448_4501


def _timestamp(value: datetime) -> str:
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(event: RequestEvent) -> str:
    """The SHA-256 of the event's canonical JSON (its ``prev_hash`` included, its own hash not)."""
    fields = ("request_id", "type", "status", "actor", "detail", "at", "prev_hash")
    return _hash({name: getattr(event, name) for name in fields})


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


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
    # SQLite: every transaction is BEGIN IMMEDIATE, so appends are already serialised.


def append_event(
    session: Session,
    request_id: str,
    type: str,
    *,
    actor: str,
    status: str | None = None,
    detail: dict[str, Any] | None = None,
) -> RequestEvent:
    """Append one event at the head of the chain (the lock is held until the transaction ends)."""
    _lock_chain(session)
    session.flush()
    prev = session.scalar(select(RequestEvent.hash).order_by(RequestEvent.id.desc()).limit(1))
    event = RequestEvent(
        request_id=request_id,
        type=type,
        status=status,
        actor=actor,
        detail=dict(detail or {}),
        at=utcnow(),
        prev_hash=prev or GENESIS_HASH,
    )
    event.hash = event_hash(event)
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class NewEvent:
    request_id: str
    type: str
    status: str | None = None
    detail: dict[str, Any] | None = None


def append_events(session: Session, events: Sequence[NewEvent], *, actor: str) -> None:
    """Append ``events`` in order at the head of the chain: one lock, one read of the head, one
    batched insert (the lock is held until the transaction ends, so the fewer round trips the better)."""
    if not events:
        return
    _lock_chain(session)
    session.flush()
    prev = session.scalar(select(RequestEvent.hash).order_by(RequestEvent.id.desc()).limit(1)) or GENESIS_HASH
    at = utcnow()
    rows = []
    for new in events:
        row: dict[str, Any] = {
            "request_id": new.request_id,
            "type": new.type,
            "status": new.status,
            "actor": actor,
            "detail": dict(new.detail or {}),
            "at": at,
            "prev_hash": prev,
        }
        row["hash"] = prev = _hash(row)
        rows.append(row)
    copy.insert_rows(session, RequestEvent, rows)  # in order: ids follow the chain


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


def verify_chain(session: Session, *, batch_size: int = 1000) -> ChainReport:
    """Recompute every event's hash in order and report the first row that does not match."""
    expected_prev = GENESIS_HASH
    checked = 0
    last_id = 0
    while True:
        rows = list(
            session.scalars(
                select(RequestEvent)
                .where(RequestEvent.id > last_id)
                .order_by(RequestEvent.id)
                .limit(batch_size)
                .execution_options(populate_existing=True)
            )
        )
        if not rows:
            return ChainReport(ok=True, checked=checked, head_hash=expected_prev)
        for event in rows:
            reason = None
            if event.prev_hash != expected_prev:
                reason = "prev_hash does not match the hash of the event before it"
            elif event_hash(event) != event.hash:
                reason = "stored hash does not match the event's content"
            if reason is not None:
                return ChainReport(
                    ok=False,
                    checked=checked,
                    head_hash=expected_prev,
                    first_broken_event_id=event.id,
                    first_broken_request_id=event.request_id,
                    reason=reason,
                )
            expected_prev = event.hash
            checked += 1
            last_id = event.id
