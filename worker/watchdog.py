"""A thread beside a running round: renews its lease and enforces time limits under the solo pool.

Celery's solo pool runs the task in the worker's main thread and ignores ``task_time_limit`` /
``task_soft_time_limit`` (only the prefork pool enforces them, from its parent process). The solo
pool is the right one for CUDA (no fork after CUDA initialisation, one process per GPU), so this
thread does the enforcement instead:

- every ``interval`` seconds it calls ``renew`` (``service.rounds.renew_lease`` in its own
  session). If the lease was taken over (``lease_lost_types``), it records that and stops renewing;
  the round notices at its next :meth:`check` (the engine's progress callback, and before publish)
  and the fencing token makes ``publish_round`` refuse anyway;
- after ``soft_limit`` seconds it raises ``SoftTimeLimitExceeded`` in the task thread (an
  asynchronous exception, delivered at the next Python bytecode: torch kernels finish first), but
  only while the task thread is inside :meth:`interruptible` (the engine). Outside it (sealing and
  publishing the version) only :meth:`check` raises it: an exception landing just after the publish
  committed would otherwise make the round discard the directory the database now names;
- after ``hard_limit`` seconds it ends the process (``os._exit``): the round's lease expires and the
  round is resumed by another worker under a new fencing token; the attempt cap in the database
  stops a round that always hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from celery.exceptions import SoftTimeLimitExceeded

log = logging.getLogger(__name__)

HARD_LIMIT_EXIT_CODE = 75


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    result = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    return int(result) == 1


def _cancel_pending(thread_id: int) -> None:
    """Withdraw an asynchronous exception set for ``thread_id`` but not delivered yet (NULL clears)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


def _hard_exit() -> None:
    os._exit(HARD_LIMIT_EXIT_CODE)


class RoundWatchdog:
    def __init__(
        self,
        *,
        renew: Callable[[], None],
        interval: float,
        soft_limit: float,
        hard_limit: float,
        lease_lost_types: tuple[type[BaseException], ...] = (),
        on_hard_limit: Callable[[], None] = _hard_exit,
        interrupt_on_soft_limit: bool = True,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._renew = renew
        self._interval = interval
        self._soft = soft_limit
        self._hard = hard_limit
        self._lease_lost_types = lease_lost_types
        self._on_hard = on_hard_limit
        self._interrupt = interrupt_on_soft_limit
        self._stop = threading.Event()
        # guards _interruptible against the watchdog thread raising while the region is left
        self._region = threading.Lock()
        self._interruptible = False
        self._thread: threading.Thread | None = None
        self._target_thread = threading.get_ident()
        self._started = 0.0
        self.lease_lost: BaseException | None = None
        self.soft_limit_hit = False
        self.renewals = 0

    def __enter__(self) -> RoundWatchdog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._target_thread = threading.get_ident()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="lethe-round-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._interval + 5)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """The region (in the task thread) where the soft limit may interrupt asynchronously."""
        with self._region:
            self._interruptible = True
        try:
            self.check()  # the limit may have passed before the region was entered
            yield
        finally:
            with self._region:
                self._interruptible = False
                _cancel_pending(self._target_thread)

    def check(self) -> None:
        """Raise in the round's thread if the lease was lost or the soft limit passed."""
        if self.lease_lost is not None:
            raise self.lease_lost
        if self.soft_limit_hit:
            raise SoftTimeLimitExceeded(f"round ran longer than {self._soft:.0f} s")

    def _run(self) -> None:
        next_renewal = time.monotonic() + self._interval
        while not self._stop.wait(timeout=min(1.0, self._interval)):
            now = time.monotonic()
            elapsed = now - self._started
            if elapsed >= self._hard:
                log.error("round exceeded the hard time limit (%.0f s): ending the process", self._hard)
                self._on_hard()
                return
            if elapsed >= self._soft and not self.soft_limit_hit:
                self.soft_limit_hit = True
                log.warning("round exceeded the soft time limit (%.0f s): interrupting it", self._soft)
                with self._region:
                    if self._interrupt and self._interruptible:
                        _raise_in_thread(self._target_thread, SoftTimeLimitExceeded)
            if now >= next_renewal and self.lease_lost is None:
                next_renewal = now + self._interval
                try:
                    self._renew()
                    self.renewals += 1
                except self._lease_lost_types as exc:
                    log.warning("round lease lost: %s", exc)
                    self.lease_lost = exc
                except Exception:  # a database blip: try again at the next tick, not a period later
                    log.exception("lease renewal failed; retrying")
                    next_renewal = now + min(1.0, self._interval)
