"""The S3-compatible backend (AWS S3, MinIO, moto's server) through boto3.

Publishing a file: ``PutObject`` under ``<prefix>.staging/<uuid>/<key>`` with the file's
``ChecksumSHA256`` (the server rejects a body that does not match it), the checksum read back
(``HeadObject`` with ``ChecksumMode``; a server that does not keep checksums: the object is re-read
and hashed), a server-side copy to the final key, then the staging key is deleted, also on failure.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.fileio import sync_open_file
from service.storage.base import CHUNK, ChecksumMismatchError, NotInStoreError, StoreError, check_key

if TYPE_CHECKING:
    from service.settings import Settings

STAGING = ".staging"
#: Larger files go up in parts (PutObject takes at most 5 GiB); they are verified by re-reading.
SINGLE_PUT_MAX = 256 * 1024 * 1024


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def _missing(exc: Exception) -> bool:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _translated(exc: Exception, key: str) -> StoreError:
    """NotInStoreError for a missing key; StoreError for the rest (unreachable, denied, ...)."""
    if _missing(exc):
        return NotInStoreError(key)
    return StoreError(f"the object store failed on {key}: {type(exc).__name__}: {exc}")


class S3Store:
    kind = "s3"

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        import boto3
        from botocore.config import Config

        if not settings.s3_bucket:
            raise StoreError("LETHE_ARTIFACT_STORE=s3 needs LETHE_S3_BUCKET")
        secret = settings.s3_secret_access_key
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            # unset: boto3's own chain (AWS_* variables, profile, instance role)
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret is not None else None,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        return cls(client, settings.s3_bucket, settings.s3_prefix)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _verify(self, object_key: str, sha256: str) -> None:
        head = self.client.head_object(Bucket=self.bucket, Key=object_key, ChecksumMode="ENABLED")
        stored = head.get("ChecksumSHA256")
        if stored is not None and "-" not in str(stored):
            if stored != _b64(sha256):
                raise ChecksumMismatchError(f"{object_key}: stored ChecksumSHA256 {stored} is not {sha256}")
            return
        h = hashlib.sha256()  # no full-object checksum kept (multipart, or the server has none)
        body = self.client.get_object(Bucket=self.bucket, Key=object_key)["Body"]
        for chunk in body.iter_chunks(CHUNK):
            h.update(chunk)
        if h.hexdigest() != sha256:
            raise ChecksumMismatchError(f"{object_key}: stored sha256 {h.hexdigest()} is not {sha256}")

    def _publish(self, key: str, sha256: str, upload: Any) -> None:
        final = self._key(key)
        staging = f"{self.prefix}{STAGING}/{uuid.uuid4().hex}/{key}"
        try:
            upload(staging)
            self._verify(staging, sha256)
            self.client.copy_object(
                Bucket=self.bucket, Key=final, CopySource={"Bucket": self.bucket, "Key": staging}
            )
        except StoreError:
            raise
        except Exception as exc:  # botocore's ClientError, connection errors
            raise StoreError(f"publishing {key} to s3://{self.bucket}/{final} failed: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):  # a leftover is removed by the orphan GC
                self.client.delete_object(Bucket=self.bucket, Key=staging)

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        size = os.path.getsize(path)

        def upload(staging: str) -> None:
            if size > SINGLE_PUT_MAX:
                self.client.upload_file(str(path), self.bucket, staging)
                return
            with open(path, "rb") as fh:
                self.client.put_object(
                    Bucket=self.bucket, Key=staging, Body=fh, ChecksumSHA256=_b64(sha256), ContentLength=size
                )

        self._publish(key, sha256, upload)

    def put_bytes(self, key: str, data: bytes) -> None:
        sha256 = hashlib.sha256(data).hexdigest()

        def upload(staging: str) -> None:
            self.client.put_object(Bucket=self.bucket, Key=staging, Body=data, ChecksumSHA256=_b64(sha256))

        self._publish(key, sha256, upload)

    def _head(self, key: str) -> dict[str, Any]:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise _translated(exc, key) from exc
        return head

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotInStoreError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def _get(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as exc:
            raise _translated(exc, key) from exc

    def stream(self, key: str) -> Iterator[bytes]:
        body = self._get(key)

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()

    def read_bytes(self, key: str) -> bytes:
        body = self._get(key)
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def download(self, key: str, dest: Path, sha256: str | None = None) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            h = hashlib.sha256()
            with open(tmp, "wb") as fh:
                for chunk in self.stream(key):
                    h.update(chunk)
                    fh.write(chunk)
                sync_open_file(fh)
            if sha256 is not None and h.hexdigest() != sha256:
                raise ChecksumMismatchError(f"{key}: downloaded sha256 {h.hexdigest()} is not {sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) + "/"
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(str(item["Key"])[len(self.prefix) :] for item in page.get("Contents", []))
        return sorted(keys)

    def local_path(self, key: str) -> Path | None:
        return None
