"""Read-only access to published files under the artifacts directory (serving side)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from service.errors import NotFoundError


def check_name(name: str, recorded: dict[str, Any]) -> None:
    """NotFoundError unless ``name`` is a file name the database recorded. A name may have folders
    (``backbone/config.json`` of a base stored in its library's own layout); no part may be empty,
    ``.`` or ``..``, and no backslash."""
    parts = name.split("/")
    if name not in recorded or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise NotFoundError(f"no file {name!r} here")


def resolve_file(artifacts_dir: Path, location: str, name: str, recorded: dict[str, Any]) -> Path:
    """The path of a recorded file, or NotFoundError (unrecorded name, escape, missing file).

    Only names the database recorded for the version are served, and the resolved path (symlinks
    followed) must stay inside the artifacts directory. A name may have folders (``backbone/
    config.json`` of a base stored in its library's own layout); no part may be empty, ``.`` or ``..``.
    """
    check_name(name, recorded)
    root = artifacts_dir.resolve()
    try:
        path = (root / location / name).resolve()
        available = path.is_relative_to(root) and path.is_file()
    except (OSError, ValueError):  # e.g. a name too long for the file system, or a NUL byte
        available = False
    if not available:
        raise NotFoundError(f"file {name!r} is not available")
    return path


def sha256_header(hex_digest: str) -> str:
    """An RFC 9530 ``Repr-Digest`` value for a SHA-256 hex digest."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(hex_digest)).decode('ascii')}:"


def etag_of(*parts: Any) -> str:
    digest = hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:32]
    return f'"{digest}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False
