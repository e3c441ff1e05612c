"""Durable-file helpers shared by the serving pull (``service/pull.py``) and the worker's artifact
store (``worker/artifacts.py``): fsync of files and directories, streamed sha256.

Torch-free and worker-free, so the API side can use it; the worker imports it from here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (before it is renamed into place or listed in a manifest)."""
    _fsync(path, os.O_RDONLY)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (after a rename into it), so the rename survives a power loss."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def sha256_file(path: Path) -> tuple[str, int]:
    """sha256 (hex) and size in bytes of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
