"""The shared ``flock``: a second holder waits until the first lets go, and the file's folder is
created where missing."""

from __future__ import annotations

import threading
from pathlib import Path

from worker.file_lock import exclusive_lock


def test_a_second_holder_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / ".lock"
    order: list[str] = []
    with exclusive_lock(path):
        second = threading.Thread(target=lambda: _take(path, order))
        second.start()
        second.join(0.3)
        assert second.is_alive()  # waiting on the lock
        order.append("first released")
    second.join(10)
    assert order == ["first released", "second held"]
    assert path.is_file()


def _take(path: Path, order: list[str]) -> None:
    with exclusive_lock(path):
        order.append("second held")
