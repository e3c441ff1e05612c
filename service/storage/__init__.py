"""Where artifacts live: one small interface, two backends (docs/architecture.md, "Artifact storage").

* :class:`~service.storage.local.LocalStore`: a directory (the embedded default; exactly the layout
  ``worker/artifacts.py`` writes, atomic renames).
* :class:`~service.storage.s3.S3Store`: an S3-compatible bucket (AWS S3, MinIO, moto's server), so that
  the API, the workers and serving hosts share no filesystem.

Keys are POSIX paths relative to the artifacts root (``<model>/adapters/<round>-<token>/<file>``). A
file is published with :meth:`ArtifactStore.put_file`: written under a staging key, its sha256
verified, then promoted to its final key; a failure removes the staging key and leaves the final key
as it was. Which version is visible is decided by the database afterwards, so a half-uploaded
version is never served. Torch-free: the API imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.storage.base import (
    CHUNK,
    ArtifactStore,
    ChecksumMismatchError,
    NotInStoreError,
    StoreError,
    check_key,
    join,
)

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "CHUNK",
    "ArtifactStore",
    "ChecksumMismatchError",
    "NotInStoreError",
    "StoreError",
    "check_key",
    "join",
    "make_store",
]


def make_store(settings: Settings) -> ArtifactStore:
    """The store the settings name (``LETHE_ARTIFACT_STORE``)."""
    if settings.artifact_store == "s3":
        from service.storage.s3 import S3Store

        return S3Store.from_settings(settings)
    from service.storage.local import LocalStore

    return LocalStore(settings.resolved_artifacts_dir)
