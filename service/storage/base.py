"""The store's interface, keys and errors (the backends import this, not the package)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

#: The chunk size of streamed reads and hashes.
CHUNK = 1 << 20
_SEGMENT = re.compile(r"^[^/\\\x00]+$")


class StoreError(Exception):
    """The store refused or failed an operation (a key, a checksum, the backend)."""


class ChecksumMismatchError(StoreError):
    """What was stored is not what was sent (sha256 differs): nothing was promoted."""


class NotInStoreError(StoreError, KeyError):
    """No object under this key."""


def check_key(key: str) -> str:
    """``key`` if it is a relative POSIX path without empty, ``.`` or ``..`` segments; else StoreError."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or not _SEGMENT.match(p) for p in parts):
        raise StoreError(f"invalid artifact key {key!r}")
    return key


def join(*parts: str) -> str:
    """The key of ``parts`` joined with ``/`` (each part may itself hold ``/``)."""
    return check_key("/".join(p.strip("/") for p in parts if p.strip("/")))


class ArtifactStore(Protocol):
    """What the API and the workers need of an artifact store."""

    #: "local" or "s3"
    kind: str

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        """Publish the file at ``path`` under ``key``: staging key → verify ``sha256`` → promote."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Publish ``data`` under ``key`` (same staging and verification as :meth:`put_file`)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The object's size in bytes; NotInStoreError if absent."""
        ...

    def stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks; NotInStoreError (raised on the call) if absent."""
        ...

    def read_bytes(self, key: str) -> bytes: ...

    def download(self, key: str, dest: Path, sha256: str | None = None) -> None:
        """Copy the object to ``dest`` atomically (temporary file, verify ``sha256``, rename)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine (idempotent)."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a directory-like prefix, without the trailing ``/``), sorted."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file of ``key`` on this machine (local backend), or None (remote backend)."""
        ...
