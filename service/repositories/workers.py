"""Worker processes and their heartbeats."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Worker


def upsert_heartbeat(
    session: Session, worker_id: str, *, hostname: str, queues: list[str], state: str, at: datetime
) -> Worker:
    worker = session.get(Worker, worker_id, with_for_update=True)
    if worker is None:
        worker = Worker(id=worker_id, hostname=hostname, queues=queues, state=state, started_at=at)
        session.add(worker)
    worker.hostname = hostname
    worker.queues = list(queues)
    worker.state = state
    worker.last_heartbeat_at = at
    session.flush()
    return worker


def list_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.last_heartbeat_at.desc(), Worker.id)))
