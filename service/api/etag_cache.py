"""Per-process ETags of each model's latest adapter, so that a matching ``If-None-Match`` is a 304
after one small query instead of loading the version's files and hashing them.

The cache maps a model to ``(version id, ETag)``. A version's ETag never changes (its files are
fixed once published), so an entry is valid exactly while that version is still the model's latest
active one. Every conditional request reads the latest active version id from the database
(:func:`~service.repositories.versions.latest_active_id`) and uses the entry only if it names
that id: a publish or a withdraw by any process (worker, admin API, another API process) is seen
at once, with nothing to invalidate across processes.
"""

from __future__ import annotations

import threading


class LatestEtags:
    """Model name -> (latest version id, its ETag), bounded; thread-safe."""

    def __init__(self, max_models: int = 10_000) -> None:
        self._entries: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self.max_models = max_models

    def get(self, model: str, version_id: int) -> str | None:
        """The cached ETag if ``version_id`` is the version it was computed for."""
        with self._lock:
            entry = self._entries.get(model)
        return entry[1] if entry is not None and entry[0] == version_id else None

    def entry(self, model: str) -> tuple[int, str] | None:
        """``(version id, ETag)`` cached for ``model``, if any."""
        with self._lock:
            return self._entries.get(model)

    def put(self, model: str, version_id: int, etag: str) -> None:
        with self._lock:
            if model not in self._entries and len(self._entries) >= self.max_models:
                self._entries.clear()  # only a bound against abuse; models are few
            self._entries[model] = (version_id, etag)
