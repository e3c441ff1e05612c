"""Slow down key guessing: after too many bad API keys from one client address, answer 429.

A sliding window per address, in this process's memory (each API replica counts on its own). While an
address is over the limit every authenticated call from it answers 429 with ``Retry-After``, before
any key is looked up; a valid key does not reset the count (or one known key would unlock guessing).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class AuthFailures:
    """Bad-key attempts per client address in the last ``window_seconds``."""

    def __init__(
        self,
        *,
        limit: int,
        window_seconds: float,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_addresses = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None when it is not throttled."""
        with self._lock:
            now = self._clock()
            times = self._recent(address, now)
            if times is None or len(times) < self.limit:
                return None
            return max(1, math.ceil(times[len(times) - self.limit] + self.window - now))

    def record(self, address: str) -> None:
        """One more bad key from ``address``."""
        with self._lock:
            now = self._clock()
            times = self._recent(address, now) or deque(maxlen=self.limit)
            times.append(now)
            self._failures[address] = times
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_addresses:  # bounded memory under address spraying
                self._failures.popitem(last=False)
