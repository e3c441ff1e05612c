"""Adapter-version directories on disk: atomic writes, manifests, sha256, tombstones, orphan GC.

Layout (docs/architecture.md)::

    <artifacts>/<model>/base/                        frozen base (backbone/, heads, lethe-model.json)
    <artifacts>/<model>/adapters/<round>-<token>/    one adapter version, immutable once published
    <artifacts>/<model>/adapters/.staging-*          work directories of running (or crashed) rounds
    <artifacts>/<model>/tombstones/<version>.json    what a withdrawn version was (hashes)
    <artifacts>/<model>/state/<round>-<token>.json   the version's RoundState (worker-side only)

A version is written into a staging directory, every file is fsynced, ``manifest.json`` (per-file
sha256, base model, parent version, covered requests, evidence digests) is written last, the
directory is fsynced and renamed to its final name, and the parent directory is fsynced. A crash
leaves either no final directory or a complete one; a complete directory that no database row
points at is an orphan and :meth:`ModelArtifacts.gc_orphans` removes it.

The unlearning state of a version (``unlearning_state.json``: the forgotten clients' and samples'
ids) is not part of the version directory, which serving hosts download: :meth:`ModelArtifacts.
keep_state` moves it out of the staging directory before sealing, into ``state/<name>.json``, where
the next round reads it. It lives and dies with its version (orphan GC, withdrawal).

With an object store (``LETHE_ARTIFACT_STORE=s3``) this directory is the worker's local copy and
the store is the shared truth: a sealed version, the base, the state files and the tombstones are
uploaded (``service.storage``: staging key, sha256 verified, promoted) before the database
transaction that publishes them, deleted there when withdrawn, and fetched from there
(:meth:`ModelArtifacts.fetch_version`, through a bounded cache of blobs keyed by sha256,
``worker/blob_cache.py``) when a version
another machine wrote is needed here. With the local store (the default) this directory is the
store itself and ``remote`` is None.

This module is pure (no database, no torch): the pipeline passes what the database knows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service import fileio
from service.fileio import FileDigest, atomic_write_bytes, fsync_dir, fsync_file
from service.storage import ArtifactStore, NotInStoreError, join
from worker.blob_cache import BlobCache

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STAGING_PREFIX = ".staging-"
#: The engine's RoundState file in a version it writes (``worker.unlearning.state.STATE_FILE``).
STATE_FILE = "unlearning_state.json"
_VERSION_DIR = re.compile(r"^(\d+)-(\d+)$")


class ArtifactError(Exception):
    """A version directory is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> FileDigest:
    return FileDigest(*fileio.sha256_file(path))


def canonical_json(data: Any) -> bytes:
    return fileio.canonical_json(data, allow_nan=True).encode()


def json_digest(data: Any) -> str:
    """sha256 of the canonical JSON of ``data`` (an evidence document's id in the manifest)."""
    return hashlib.sha256(canonical_json(data)).hexdigest()


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")


def version_dir_name(round_id: int, fencing_token: int) -> str:
    """The directory name of the version one round attempt writes: unique per (round, token)."""
    if round_id < 0 or fencing_token < 0:
        raise ValueError("round id and fencing token must be non-negative")
    return f"{round_id}-{fencing_token}"


def _files_of(directory: Path) -> list[Path]:
    out: list[Path] = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ArtifactError(f"symbolic link in a version directory: {path}")
        if path.is_file():
            out.append(path)
    return out


def digest_directory(directory: Path, *, exclude: Iterable[str] = (MANIFEST,)) -> dict[str, FileDigest]:
    """sha256 of every regular file under ``directory`` keyed by its POSIX relative path."""
    skip = set(exclude)
    result: dict[str, FileDigest] = {}
    for path in _files_of(directory):
        rel = path.relative_to(directory).as_posix()
        if rel not in skip:
            result[rel] = sha256_file(path)
    return result


def is_version_dir(name: str) -> bool:
    """Whether ``name`` is a sealed version directory's name (``<round>-<token>``)."""
    return _VERSION_DIR.match(name) is not None


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST} in {directory}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or int(data.get("format", 0)) != MANIFEST_FORMAT:
        raise ArtifactError(f"unsupported manifest in {directory}")
    return data


