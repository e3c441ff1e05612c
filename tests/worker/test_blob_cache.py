"""The worker's blob cache is bounded (issue 10, left from part 6: it was never evicted): least
recently used blobs go beyond ``max_bytes``, never one a fetch is using, and a damaged blob is never
served. Failed before: there was no bound (``worker/blob_cache.py`` did not exist)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from service.storage.local import LocalStore
from worker.artifacts import ModelArtifacts, verify_directory
from worker.blob_cache import BlobCache
from worker.config import WorkerSettings


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def writer(data: bytes) -> Callable[[Path], None]:
    """A download that writes ``data`` the way the stores do (a temporary file, then a rename)."""

    def download(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    return download


def test_least_recently_used_blobs_are_evicted_beyond_the_bound(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=250)
    blobs = {name: bytes([i]) * 100 for i, name in enumerate("abc")}
    paths = {name: cache.fetch(sha(data), writer(data)) for name, data in blobs.items()}
    for moment, name in enumerate("abc", start=1):  # last used: a, then b, then c
        os.utime(paths[name], (moment, moment))
    again = cache.fetch(sha(blobs["a"]), lambda path: pytest.fail("a cached blob was downloaded again"))
    assert again == paths["a"]  # a hit, now the most recently used
    (cache.root / "ab").mkdir()
    (cache.root / "ab" / ".partial.tmp").write_bytes(b"x" * 1000)  # a download in progress: not a blob

    assert cache.evict() == [paths["b"]]
    assert sorted(p.name for p in cache.root.glob("*/*") if p.name != ".partial.tmp") == sorted(
        sha(blobs[n]) for n in "ac"
    )
    assert cache.size() == 200
    assert cache.evict() == []  # within the bound


def test_a_pinned_cache_is_not_evicted_by_any_holder(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=0)
    path = cache.fetch(sha(b"in use"), writer(b"in use"))
    other_process = BlobCache(tmp_path / "cache", max_bytes=0)  # its own lock file handle
    with cache.pinned():
        assert other_process.evict() == []
        assert path.read_bytes() == b"in use"
    assert other_process.evict() == [path]
    assert not path.exists()


def test_a_damaged_blob_is_downloaded_again_never_served(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    data = b"adapter weights" * 10
    path = cache.path(sha(data))
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:7])  # half a file (a crash mid-write by a tool outside the cache)
    downloads: list[Path] = []

    def download(target: Path) -> None:
        downloads.append(target)
        writer(data)(target)

    assert cache.fetch(sha(data), download).read_bytes() == data
    assert downloads == [path]


def _publish(artifacts: ModelArtifacts, name: str, files: dict[str, bytes]) -> str:
    staging = artifacts.staging_dir(name)
    for rel, data in files.items():
        (staging / rel).write_bytes(data)
    return artifacts.commit(staging, name, parent_version=None, requests=[], evidence={}).location


def test_fetching_versions_keeps_the_cache_bounded_and_never_evicts_a_blob_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    author = ModelArtifacts(tmp_path / "author", "m1", remote=store)
    versions = {
        name: _publish(author, name, {"a.bin": os.urandom(1000), "b.bin": os.urandom(1000)})
        for name in ("1-1", "2-1", "3-1")
    }
    cache = BlobCache(tmp_path / "reader-cache", max_bytes=2500)
    reader = ModelArtifacts(tmp_path / "reader", "m1", remote=store, blobs=cache)
    # another worker process of this host tries to evict everything while each file downloads
    rival = BlobCache(cache.root, max_bytes=0)
    evicted_meanwhile: list[list[Path]] = []
    download = store.download

    def download_and_evict(key: str, dest: Path, sha256: str | None = None) -> None:
        download(key, dest, sha256)
        evicted_meanwhile.append(rival.evict())

    monkeypatch.setattr(store, "download", download_and_evict)
    for location in versions.values():
        directory = reader.fetch_version(location)
        verify_directory(directory)  # complete and intact, whatever was evicted after
        assert cache.size() <= 2500
    assert len(evicted_meanwhile) == 6  # 2 files, 3 versions
    assert not any(evicted_meanwhile)
    for location in versions.values():
        verify_directory(reader.resolve(location))  # evicting blobs never touched a version
    latest = reader.resolve(versions["3-1"])
    cached = {p.name for p in cache.root.glob("*/*")}
    assert {sha((latest / "a.bin").read_bytes()), sha((latest / "b.bin").read_bytes())} <= cached


def test_the_bound_is_a_worker_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().blob_cache_max_bytes == 10 * 2**30
    monkeypatch.setenv("LETHE_WORKER_BLOB_CACHE_MAX_BYTES", "1000")
    assert WorkerSettings().blob_cache_max_bytes == 1000
    with pytest.raises(ValueError, match="max_bytes"):
        BlobCache(Path("unused"), max_bytes=-1)
