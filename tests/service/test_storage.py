"""Both artifact-store backends behind one interface: the local directory and S3 (moto in-process)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import Settings
from service.storage import ArtifactStore, ChecksumMismatchError, NotInStoreError, StoreError, make_store
from service.storage.local import LocalStore
from service.storage.s3 import STAGING, S3Store

BUCKET = "lethe-test"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "artifacts")
        return
    moto = pytest.importorskip("moto")
    with moto.mock_aws():
        settings = Settings(
            home=tmp_path, artifact_store="s3", s3_bucket=BUCKET, s3_prefix="lethe/", s3_region="us-east-1",
            s3_access_key_id="test", s3_secret_access_key="test",
        )  # fmt: skip
        s3 = make_store(settings)
        assert isinstance(s3, S3Store)
        s3.client.create_bucket(Bucket=BUCKET)
        yield s3


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(store: ArtifactStore, tmp_path: Path) -> list[str]:
    """Staging objects / temporary files left anywhere in the store."""
    if isinstance(store, S3Store):
        listed = store.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        return [str(o["Key"]) for o in listed if f"/{STAGING}/" in str(o["Key"])]
    assert isinstance(store, LocalStore)
    return [p.name for p in store.root.rglob("*.tmp")]


def test_put_get_list_delete(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "w.bin"
    source.write_bytes(b"weights" * 1000)
    store.put_file("m/adapters/1-1/w.bin", source, _sha(source.read_bytes()))
    store.put_bytes("m/adapters/1-1/manifest.json", b"{}")
    store.put_bytes("m/tombstones/1.json", b"{}")
    assert store.exists("m/adapters/1-1/w.bin")
    assert store.size("m/adapters/1-1/w.bin") == 7000
    assert b"".join(store.stream("m/adapters/1-1/w.bin")) == source.read_bytes()
    assert store.read_bytes("m/adapters/1-1/manifest.json") == b"{}"
    assert store.list("m/adapters") == ["m/adapters/1-1/manifest.json", "m/adapters/1-1/w.bin"]
    dest = tmp_path / "out" / "w.bin"
    store.download("m/adapters/1-1/w.bin", dest, _sha(source.read_bytes()))
    assert dest.read_bytes() == source.read_bytes()
    store.delete("m/adapters/1-1/w.bin")
    store.delete("m/adapters/1-1/w.bin")  # idempotent
    assert not store.exists("m/adapters/1-1/w.bin")
    assert _leftovers(store, tmp_path) == []


def test_absent_keys(store: ArtifactStore, tmp_path: Path) -> None:
    assert not store.exists("m/none")
    assert store.list("m/none") == []
    with pytest.raises(NotInStoreError):
        store.size("m/none")
    with pytest.raises(NotInStoreError):
        store.stream("m/none")
    with pytest.raises(NotInStoreError):
        store.download("m/none", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_wrong_sha256_promotes_nothing_and_cleans_the_staging_key(
    store: ArtifactStore, tmp_path: Path
) -> None:
    source = tmp_path / "w.bin"
    source.write_bytes(b"new")
    store.put_bytes("m/adapters/1-1/w.bin", b"old")
    with pytest.raises(StoreError):  # S3: the server's BadDigest; local: the re-read hash
        store.put_file("m/adapters/1-1/w.bin", source, _sha(b"something else"))
    assert store.read_bytes("m/adapters/1-1/w.bin") == b"old"
    assert _leftovers(store, tmp_path) == []


def test_a_download_that_does_not_match_is_not_kept(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_bytes("m/base/model.safetensors", b"base")
    dest = tmp_path / "cache" / "model.safetensors"
    with pytest.raises(ChecksumMismatchError):
        store.download("m/base/model.safetensors", dest, _sha(b"other"))
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/./b", "..", "a\\b", "a\x00b"])
def test_bad_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(StoreError):
        store.exists(key)
    with pytest.raises(StoreError):
        store.put_bytes(key, b"x")


def test_local_store_refuses_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root" / "m").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"s")
    (tmp_path / "root" / "m" / "link").symlink_to(tmp_path / "secret")
    for read in (store.read_bytes, store.exists, store.stream):
        with pytest.raises(StoreError):
            read("m/link")


def test_s3_settings_need_a_bucket(tmp_path: Path) -> None:
    """A misconfiguration stops the process at start-up (settings), not at the first download."""
    with pytest.raises(ValidationError, match="LETHE_S3_BUCKET"):
        Settings(home=tmp_path, artifact_store="s3")


def test_local_is_the_default(tmp_path: Path) -> None:
    store: Any = make_store(Settings(home=tmp_path))
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "artifacts").resolve()
