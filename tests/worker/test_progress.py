"""The worker's progress throttle (issue 10 part 3): at most one write per interval, the last kept.

A fake clock and a fake timer: no sleeps, the timer fires when the test says so."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from service.db.models import ROUND_STAGES
from worker.progress import ThrottledProgress
from worker.unlearning.progress import STAGES


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTimer:
    def __init__(self, delay: float, fn: Callable[[], None], started: list[FakeTimer]) -> None:
        self.delay, self.fn, self.started, self.cancelled = delay, fn, started, False

    def start(self) -> None:
        self.started.append(self)

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled
        self.fn()


def _throttle() -> tuple[ThrottledProgress, list[tuple[str, int, int]], FakeClock, list[FakeTimer]]:
    writes: list[tuple[str, int, int]] = []
    clock = FakeClock()
    timers: list[FakeTimer] = []
    throttle = ThrottledProgress(
        lambda *report: writes.append(report),
        interval=0.5,
        clock=clock,
        timer=lambda delay, fn: FakeTimer(delay, fn, timers),
    )
    return throttle, writes, clock, timers


def test_reports_faster_than_the_interval_are_written_once_and_the_last_on_close() -> None:
    """Defect covered: without the throttle every epoch would be one database write (and without
    the flush the last stage of a round would be lost)."""
    throttle, writes, clock, timers = _throttle()
    throttle("partitions", 1, 1)
    assert writes == [("partitions", 1, 1)]  # the first at once
    for epoch in range(1, 101):
        clock.now += 0.001
        throttle("update", epoch, 100)
    assert writes == [("partitions", 1, 1)]  # held back: one timer pending, not 100 writes
    assert len(timers) == 1
    assert abs(timers[0].delay - (0.5 - 0.001)) < 1e-9
    throttle.close()
    assert writes == [("partitions", 1, 1), ("update", 100, 100)]
    assert timers[0].cancelled
    throttle("audit", 1, 1)  # after close: nothing
    assert len(writes) == 2


def test_a_held_report_is_written_by_the_timer_and_the_next_interval_starts_there() -> None:
    throttle, writes, clock, timers = _throttle()
    throttle("partitions", 1, 2)
    clock.now += 0.1
    throttle("ssd", 0, 0)
    clock.now += 0.4
    timers[0].fire()  # the engine is busy in SSD: the timer writes what it reported
    assert writes == [("partitions", 1, 2), ("ssd", 0, 0)]
    clock.now += 0.6  # a later report after the interval: written at once, no timer
    throttle("update", 1, 10)
    assert writes[-1] == ("update", 1, 10)
    assert len(timers) == 1
    throttle.close()  # nothing pending: nothing written twice
    assert len(writes) == 3


def test_a_failing_write_does_not_fail_the_round_but_the_soft_time_limit_goes_through() -> None:
    """A database error while recording progress is logged (progress is advisory); the watchdog's
    SoftTimeLimitExceeded, which may land in the engine's thread during a write, is not swallowed."""
    calls: list[str] = []
    error: list[Exception] = [OperationalError("UPDATE rounds", {}, Exception("database unavailable"))]

    def write(stage: str, step: int, of: int) -> None:
        calls.append(stage)
        raise error[0]

    throttle = ThrottledProgress(write, interval=0.0, tolerate=(SQLAlchemyError,))
    throttle("partitions", 1, 1)
    assert calls == ["partitions"]
    error[0] = SoftTimeLimitExceeded()
    with pytest.raises(SoftTimeLimitExceeded):
        throttle("update", 1, 10)


def test_the_core_reports_the_stages_the_database_accepts() -> None:
    """The ML core's stage names (no database there) and the service's are the same, in order."""
    assert (*STAGES, "publish") == ROUND_STAGES
