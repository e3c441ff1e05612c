"""Round progress from the engine to the database, throttled.

The engine reports as often as it likes (every epoch, every request); the database sees at most one
write per ``interval`` seconds per round. A report held back is not lost: a timer writes the latest
one when its interval has passed, and :meth:`ThrottledProgress.close` writes it at once, so the last
stage the engine reached is always recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

#: Seconds between two progress writes of one round.
PROGRESS_INTERVAL_S = 0.5

Report = tuple[str, int, int]


class Timer(Protocol):
    def start(self) -> None: ...
    def cancel(self) -> None: ...


TimerFactory = Callable[[float, Callable[[], None]], Timer]


def _thread_timer(delay: float, fn: Callable[[], None]) -> Timer:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    return timer


class ThrottledProgress:
    """A :data:`worker.unlearning.progress.StageCallback` that writes through ``write`` at most once
    per ``interval`` seconds. ``write`` errors of the types in ``tolerate`` (the pipeline: database
    errors) are logged, not raised: progress is advisory and must not fail a round (the lease renewal
    and the fenced publish report a lost database). Anything else propagates, above all the soft
    time limit the watchdog raises in the engine's thread."""

    def __init__(
        self,
        write: Callable[[str, int, int], None],
        *,
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        timer: TimerFactory = _thread_timer,
        tolerate: tuple[type[Exception], ...] = (),
    ) -> None:
        self._write = write
        self._tolerate = tolerate
        self._interval = interval
        self._clock = clock
        self._timer_factory = timer
        self._lock = threading.Lock()  # writes in report order, from the caller or the timer
        self._pending: Report | None = None
        self._last_write: float | None = None
        self._timer: Timer | None = None
        self._closed = False

    def __call__(self, stage: str, step: int, of: int) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending = (stage, step, of)
            wait = 0.0 if self._last_write is None else self._last_write + self._interval - self._clock()
            if wait <= 0:
                self._write_pending()
            elif self._timer is None:
                self._timer = self._timer_factory(wait, self._on_timer)
                self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if not self._closed:
                self._write_pending()

    def close(self) -> None:
        """Stop the timer and write the report still held back (the last is always written)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._closed:
                self._write_pending()
            self._closed = True

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        report, self._pending = self._pending, None
        self._last_write = self._clock()
        try:
            self._write(*report)
        except self._tolerate:
            log.warning("recording round progress %s failed", report, exc_info=True)