def verify_directory(directory: Path) -> dict[str, FileDigest]:
    """Check every file against the manifest (no missing, extra or altered file); the digests."""
    manifest = read_manifest(directory)
    expected = {k: FileDigest(str(v["sha256"]), int(v["size"])) for k, v in manifest["files"].items()}
    actual = digest_directory(directory)
    if actual != expected:
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        changed = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
        raise ArtifactError(
            f"{directory} does not match its manifest (missing {missing}, extra {extra}, changed {changed})"
        )
    return actual


@dataclass(frozen=True)
class CommittedVersion:
    """A version directory after :meth:`ModelArtifacts.commit`: where, and the digests to publish."""

    name: str
    path: Path
    location: str  # relative to the artifacts root: "<model>/adapters/<name>"
    files: dict[str, FileDigest]  # every file including manifest.json
    manifest: dict[str, Any]


class ModelArtifacts:
    """The artifact directories of one model under an artifacts root."""

    def __init__(
        self, root: Path, model: str, *, remote: ArtifactStore | None = None, blobs: BlobCache | None = None
    ) -> None:
        self.root = Path(root)
        self.model = model
        #: the shared object store, None when this directory is the store (local backend)
        self.remote = remote
        #: downloaded files keyed by sha256, linked into place; bounded (LRU)
        self.blobs = blobs or BlobCache(self.root / ".blobs")
        self.model_dir = self.root / model
        self.base_dir = self.model_dir / "base"
        self.adapters_dir = self.model_dir / "adapters"
        self.tombstones_dir = self.model_dir / "tombstones"
        self.state_dir = self.model_dir / "state"

    # -- locations -----------------------------------------------------------------------------
    def location_of(self, name: str) -> str:
        return f"{self.model}/adapters/{name}"

    def resolve(self, location: str) -> Path:
        """The directory of a database ``location`` (relative to the root, or absolute)."""
        path = Path(location)
        return path if path.is_absolute() else self.root / path

    def base_digest(self) -> dict[str, Any]:
        """sha256 of the frozen base's files (recorded in every manifest)."""
        if not self.base_dir.is_dir():
            return {}
        return {k: v.to_json() for k, v in digest_directory(self.base_dir, exclude=()).items()}

    # -- the worker-side unlearning state --------------------------------------------------------
    def state_path(self, location: str) -> Path:
        """Where the RoundState of the version at ``location`` is kept (not in its served directory)."""
        return self.state_dir / f"{Path(location).name}.json"

    def state_file(self, location: str) -> Path:
        """The RoundState file of the version at ``location`` for the engine to read: the worker-side
        one, or ``unlearning_state.json`` in the version directory for a version written before the
        state moved out of it."""
        kept = self.state_path(location)
        return kept if kept.is_file() else self.resolve(location) / STATE_FILE

    def keep_state(self, staging: Path, name: str) -> Path:
        """Move ``staging/unlearning_state.json`` to the worker-side ``state/<name>.json`` (durably,
        before the version is sealed); a missing file is an error, never an empty state."""
        source = staging / STATE_FILE
        target = self.state_dir / f"{name}.json"
        atomic_write_bytes(target, source.read_bytes())
        if self.remote is not None:
            self.remote.put_file(self._state_key(name), target, sha256_file(target).sha256)
        source.unlink()
        fsync_dir(staging)
        return target

    def _state_key(self, name: str) -> str:
        return join(self.model, "state", f"{name}.json")

    # -- writing a version ---------------------------------------------------------------------
    def staging_dir(self, name: str) -> Path:
        """A fresh, empty work directory for the version ``name`` (same filesystem as the final one)."""
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        path = self.adapters_dir / f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def commit(
        self,
        staging: Path,
        name: str,
        *,
        parent_version: int | None,
        requests: list[str],
        evidence: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> CommittedVersion:
        """Seal ``staging`` as the version directory ``name``: hash, manifest, fsync, rename.

        ``evidence`` maps request id → evidence document; the manifest records each document's
        sha256 (its id). Raises ``FileExistsError`` if ``name`` exists already (a (round, token)
        pair is written once).
        """
        final = self.adapters_dir / name
        if final.exists():
            raise FileExistsError(f"version directory {final} exists already")
        if (staging / MANIFEST).exists():
            raise ArtifactError(f"{staging} already has a manifest")
        files = digest_directory(staging)
        if not files:
            raise ArtifactError(f"{staging} is empty")
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "model": self.model,
            "name": name,
            "created_at": datetime.now(UTC).isoformat(),
            "base": {"location": f"{self.model}/base", "files": self.base_digest()},
            "parent_version": parent_version,
            "requests": list(requests),
            "evidence": {rid: json_digest(doc) for rid, doc in evidence.items()},
            "files": {k: v.to_json() for k, v in sorted(files.items())},
            **dict(extra or {}),
        }
        for path in _files_of(staging):
            fsync_file(path)
        atomic_write_json(staging / MANIFEST, manifest)
        fsync_dir(staging)
        os.rename(staging, final)  # atomic on one filesystem; fails if ``final`` appeared meanwhile
        fsync_dir(self.adapters_dir)
        all_files = dict(files)
        all_files[MANIFEST] = sha256_file(final / MANIFEST)
        if self.remote is not None:
            try:
                self.upload_directory(final, self.location_of(name), all_files)
            except BaseException:
                self.discard(final)  # the local copy and whatever reached the store
                raise
        return CommittedVersion(name, final, self.location_of(name), all_files, manifest)

    def upload_directory(self, directory: Path, location: str, files: Mapping[str, FileDigest]) -> None:
        """Put every file of ``directory`` into the store under ``location`` (each verified by its
        sha256), ``manifest.json`` last: a version in the store without a manifest is incomplete."""
        assert self.remote is not None
        for rel in sorted(files, key=lambda k: (k == MANIFEST, k)):
            self.remote.put_file(join(location, rel), directory / rel, files[rel].sha256)

    def upload_base(self) -> dict[str, FileDigest]:
        """Put the frozen base into the store (a preparation, before v1 is registered); its digests."""
        files = digest_directory(self.base_dir, exclude=())
        if self.remote is not None:
            for rel, digest in sorted(files.items()):
                self.remote.put_file(join(self.model, "base", rel), self.base_dir / rel, digest.sha256)
        return files

    # -- reading what another machine wrote (object store) ---------------------------------------
    def _fetch(self, key: str, dest: Path, sha256: str) -> None:
        """``dest`` ← the store's ``key`` through the blob cache (verified sha256), linked in place.
        The caller holds the cache pinned (no blob is evicted before it is linked)."""
        remote = self.remote
        assert remote is not None
        blob = self.blobs.fetch(sha256, lambda path: remote.download(key, path, sha256))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            try:
                os.link(blob, tmp)  # the blob and the version file are both immutable
            except OSError:
                shutil.copyfile(blob, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def fetch_base(self, files: Mapping[str, Any]) -> Path:
        """The base directory, with every recorded file (``{name: {sha256, size}}``) present here."""
        if self.remote is None:
            return self.base_dir
        fetched = False
        with self.blobs.pinned():
            for rel, digest in sorted(files.items()):
                path = self.base_dir / rel
                # the size only, not a hash of gigabytes per round: files here come from verified blobs
                if not path.is_file() or path.stat().st_size != int(digest["size"]):
                    self._fetch(join(self.model, "base", rel), path, str(digest["sha256"]))
                    fetched = True
        if fetched:
            self.blobs.evict()  # after use: the base directory holds its own links
        return self.base_dir

    def fetch_version(self, location: str) -> Path:
        """The local directory of the version at ``location``, fetched from the store when it is not
        here complete (its manifest checked file by file). NotInStoreError if the store lacks it."""
        directory = self.resolve(location)
        if self.remote is None:
            return directory
        with contextlib.suppress(ArtifactError, OSError, ValueError):
            verify_directory(directory)
            return directory
        manifest_bytes = self.remote.read_bytes(join(location, MANIFEST))
        manifest = json.loads(manifest_bytes)
        work = directory.with_name(f"{STAGING_PREFIX}fetch-{directory.name}-{uuid.uuid4().hex[:12]}")
        try:
            with self.blobs.pinned():
                for rel, digest in sorted(manifest["files"].items()):
                    self._fetch(join(location, rel), work / rel, str(digest["sha256"]))
            atomic_write_bytes(work / MANIFEST, manifest_bytes)
            verify_directory(work)
            if directory.exists():  # an incomplete or altered local copy
                shutil.rmtree(directory)
            os.rename(work, directory)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        self.blobs.evict()  # after use: the version directory holds its own links
        return directory

    def fetch_state(self, location: str) -> Path:
        """:meth:`state_file`, fetched from the store first when it is not here."""
        kept = self.state_path(location)
        if self.remote is not None and not kept.is_file():
            with contextlib.suppress(NotInStoreError):  # written before the state moved out
                data = self.remote.read_bytes(self._state_key(Path(location).name))
                atomic_write_bytes(kept, data)
        return self.state_file(location)

    def stored_versions(self) -> set[str]:
        """Names of the version directories with any key in the store (one listing; empty: local)."""
        if self.remote is None:
            return set()
        prefix = f"{self.model}/adapters/"
        return {key[len(prefix) :].split("/", 1)[0] for key in self.remote.list(f"{self.model}/adapters")}

    def has_version(self, location: str) -> bool:
        """Whether the version's manifest is here or in the store."""
        if (self.resolve(location) / MANIFEST).is_file():
            return True
        return self.remote is not None and self.remote.exists(join(location, MANIFEST))

    def read_tombstone(self, version: int) -> dict[str, Any] | None:
        """The tombstone of ``version`` (here, or in the store), or None."""
        path = self.tombstone_path(version)
        if not path.is_file() and self.remote is not None:
            with contextlib.suppress(NotInStoreError):  # kept here too: a tombstone never changes
                atomic_write_bytes(path, self.remote.read_bytes(self._tombstone_key(version)))
        if not path.is_file():
            return None
        data: Any = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}

    def _tombstone_key(self, version: int) -> str:
        return join(self.model, "tombstones", f"{version}.json")

    def discard(self, path: Path) -> None:
        """Remove a staging or unpublished version directory (lease lost, failed round)."""
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        if self.remote is not None and path.parent == self.adapters_dir and is_version_dir(path.name):
            self._delete_remote(self.location_of(path.name), path.name)

    def _delete_remote(self, location: str, name: str) -> None:
        """The store's copy of a version: its files (manifest first: never a complete-looking
        version with files missing) and its state file."""
        assert self.remote is not None
        keys = self.remote.list(location)
        for key in sorted(keys, key=lambda k: not k.endswith(f"/{MANIFEST}")):
            self.remote.delete(key)
        self.remote.delete(self._state_key(name))

    # -- withdrawing ---------------------------------------------------------------------------
    def tombstone_path(self, version: int) -> Path:
        return self.tombstones_dir / f"{version}.json"

    def delete_version(self, version: int, location: str, *, reason: str) -> Path:
        """Write the version's tombstone (its manifest's hashes), then delete its files. Idempotent."""
        directory = self.resolve(location)
        tomb = self.tombstone_path(version)
        if self.remote is not None and not tomb.exists():
            with contextlib.suppress(NotInStoreError):  # written by another machine
                atomic_write_bytes(tomb, self.remote.read_bytes(self._tombstone_key(version)))
        if not tomb.exists():
            manifest, manifest_sha256 = self._manifest_anywhere(directory, location)
            atomic_write_json(
                tomb,
                {
                    "format": MANIFEST_FORMAT,
                    "model": self.model,
                    "version": version,
                    "location": location,
                    "deleted_at": datetime.now(UTC).isoformat(),
                    "reason": reason,
                    "files": (manifest or {}).get("files", {}),
                    "manifest_sha256": manifest_sha256,
                    "parent_version": (manifest or {}).get("parent_version"),
                    "requests": (manifest or {}).get("requests", []),
                },
            )
        if self.remote is not None:  # the tombstone first, then the files
            self.remote.put_file(self._tombstone_key(version), tomb, sha256_file(tomb).sha256)
            self._delete_remote(location, Path(location).name)
            # cached copies too: a withdrawn version still carries forgotten data (a blob another
            # version shares is only uncached: that version's directory keeps its own link)
            files = json.loads(tomb.read_text()).get("files", {}).values()
            self.blobs.discard(str(digest.get("sha256", "")) for digest in files)
        if directory.exists():
            with contextlib.suppress(FileNotFoundError):  # another worker deleted it meanwhile
                shutil.rmtree(directory)
            fsync_dir(directory.parent)
        self.state_path(location).unlink(missing_ok=True)
        return tomb

    def _manifest_anywhere(
        self, directory: Path | None, location: str
    ) -> tuple[dict[str, Any] | None, str | None]:
        """A version's manifest and its sha256, read in ``directory`` or else from the store."""
        raw: bytes | None = None
        if directory is not None and (directory / MANIFEST).is_file():
            raw = (directory / MANIFEST).read_bytes()
        elif self.remote is not None:
            with contextlib.suppress(NotInStoreError):
                raw = self.remote.read_bytes(join(location, MANIFEST))
        if raw is None:
            return None, None
        try:
            data = json.loads(raw)
        except ValueError:
            return None, None
        if not isinstance(data, dict) or int(data.get("format", 0)) != MANIFEST_FORMAT:
            return None, None
        return data, hashlib.sha256(raw).hexdigest()

    # -- garbage collection --------------------------------------------------------------------
    def gc_orphans(
        self,
        keep: Iterable[str],
        *,
        min_age_seconds: float = 0.0,
        spare: Callable[[Path], bool] | None = None,
    ) -> list[Path]:
        """Remove version and staging directories that ``keep`` (database locations) does not name.

        Call it while holding the model's round lease: no other live worker can publish then, so a
        directory no row points at belongs to a crashed or fenced-off attempt. ``min_age_seconds``
        spares very recent directories (a belt on top of the lease); ``spare`` spares the version
        directories it returns True for (see ``worker.consistency.is_foreign``).
        """
        keep = list(keep)
        removed = self._gc_states(keep, min_age_seconds)
        if not self.adapters_dir.is_dir():
            return removed
        kept = {self.resolve(loc).resolve() for loc in keep}
        now = time.time()
        for entry in sorted(self.adapters_dir.iterdir()):
            if not entry.is_dir() or entry.resolve() in kept:
                continue
            if not (entry.name.startswith(STAGING_PREFIX) or _VERSION_DIR.match(entry.name)):
                continue
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < min_age_seconds:
                continue
            if spare is not None and _VERSION_DIR.match(entry.name) and spare(entry):
                log.error("not deleting %s: a sealed version the database does not know", entry)
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        return removed

    def gc_remote_orphans(
        self, keep: Iterable[str], *, spare: Callable[[dict[str, Any] | None], bool] | None = None
    ) -> list[str]:
        """The store's side of :meth:`gc_orphans` (under the lease too): versions no database row
        names. ``spare`` gets the version's manifest (None: never sealed) and spares it on True.
        Staging keys a crashed upload left are the bucket's lifecycle rule's (docs/operations.md)."""
        if self.remote is None:
            return []
        kept = {Path(location).name for location in keep}
        names = self.stored_versions()
        removed: list[str] = []
        for name in sorted(names - kept):
            if not is_version_dir(name):
                continue
            location = self.location_of(name)
            manifest, _ = self._manifest_anywhere(None, location)
            if spare is not None and spare(manifest):
                log.error("not deleting %s from the store: a sealed version the database does not know", name)
                continue
            self._delete_remote(location, name)
            removed.append(location)
        states = {Path(location).name for location in keep} | names
        for key in self.remote.list(f"{self.model}/state"):
            if key.endswith(".json") and key.rsplit("/", 1)[-1][: -len(".json")] not in states:
                self.remote.delete(key)  # a round that failed between keep_state and its upload
                removed.append(key)
        return removed

    def _gc_states(self, keep: list[str], min_age_seconds: float) -> list[Path]:
        """State files of versions no database row names."""
        if not self.state_dir.is_dir():
            return []
        kept = {self.state_path(loc).name for loc in keep}
        now = time.time()
        removed: list[Path] = []
        for entry in sorted(self.state_dir.iterdir()):
            if entry.name in kept or not entry.name.endswith(".json") or not entry.is_file():
                continue
            try:
                if now - entry.stat().st_mtime < min_age_seconds:
                    continue
            except FileNotFoundError:
                continue
            entry.unlink(missing_ok=True)
            removed.append(entry)
        return removed
