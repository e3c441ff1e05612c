"""The local-directory backend: today's layout under ``LETHE_ARTIFACTS_DIR``, atomic renames."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from service.fileio import fsync_dir, fsync_file, sha256_file
from service.storage.base import CHUNK, ChecksumMismatchError, NotInStoreError, StoreError, check_key


class LocalStore:
    """Artifacts in a directory. The staging "key" of a file is a temporary file next to its final
    path (same filesystem), so promoting it is one ``rename``."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str) -> Path:
        """The path of ``key``; StoreError if it would leave the root (symlinks followed)."""
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise StoreError(f"artifact key {key!r} leaves the store")
        return path

    def _promote(self, tmp: Path, final: Path, sha256: str) -> None:
        try:
            fsync_file(tmp)
            actual, _ = sha256_file(tmp)
            if actual != sha256:
                raise ChecksumMismatchError(f"{final.name}: stored sha256 {actual} is not {sha256}")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)

    def _staging(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        final = self.path(key)
        if final.exists() and Path(path).exists() and os.path.samefile(final, path):
            # the worker wrote it in place (its artifacts dir is this store): verify only
            if sha256_file(final)[0] != sha256:
                raise ChecksumMismatchError(f"{key}: the file does not match sha256 {sha256}")
            return
        tmp = self._staging(final)
        shutil.copyfile(path, tmp)
        self._promote(tmp, final, sha256)

    def put_bytes(self, key: str, data: bytes) -> None:
        final = self.path(key)
        tmp = self._staging(final)
        tmp.write_bytes(data)
        self._promote(tmp, final, hashlib.sha256(data).hexdigest())

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except (OSError, ValueError):  # e.g. a name too long for the file system
            return False

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError as exc:
            raise NotInStoreError(key) from exc

    def stream(self, key: str) -> Iterator[bytes]:
        try:
            fh = open(self.path(key), "rb")  # noqa: SIM115 (closed by the generator)
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotInStoreError(key) from exc
        return _chunks(fh)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotInStoreError(key) from exc

    def download(self, key: str, dest: Path, sha256: str | None = None) -> None:
        source = self.path(key)
        if not source.is_file():
            raise NotInStoreError(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(source, tmp)
            if sha256 is not None and sha256_file(tmp)[0] != sha256:
                raise ChecksumMismatchError(f"{key}: the stored file does not match sha256 {sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        top = self.path(prefix)
        if not top.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in top.rglob("*") if p.is_file())

    def local_path(self, key: str) -> Path | None:
        return self.path(key)


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk
