"""The worker's cache of files downloaded from the object store: keyed by sha256, bounded in size.

Layout: ``<root>/<sha[:2]>/<sha>``. A blob is downloaded whole (the store writes a temporary file,
verifies its sha256 and renames it into place), then linked (or copied) into the version or base
directory that needs it. Beyond ``max_bytes`` the least recently used blobs are evicted (a blob's
mtime is its last use).

Never a blob in use: a fetch holds the cache's lock (``flock`` on ``<root>/.lock``) shared from the
download to the link, and eviction takes it exclusive without waiting, so it is skipped while any
fetch runs, in any worker process of this host. Eviction runs after a fetch, once the fetched files
are linked into place: a version directory holds its own link, so evicting a blob never changes a
directory a round uses. A blob is removed with one ``unlink`` and re-hashed before it is linked, so
no partial blob is ever served.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from service import fileio

log = logging.getLogger(__name__)

#: The default bound (``LETHE_WORKER_BLOB_CACHE_MAX_BYTES``).
DEFAULT_MAX_BYTES = 10 * 2**30
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobCache:
    """Downloaded files keyed by sha256, at most ``max_bytes`` of them after each fetch."""

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.root = Path(root)
        self.max_bytes = max_bytes

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    @contextlib.contextmanager
    def _lock(self, kind: int) -> Iterator[bool]:
        """The cache's lock (``LOCK_SH`` / ``LOCK_EX``, optionally ``| LOCK_NB``); yields whether it
        was taken (False only with ``LOCK_NB`` while another holder conflicts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), kind)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """While inside, no blob is evicted or discarded (by this or any process on this host)."""
        with self._lock(fcntl.LOCK_SH):
            yield

    def fetch(self, sha256: str, download: Callable[[Path], None]) -> Path:
        """The blob of ``sha256``: kept if here and intact, else ``download(path)`` (which must write
        it atomically, verified); marked as just used. Call it inside :meth:`pinned` and link the
        blob into place before leaving."""
        blob = self.path(sha256)
        if not blob.is_file() or fileio.sha256_file(blob)[0] != sha256:
            download(blob)
        os.utime(blob)  # most recently used
        return blob

    def evict(self) -> list[Path]:
        """Remove least recently used blobs until at most ``max_bytes`` remain; the removed paths.

        Skipped (nothing removed) while a fetch holds the cache pinned: the next fetch evicts."""
        with self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB) as locked:
            if not locked:
                log.debug("blob cache busy: eviction skipped")
                return []
            blobs = sorted(self._blobs(), key=lambda b: (b[1], b[0].name))  # oldest use first
            total = sum(size for _, _, size in blobs)
            removed: list[Path] = []
            for path, _, size in blobs:
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
                removed.append(path)
        if removed:
            log.info("blob cache: evicted %d blobs, %d bytes left", len(removed), total)
        return removed

    def discard(self, sha256s: Iterable[str]) -> None:
        """Remove these blobs now (a withdrawn version still carries forgotten data), after any
        running fetch has linked what it needs."""
        with self._lock(fcntl.LOCK_EX):
            for sha256 in sha256s:
                if _SHA256.fullmatch(sha256):
                    self.path(sha256).unlink(missing_ok=True)

    def size(self) -> int:
        """Bytes the cached blobs hold (each blob's size, also where a directory links the same file)."""
        return sum(size for _, _, size in self._blobs())

    def _blobs(self) -> Iterator[tuple[Path, float, int]]:
        """(path, last use, size) of every complete blob (temporary files of downloads are not)."""
        if not self.root.is_dir():
            return
        for shard in self.root.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if _SHA256.fullmatch(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        yield Path(entry.path), st.st_mtime, st.st_size
