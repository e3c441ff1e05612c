"""Durable bytes, defined once for the API, the serving pull and the worker: fsync of files, open
files and directories, atomic writes, streamed sha256 (:class:`FileDigest`), canonical JSON.

Torch-free and worker-free, so the API side can use it; the worker imports it from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """sha256 (hex) and size in bytes of one file (of a version, of a base)."""

    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


def canonical_json(value: Any, *, allow_nan: bool = False) -> str:
    """The one JSON text of ``value`` that is hashed or signed: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)


def sync_open_file(fh: IO[Any]) -> None:
    """Flush ``fh`` (open for writing) and its data to disk, before it is renamed into place."""
    fh.flush()
    os.fsync(fh.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file, fsync it, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            sync_open_file(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


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
