"""The sweeper: re-sends wake-ups for models with queued requests and no live lease."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.orm import Session, sessionmaker

from service import rounds
from service.db.session import transaction
from service.dispatch import Dispatcher

log = logging.getLogger(__name__)


def sweep_once(factory: sessionmaker[Session], dispatcher: Dispatcher) -> list[str]:
    """Send a wake-up to every model that needs one; the models it was sent for."""
    with transaction(factory) as session:
        names = rounds.models_to_wake(session)
    return [name for name in names if dispatcher.wake(name)]


async def run_sweeper(factory: sessionmaker[Session], dispatcher: Dispatcher, *, interval: float) -> None:
    """Sweep every ``interval`` seconds until cancelled (the API's lifespan runs it)."""
    while True:
        try:
            woken = await asyncio.to_thread(sweep_once, factory, dispatcher)
            if woken:
                log.info("sweeper woke %s", ", ".join(woken))
        except Exception:
            log.warning("sweep failed", exc_info=True)
        await asyncio.sleep(interval)
