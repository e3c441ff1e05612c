"""Do the database and the artifacts agree? A worker deletes no adapter directory while they do not.

After a restore of mismatched parts (an older database with newer artifacts, or the reverse) the
database may name a version whose files are gone, and the disk may hold sealed versions the
database never heard of. The orphan GC would delete those as "crashed attempts", possibly the only
intact adapter. A sealed directory is a crashed attempt of *this* database only when the database
knows its round and handed out its fencing token; anything else is foreign and is never collected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.db.models import Model
from service.repositories import halts as halts_repo
from service.repositories import versions as versions_repo
from worker.artifacts import MANIFEST, ArtifactError, ModelArtifacts, is_version_dir, read_manifest


@dataclass(frozen=True)
class DatabaseView:
    """What the database says about one model's artifacts."""

    #: version → (location, status)
    versions: dict[int, tuple[str, str]]
    round_ids: frozenset[int]
    last_fencing_token: int

    @classmethod
    def load(cls, session: Session, model: Model) -> DatabaseView:
        return cls(
            versions={
                v.version: (v.location, v.status) for v in versions_repo.list_versions(session, model.id)
            },
            round_ids=frozenset(halts_repo.round_ids(session, model.id)),
            last_fencing_token=model.last_fencing_token,
        )

    @property
    def locations(self) -> list[str]:
        return [location for location, _ in self.versions.values()]


def is_foreign(directory: Path, view: DatabaseView) -> bool:
    """A sealed version directory that no attempt under this database wrote (see the module doc)."""
    if not (directory / MANIFEST).is_file():
        return False  # never sealed: a crashed attempt (every published version has a manifest)
    try:
        manifest = read_manifest(directory)
    except (ArtifactError, OSError, ValueError):
        return True  # a manifest we cannot read: not ours to judge, keep it
    return is_foreign_manifest(manifest, view)


def is_foreign_manifest(manifest: dict[str, Any], view: DatabaseView) -> bool:
    """Whether a sealed version's manifest names an attempt this database does not know."""
    round_id = manifest.get("round_id")
    if round_id is None:  # written by a preparation: a duplicate v1 while the database has one
        return 1 not in view.versions
    token = manifest.get("fencing_token")
    if not isinstance(round_id, int) or not isinstance(token, int):
        return True
    return round_id not in view.round_ids or token > view.last_fencing_token


def foreign_directories(store: ModelArtifacts, view: DatabaseView) -> list[Path]:
    """Sealed version directories that no database row names and no attempt of this database wrote."""
    if not store.adapters_dir.is_dir():
        return []
    named = {store.resolve(location).resolve() for location in view.locations}
    return [
        entry
        for entry in sorted(store.adapters_dir.iterdir())
        if entry.is_dir()
        and is_version_dir(entry.name)
        and entry.resolve() not in named
        and is_foreign(entry, view)
    ]


def problems(store: ModelArtifacts, view: DatabaseView) -> list[str]:
    """Every disagreement between the database and the disk, each as one sentence (empty: agreed)."""
    found: list[str] = []
    for version, (location, status) in sorted(view.versions.items()):
        if status != "active":
            continue
        if not store.has_version(location):  # here, or in the object store
            why = ""
            try:
                tomb = store.read_tombstone(version)
                if tomb is not None:
                    why = f"; its tombstone says it was deleted at {tomb.get('deleted_at')}"
            except (OSError, ValueError):
                why = "; it has a tombstone"
            found.append(
                f"active version {version} has no files at {location}{why} "
                "(is the database older than the artifacts?)"
            )
    for directory in foreign_directories(store, view):
        found.append(
            f"adapters/{directory.name} is a sealed version the database does not know (is the database "
            "older than the artifacts?)"
        )
    return found
