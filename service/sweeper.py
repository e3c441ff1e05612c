"""The sweeper: re-sends wake-ups for models with queued requests and no live lease."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from service import rounds
from service.db.session import transaction
from service.dispatch import Dispatcher

log = logging.getLogger(__name__)


def sweep_once(
    factory: sessionmaker[Session],
    dispatcher: Dispatcher,
    *,
    skip: Callable[[str], bool] | None = None,
) -> list[str]:
    """Send a wake-up to every model that needs one (unless ``skip(model)``); those it was sent for."""
    with transaction(factory) as session:
        names = rounds.models_to_wake(session)
    return [name for name in names if not (skip and skip(name)) and dispatcher.wake(name)]


class ResendThrottle:
    """Skips a model woken less than ``seconds`` ago, so a model whose worker is busy elsewhere
    gets one wake-up per period instead of one per sweep."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.last: dict[str, float] = {}

    def __call__(self, model: str) -> bool:
        now = self.clock()
        if now - self.last.get(model, float("-inf")) < self.seconds:
            return True
        self.last[model] = now
        return False


async def run_sweeper(factory: sessionmaker[Session], dispatcher: Dispatcher, *, interval: float) -> None:
    """Sweep every ``interval`` seconds until cancelled (the API's lifespan runs it)."""
    throttle = ResendThrottle(max(60.0, 4 * interval))
    while True:
        try:
            woken = await asyncio.to_thread(sweep_once, factory, dispatcher, skip=throttle)
            if woken:
                log.info("sweeper woke %s", ", ".join(woken))
        except Exception:
            log.warning("sweep failed", exc_info=True)
        await asyncio.sleep(interval)
