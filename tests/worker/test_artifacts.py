"""Unit tests of worker/artifacts.py: atomic version directories, manifests, hashes, tombstones, GC."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from service import fileio
from worker import artifacts
from worker.artifacts import (
    MANIFEST,
    ArtifactError,
    ModelArtifacts,
    json_digest,
    verify_directory,
    version_dir_name,
)


def _store(tmp_path: Path) -> ModelArtifacts:
    store = ModelArtifacts(tmp_path / "artifacts", "m1")
    store.base_dir.mkdir(parents=True)
    (store.base_dir / "config.json").write_text("{}")
    return store


def _stage(store: ModelArtifacts, name: str, payload: bytes = b"weights") -> Path:
    staging = store.staging_dir(name)
    (staging / "adapter_model.safetensors").write_bytes(payload)
    (staging / "adapter_config.json").write_text('{"r": 16}')
    return staging


def test_commit_writes_manifest_with_hashes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    name = version_dir_name(7, 3)
    assert name == "7-3"
    staging = _stage(store, name)
    evidence = {"req-1": {"digit": {"unl": {"metric": 0.5}}}}
    committed = store.commit(staging, name, parent_version=1, requests=["req-1"], evidence=evidence)

    assert not staging.exists()
    assert committed.path == store.adapters_dir / "7-3"
    assert committed.location == "m1/adapters/7-3"
    assert store.resolve(committed.location) == committed.path
    manifest = json.loads((committed.path / MANIFEST).read_text())
    assert manifest["parent_version"] == 1
    assert manifest["requests"] == ["req-1"]
    assert manifest["evidence"] == {"req-1": json_digest(evidence["req-1"])}
    assert manifest["model"] == "m1"
    assert manifest["base"]["files"]["config.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()
    assert manifest["files"]["adapter_model.safetensors"] == {
        "sha256": hashlib.sha256(b"weights").hexdigest(),
        "size": 7,
    }
    assert set(committed.files) == {"adapter_model.safetensors", "adapter_config.json", MANIFEST}
    manifest_bytes = (committed.path / MANIFEST).read_bytes()
    assert committed.files[MANIFEST].sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert set(verify_directory(committed.path)) == {"adapter_model.safetensors", "adapter_config.json"}


def test_verify_detects_tampering(tmp_path: Path) -> None:
    store = _store(tmp_path)
    committed = store.commit(_stage(store, "1-1"), "1-1", parent_version=None, requests=[], evidence={})
    (committed.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="changed"):
        verify_directory(committed.path)
    (committed.path / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="extra"):
        verify_directory(committed.path)


def test_commit_refuses_existing_name_and_empty_dir(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.commit(_stage(store, "2-1"), "2-1", parent_version=1, requests=[], evidence={})
    with pytest.raises(FileExistsError):
        store.commit(_stage(store, "2-1"), "2-1", parent_version=1, requests=[], evidence={})
    with pytest.raises(ArtifactError):
        store.commit(store.staging_dir("2-2"), "2-2", parent_version=1, requests=[], evidence={})


def test_crash_before_rename_leaves_no_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure anywhere before the rename leaves no final directory: readers never see half a version."""
    store = _store(tmp_path)
    staging = _stage(store, "3-1")

    def boom(src: object, dst: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="simulated crash"):
        store.commit(staging, "3-1", parent_version=1, requests=[], evidence={})
    assert not (store.adapters_dir / "3-1").exists()
    assert staging.exists()  # an orphan for the GC


def test_fsyncs_files_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    staging = _stage(store, "4-1")
    synced_files: list[str] = []
    synced_dirs: list[str] = []
    real_file, real_dir = fileio.fsync_file, fileio.fsync_dir

    def spy_file(path: Path) -> None:
        synced_files.append(path.name)
        real_file(path)

    def spy_dir(path: Path) -> None:
        synced_dirs.append(str(path))
        real_dir(path)

    monkeypatch.setattr(artifacts, "fsync_file", spy_file)
    monkeypatch.setattr(artifacts, "fsync_dir", spy_dir)
    store.commit(staging, "4-1", parent_version=1, requests=[], evidence={})
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(synced_files)
    assert str(staging) in synced_dirs  # the staging dir before the rename
    assert str(store.adapters_dir) == synced_dirs[-1]  # the parent after the rename


def test_tombstone_keeps_hashes_and_deletes_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    committed = store.commit(_stage(store, "5-1"), "5-1", parent_version=1, requests=["r"], evidence={})
    tomb = store.delete_version(2, committed.location, reason="forgotten subject c3")
    assert not committed.path.exists()
    data = json.loads(tomb.read_text())
    assert data["version"] == 2
    assert data["reason"] == "forgotten subject c3"
    assert data["files"]["adapter_model.safetensors"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert data["manifest_sha256"] == committed.files[MANIFEST].sha256
    # Idempotent: a second call (crash after the tombstone) keeps the first tombstone.
    assert store.delete_version(2, committed.location, reason="again") == tomb
    assert json.loads(tomb.read_text())["reason"] == "forgotten subject c3"


def test_gc_removes_orphans_only(tmp_path: Path) -> None:
    store = _store(tmp_path)
    published = store.commit(_stage(store, "6-1"), "6-1", parent_version=1, requests=[], evidence={})
    orphan = store.commit(_stage(store, "6-2"), "6-2", parent_version=1, requests=[], evidence={})
    crashed_staging = _stage(store, "7-1")
    unrelated = store.adapters_dir / "README"
    unrelated.write_text("not a version")
    fresh_staging = _stage(store, "8-1")
    old = os.stat(crashed_staging).st_mtime - 3600
    os.utime(crashed_staging, (old, old))
    os.utime(orphan.path, (old, old))

    removed = store.gc_orphans([published.location], min_age_seconds=60)
    assert set(removed) == {orphan.path, crashed_staging}
    assert published.path.exists()
    assert fresh_staging.exists()
    assert unrelated.exists()
    assert store.gc_orphans([published.location]) == [fresh_staging]


def test_atomic_write_json_replaces(tmp_path: Path) -> None:
    path = tmp_path / "x" / "a.json"
    artifacts.atomic_write_json(path, {"a": 1})
    artifacts.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
