"""/v1/models/{model}: latest adapter (ETag / 304), file downloads with digests, 410, path tricks."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from service import rounds
from service.api.app import create_app
from service.artifacts import resolve_file
from service.db.session import transaction
from service.db.types import utcnow
from service.errors import NotFoundError
from service.repositories import keys as keys_repo
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo
from service.sequencer import THREAD_NAME
from service.settings import Settings
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem, client_body


def write_files(directory: Path, files: dict[str, bytes]) -> dict[str, rounds.FileDigest]:
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
        digests[name] = rounds.FileDigest(sha256=hashlib.sha256(content).hexdigest(), size=len(content))
    return digests


@pytest.fixture
def served(settings: Settings, sessions: sessionmaker[Session]) -> Path:
    root = settings.resolved_artifacts_dir
    v1 = write_files(
        root / "digits/adapters/0-1",
        {"adapter_model.safetensors": b"v1-weights", "adapter_config.json": b"{}"},
    )
    base = write_files(root / "digits/base", {"model.safetensors": b"base-weights", "config.json": b"{}"})
    (root.parent / "secret.txt").write_text("do not serve")
    with transaction(sessions) as session:
        models_repo.create_model(
            session, "digits", workload="digits-clients", method="ssd", method_config={}, settings={}
        )
        rounds.register_prepared_model(
            session,
            "digits",
            subjects={"c0": ["s00000"], "c1": ["s00001"]},
            location="digits/adapters/0-1",
            files=v1,
            evidence={},
            tasks=["digit"],
            base_location="digits/base",
            base_files=base,
        )
    return root


def publish_v2(root: Path, sessions: sessionmaker[Session], keys: Keys, client: TestClient) -> None:
    client.post(
        "/v1/forget-requests", json=client_body("c0"), headers={**keys.submit, "Idempotency-Key": "k"}
    )
    files = write_files(root / "digits/adapters/1-1", {"adapter_model.safetensors": b"v2-weights"})
    with transaction(sessions) as session:
        claimed = rounds.claim_round(session, "digits", "w", lease_seconds=60, max_requests=4, max_attempts=3)
        assert claimed is not None
        rounds.publish_round(
            session, claimed, location="digits/adapters/1-1", files=files, evidence={}, withdraw_versions=[1]
        )


@pytest.mark.usefixtures("served")
def test_latest_with_etag_and_304(client: TestClient, keys: Keys) -> None:
    response = client.get("/v1/models/digits/adapters/latest", headers=keys.serve)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["version"], body["parent"], body["status"]) == (1, None, "active")
    files = {f["name"]: f for f in body["files"]}
    assert files["adapter_model.safetensors"]["sha256"] == hashlib.sha256(b"v1-weights").hexdigest()
    assert files["adapter_model.safetensors"]["size"] == len(b"v1-weights")
    etag = response.headers["etag"]
    cached = client.get("/v1/models/digits/adapters/latest", headers={**keys.serve, "If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.headers["etag"] == etag
    weak = client.get(
        "/v1/models/digits/adapters/latest", headers={**keys.serve, "If-None-Match": f'"x", W/{etag}'}
    )
    assert weak.status_code == 304
    stale = client.get("/v1/models/digits/adapters/latest", headers={**keys.serve, "If-None-Match": '"old"'})
    assert stale.status_code == 200

    download = client.get(files["adapter_model.safetensors"]["url"], headers=keys.serve)
    assert download.status_code == 200
    assert download.content == b"v1-weights"
    assert download.headers["x-checksum-sha256"] == hashlib.sha256(b"v1-weights").hexdigest()
    assert download.headers["repr-digest"].startswith("sha-256=:")
    again = client.get(
        files["adapter_model.safetensors"]["url"],
        headers={**keys.serve, "If-None-Match": download.headers["etag"]},
    )
    assert again.status_code == 304


def test_new_version_changes_etag_and_withdrawn_is_410(
    client: TestClient, keys: Keys, served: Path, sessions: sessionmaker[Session]
) -> None:
    etag = client.get("/v1/models/digits/adapters/latest", headers=keys.serve).headers["etag"]
    publish_v2(served, sessions, keys, client)
    latest = client.get("/v1/models/digits/adapters/latest", headers={**keys.serve, "If-None-Match": etag})
    assert latest.status_code == 200
    assert (latest.json()["version"], latest.json()["parent"]) == (2, 1)
    assert client.get("/v1/models/digits/adapters/2", headers=keys.serve).status_code == 200
    assert_problem(client.get("/v1/models/digits/adapters/1", headers=keys.serve), 410)
    gone = client.get("/v1/models/digits/adapters/1/files/adapter_model.safetensors", headers=keys.serve)
    assert_problem(gone, 410)


@pytest.mark.usefixtures("served")
def test_base_model_files(client: TestClient, keys: Keys) -> None:
    base = client.get("/v1/models/digits/base", headers=keys.serve)
    assert base.status_code == 200
    files = {f["name"]: f for f in base.json()["files"]}
    assert set(files) == {"model.safetensors", "config.json"}
    download = client.get(files["model.safetensors"]["url"], headers=keys.serve)
    assert download.content == b"base-weights"
    assert download.headers["x-checksum-sha256"] == files["model.safetensors"]["sha256"]
    cached = client.get(
        "/v1/models/digits/base", headers={**keys.serve, "If-None-Match": base.headers["etag"]}
    )
    assert (cached.status_code, cached.content) == (304, b"")
    again = {**keys.serve, "If-None-Match": download.headers["etag"]}
    assert client.get(files["model.safetensors"]["url"], headers=again).status_code == 304


@pytest.mark.usefixtures("served")
@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/digits/adapters/1/files/..%2F..%2F..%2Fsecret.txt",
        "/v1/models/digits/adapters/1/files/../../../secret.txt",
        "/v1/models/digits/adapters/1/files/%2e%2e",
        "/v1/models/digits/adapters/1/files/manifest.json",
        "/v1/models/digits/adapters/1/files/",
        "/v1/models/digits/adapters/01/files/adapter_model.safetensors",
        "/v1/models/digits/adapters/-1",
        "/v1/models/digits/adapters/1e3",
        "/v1/models/digits/adapters/99999999999999999999",
        "/v1/models/digits/adapters/9",
        "/v1/models/..%2Fdigits/adapters/latest",
        "/v1/models/DIGITS/adapters/latest",
        "/v1/models/nope/adapters/latest",
        "/v1/models/digits/base/files/..%2Fadapters%2F0-1%2Fadapter_config.json",
        "/v1/models/digits/base/files/%00",
        "/v1/models/digits/base/files/nope",
        # absolute paths, backslashes, NUL, newlines, case, very long names
        "/v1/models/digits/adapters/1/files/%2Fetc%2Fpasswd",
        "/v1/models/digits/base/files/%2F" + "..%2F" * 8 + "etc%2Fpasswd",
        "/v1/models/digits/adapters/1/files/..%5C..%5C..%5Csecret.txt",
        "/v1/models/digits/adapters/1/files/%2e%2e%5Csecret.txt",
        "/v1/models/digits/adapters/1/files/adapter_model.safetensors%00",
        "/v1/models/digits/adapters/1/files/adapter_model.safetensors%00.json",
        "/v1/models/digits/adapters/1/files/ADAPTER_MODEL.SAFETENSORS",
        "/v1/models/digits/adapters/1/files/" + "a" * 5000,
        "/v1/models/digits/adapters/1%0A",
        "/v1/models/digits/adapters/1%0A/files/adapter_model.safetensors",
        "/v1/models/digits%0A/adapters/latest",
        "/v1/models/digits%00/base",
        "/v1/models/" + "a" * 5000 + "/adapters/latest",
        "/v1/models/%2e%2e/adapters/latest",
    ],
)
def test_path_tricks_are_404(client: TestClient, keys: Keys, path: str) -> None:
    assert_problem(client.get(path, headers=keys.serve), 404)


def test_recorded_names_that_escape_are_404(
    client: TestClient, keys: Keys, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    root = settings.resolved_artifacts_dir
    (root / "evil").mkdir(parents=True)
    (root / "evil" / "link").symlink_to(root.parent / "outside.txt")
    (root.parent / "outside.txt").write_text("secret")
    with transaction(sessions) as session:
        models_repo.create_model(
            session, "evil", workload="digits-clients", method="ssd", method_config={}, settings={}
        )
        digest = rounds.FileDigest(sha256="0" * 64, size=1)
        rounds.register_prepared_model(
            session,
            "evil",
            subjects={},
            location="../",
            files={"outside.txt": digest},
            evidence={},
            base_location="evil",
            base_files={"link": digest, "n" * 300: digest},
        )
    assert_problem(client.get("/v1/models/evil/adapters/1/files/outside.txt", headers=keys.serve), 404)
    assert_problem(client.get("/v1/models/evil/base/files/link", headers=keys.serve), 404)
    # A recorded name longer than the file system allows (ENAMETOOLONG) is a 404, not a crash.
    assert_problem(client.get(f"/v1/models/evil/base/files/{'n' * 300}", headers=keys.serve), 404)


@pytest.mark.usefixtures("served")
def test_serving_needs_the_serve_scope(client: TestClient, keys: Keys) -> None:
    assert_problem(client.get("/v1/models/digits/adapters/latest"), 401)
    assert_problem(client.get("/v1/models/digits/adapters/latest", headers=keys.submit), 403)
    assert client.get("/v1/models/digits/adapters/latest", headers=keys.admin).status_code == 200


def test_model_without_versions_is_404(client: TestClient, keys: Keys) -> None:
    created = client.post(
        "/v1/admin/models", json={"name": "fresh", "workload": "digits-clients"}, headers=keys.admin
    )
    assert created.status_code == 201
    assert_problem(client.get("/v1/models/fresh/adapters/latest", headers=keys.serve), 404)
    assert_problem(client.get("/v1/models/fresh/base", headers=keys.serve), 404)


@pytest.mark.usefixtures("served")
def test_file_urls_never_follow_the_host_header(settings: Settings, keys: Keys) -> None:
    """Issue 9 item 3 (failed on 5a93ed6: file URLs were built from the request's Host header, so a
    Host-rewriting proxy pointed `lethe pull` and its serve key at itself): relative URLs by
    default, LETHE_PUBLIC_URL's origin when it is set, whatever Host and X-Forwarded-* say."""
    spoofed = {
        **keys.serve,
        "Host": "evil.test",
        "X-Forwarded-Host": "evil.test",
        "X-Forwarded-Proto": "https",
    }
    path = "/v1/models/digits/adapters/1/files/adapter_model.safetensors"
    with TestClient(create_app(settings)) as client:
        adapter = client.get("/v1/models/digits/adapters/latest", headers=spoofed)
        base = client.get("/v1/models/digits/base", headers=spoofed)
    assert adapter.status_code == 200, adapter.text
    urls = {f["name"]: f["url"] for f in adapter.json()["files"]}
    assert urls["adapter_model.safetensors"] == path
    assert all(f["url"].startswith("/v1/models/digits/base/files/") for f in base.json()["files"])
    public = settings.model_copy(update={"public_url": "https://lethe.example.com/"})
    with TestClient(create_app(public)) as client:
        adapter = client.get("/v1/models/digits/adapters/latest", headers=spoofed)
    urls = {f["name"]: f["url"] for f in adapter.json()["files"]}
    assert urls["adapter_model.safetensors"] == "https://lethe.example.com" + path


