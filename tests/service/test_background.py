"""``service.background.BackgroundThread``, the thread the chain sequencer and the dispatcher share
(each had its own copy of the start and of the close)."""

from __future__ import annotations

import threading

from service.background import BackgroundThread


def test_started_once_closed_by_waking_the_loop() -> None:
    """``start`` runs the loop once however often it is called; ``close`` wakes a loop waiting on the
    condition and returns when it has returned; nothing starts after ``close``."""
    background = BackgroundThread("lethe-test-background")
    waiting = threading.Event()
    runs: list[str] = []

    def loop() -> None:
        runs.append(threading.current_thread().name)
        with background.wakeup:
            waiting.set()
            while not background.closing:
                background.wakeup.wait()

    background.start(loop)
    background.start(loop)
    assert waiting.wait(timeout=10)
    background.close(timeout=10)
    background.start(loop)
    assert runs == ["lethe-test-background"]
    assert not any(t.name == "lethe-test-background" for t in threading.enumerate())
