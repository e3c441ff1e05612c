"""Keyed digests of caller text that enters the hash-chained events.

The events form one SHA-256 chain, so nothing written into them can ever be erased. A caller's
``external_id`` (e.g. a DSR ticket, often personal) stays in ``forget_requests.external_id``, which can
be erased; the chain holds only its HMAC-SHA256 under a server secret, which proves which reference a
request had without disclosing it (and, unlike a plain hash, cannot be brute-forced without the key).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from service.fileio import sync_open_file
from service.settings import Settings

#: Where the key is kept when ``LETHE_EVENT_DIGEST_KEY`` is not set (created on first use).
KEY_FILE = "event-digest.key"


def keyed_digest(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def load_key(settings: Settings) -> bytes:
    """``LETHE_EVENT_DIGEST_KEY``, else ``$LETHE_HOME/event-digest.key`` (created, mode 0600)."""
    if settings.event_digest_key is not None:
        return settings.event_digest_key.get_secret_value().encode("utf-8")
    return load_file_key(settings.resolved_home / KEY_FILE)


def load_file_key(path: Path) -> bytes:
    """The key kept in ``path``; a new random one (mode 0600) when the file does not exist."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    # Write a complete key under a temporary name, then link it into place: a concurrent reader
    # never sees a partial file, and the first process to link wins.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            sync_open_file(fh)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> bytes:
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty; delete it or set the key's LETHE_* setting")
    return key.encode("utf-8")