@contextlib.contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        if threading.current_thread().name != THREAD_NAME:  # not the background chain sequencer's
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.mark.usefixtures("served")
def test_conditional_get_is_answered_from_the_cached_etag(client: TestClient, keys: Keys) -> None:
    """Issue 10 part 5: a 304 cost as much as a 200 (the model, the version with its files, and the
    key's last-use UPDATE on every call), then two reads (the key; the latest version). Now one read
    of both, answered before routing (``service/api/not_modified.py``)."""
    url = "/v1/models/digits/adapters/latest"
    etag = client.get(url, headers=keys.serve).headers["etag"]
    engine = client.app.state.lethe.engine  # type: ignore[attr-defined]
    with _statements(engine) as seen:
        response = client.get(url, headers={**keys.serve, "If-None-Match": etag, "X-Request-ID": "poll-1"})
    assert response.status_code == 304
    assert (response.headers["etag"], response.headers["x-request-id"]) == (etag, "poll-1")
    queries = [s for s in seen if s.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT"))]
    assert len(queries) == 1, queries
    assert not any("adapter_versions.files" in s for s in queries), queries


@pytest.mark.usefixtures("served")
def test_the_304_shortcut_leaves_every_other_answer_to_the_route(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    """The shortcut answers only a current key with the scope and the current ETag: a key without
    ``serve`` is still 403, and a key revoked after many 304s gets 401 on its next poll (keys are
    read on every request, never cached)."""
    url = "/v1/models/digits/adapters/latest"
    etag = client.get(url, headers=keys.serve).headers["etag"]
    assert client.get(url, headers={**keys.serve, "If-None-Match": etag}).status_code == 304
    assert_problem(client.get(url, headers={**keys.submit, "If-None-Match": etag}), 403)
    assert client.get(url, headers={**keys.serve, "If-None-Match": '"other"'}).status_code == 200
    with transaction(sessions) as session:
        found = keys_repo.find_active(session, keys.serve["Authorization"].removeprefix("Bearer "))
        assert found is not None
        keys_repo.revoke_key(session, found)
    assert_problem(client.get(url, headers={**keys.serve, "If-None-Match": etag}), 401)


def test_cached_etag_follows_publish_and_withdraw_in_every_process(
    settings: Settings, keys: Keys, served: Path, sessions: sessionmaker[Session]
) -> None:
    """Issue 10 part 5: the per-process ETag cache must not answer 304 for a version that is no
    longer the latest, whichever process (or worker) published or withdrew: two app instances."""
    url = "/v1/models/digits/adapters/latest"
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        v1 = one.get(url, headers=keys.serve).headers["etag"]
        for app in (one, two):  # both cache v1's ETag
            assert app.get(url, headers={**keys.serve, "If-None-Match": v1}).status_code == 304
        publish_v2(served, sessions, keys, one)
        for app in (two, one):
            fresh = app.get(url, headers={**keys.serve, "If-None-Match": v1})
            assert fresh.status_code == 200, fresh.text
            assert fresh.json()["version"] == 2
            v2 = fresh.headers["etag"]
            assert v2 != v1
            assert app.get(url, headers={**keys.serve, "If-None-Match": v2}).status_code == 304
        with transaction(sessions) as session:  # v2 withdrawn (a bad version): v1 is not back, 404
            model = models_repo.get_model(session, "digits")
            assert model is not None
            versions_repo.withdraw(session, model.id, [2], at=utcnow())
        for app in (one, two):
            assert_problem(app.get(url, headers={**keys.serve, "If-None-Match": v2}), 404)


def test_base_files_in_folders_are_served(
    settings: Settings, sessions: sessionmaker[Session], client: TestClient, keys: Keys
) -> None:
    """Issue 7 part 2 (failed before: a name with a folder was a 404, so a base stored in its
    library's layout, ``backbone/config.json``, could not be pulled): a recorded name with folders
    is served; a segment ``..``, ``.`` or empty never is, even when recorded."""
    root = settings.resolved_artifacts_dir
    v1 = write_files(
        root / "vit/adapters/0-1", {"adapter_model.safetensors": b"w", "adapter_config.json": b"{}"}
    )
    base = write_files(
        root / "vit/base", {"backbone/config.json": b'{"model_type": "vit"}', "heads.safetensors": b"h"}
    )
    (root / "vit/secret.txt").write_bytes(b"not the base's")
    sneaky = rounds.FileDigest(sha256="0" * 64, size=1)
    recorded = {
        **base,
        "backbone/../../secret.txt": sneaky,
        "backbone//config.json": sneaky,
        "./heads.safetensors": sneaky,
    }
    with transaction(sessions) as session:
        models_repo.create_model(session, "vit", workload="tiny", method="ssd", method_config={}, settings={})
        rounds.register_prepared_model(
            session,
            "vit",
            subjects={},
            location="vit/adapters/0-1",
            files=v1,
            evidence={},
            base_location="vit/base",
            base_files=recorded,
        )
    listing = client.get("/v1/models/vit/base", headers=keys.serve)
    assert listing.status_code == 200, listing.text
    urls = {f["name"]: f["url"] for f in listing.json()["files"]}
    got = client.get(urls["backbone/config.json"], headers=keys.serve)
    assert got.status_code == 200, got.text
    assert got.content == b'{"model_type": "vit"}'
    assert (
        client.head("/v1/models/vit/base/files/backbone/config.json", headers=keys.serve).status_code == 200
    )
    assert_problem(client.get("/v1/models/vit/base/files/backbone", headers=keys.serve), 404)  # a folder
    # HTTP clients normalise dot segments away, so ask the resolver itself
    for name in ("backbone/../../secret.txt", "backbone//config.json", "./heads.safetensors"):
        with pytest.raises(NotFoundError):
            resolve_file(root, "vit/base", name, recorded)
