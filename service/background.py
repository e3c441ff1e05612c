"""The API's background threads (the chain sequencer, the dispatcher's publisher): one daemon thread
whose loop waits on a condition, and its orderly stop."""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundThread:
    """A daemon thread started at most once, a condition its loop waits on, and ``closing``.

    The loop (the owner's) reads ``closing`` and its own state under ``wakeup`` and returns when
    ``closing`` is set; the owner notifies ``wakeup`` when there is work."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wakeup = threading.Condition()  # re-entrant: start() may run under it
        self.closing = False
        self._thread: threading.Thread | None = None

    def start(self, loop: Callable[[], None]) -> None:
        """Run ``loop`` in the thread, unless it was started already or the thread is closing."""
        with self.wakeup:
            if self._thread is None and not self.closing:
                self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
                self._thread.start()

    def close(self, timeout: float) -> None:
        """Set ``closing``, wake the loop, and wait up to ``timeout`` seconds for it to return."""
        with self.wakeup:
            self.closing = True
            self.wakeup.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout)
