"""Unit tests of service/pull.py against an in-process fake of the serving API (httpx.MockTransport)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from service import pull

BASE = "http://lethe.test"


def _digest(body: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}


class FakeServer:
    def __init__(self, model: str = "m") -> None:
        self.model = model
        self.versions: dict[int, dict[str, bytes]] = {}
        self.withdrawn: set[int] = set()
        self.latest = 0
        self.corrupt: str | None = None
        self.requests: list[httpx.Request] = []

    def publish(self, version: int, files: dict[str, bytes]) -> None:
        manifest = {"files": {n: _digest(b) for n, b in files.items()}}
        self.versions[version] = {**files, "manifest.json": json.dumps(manifest).encode()}
        self.latest = version

    def listing(self, version: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": version,
            "files": {n: _digest(b) for n, b in self.versions[version].items()},
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        parts = request.url.path.strip("/").split("/")
        if parts[:4] == ["v1", "models", "m", "base"]:
            base = {"config.json": b'{"input_dim": 64}', "model.safetensors": b"base-weights"}
            if len(parts) == 4:
                files = [
                    {"name": n, **_digest(b), "url": f"/v1/models/m/base/files/{n}"} for n, b in base.items()
                ]
                return httpx.Response(200, json={"model": "m", "files": files})
            return httpx.Response(200, content=base[parts[5]])
        # v1 models m adapters <latest|n> [files <name>]
        assert parts[:4] == ["v1", "models", self.model, "adapters"]
        if parts[4] == "latest":
            etag = f'"v{self.latest}"'
            if request.headers.get("if-none-match") == etag:
                return httpx.Response(304, headers={"ETag": etag})
            return httpx.Response(200, json=self.listing(self.latest), headers={"ETag": etag})
        version = int(parts[4])
        if version in self.withdrawn:
            return httpx.Response(410, json={"title": "withdrawn"})
        if len(parts) == 5:
            return httpx.Response(200, json=self.listing(version))
        name = "/".join(parts[6:])
        body = self.versions[version][name]
        if self.corrupt == name:
            body = body + b"!"
        return httpx.Response(200, content=body)


@pytest.fixture
def server() -> FakeServer:
    s = FakeServer()
    s.publish(1, {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": b"w1"})
    return s


def _client(server: FakeServer) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(server.handler))


def test_first_pull_installs_and_verifies(server: FakeServer, tmp_path: Path) -> None:
    with _client(server) as client:
        result = pull.pull_once(client, BASE, "m", tmp_path)
    assert result.changed
    assert result.version == 1
    current = tmp_path / pull.CURRENT_LINK
    assert current.is_symlink()
    assert (current / "adapter_model.safetensors").read_bytes() == b"w1"
    assert pull.current_version(tmp_path) == 1
    assert pull.read_state(tmp_path)["etag"] == '"v1"'


def test_etag_gives_304_and_no_download(server: FakeServer, tmp_path: Path) -> None:
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
        server.requests.clear()
        result = pull.pull_once(client, BASE, "m", tmp_path)
    assert not result.changed
    assert result.version == 1
    assert [r.url.path for r in server.requests] == ["/v1/models/m/adapters/latest"]
    assert server.requests[0].headers["if-none-match"] == '"v1"'


def test_new_version_swaps_and_prunes_withdrawn(server: FakeServer, tmp_path: Path) -> None:
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
        old_target = os.readlink(tmp_path / pull.CURRENT_LINK)
        server.publish(2, {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": b"w2"})
        server.withdrawn.add(1)
        result = pull.pull_once(client, BASE, "m", tmp_path)
    assert result.changed
    assert result.version == 2
    assert os.readlink(tmp_path / pull.CURRENT_LINK) != old_target
    assert (tmp_path / pull.CURRENT_LINK / "adapter_model.safetensors").read_bytes() == b"w2"
    assert pull.local_versions(tmp_path) == [2]  # v1 was withdrawn: deleted locally


def test_keep_limits_old_versions(server: FakeServer, tmp_path: Path) -> None:
    with _client(server) as client:
        for v in (1, 2, 3):
            if v > 1:
                server.publish(v, {"adapter_model.safetensors": f"w{v}".encode()})
            pull.pull_once(client, BASE, "m", tmp_path, keep=2)
    assert pull.local_versions(tmp_path) == [2, 3]


def test_bad_hash_keeps_current_version(server: FakeServer, tmp_path: Path) -> None:
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
        server.publish(2, {"adapter_model.safetensors": b"w2"})
        server.corrupt = "adapter_model.safetensors"
        with pytest.raises(pull.PullError, match="sha256"):
            pull.pull_once(client, BASE, "m", tmp_path)
    assert pull.current_version(tmp_path) == 1
    assert pull.local_versions(tmp_path) == [1]
    assert not [p for p in (tmp_path / pull.VERSIONS_DIR).iterdir() if p.name.startswith(".tmp")]


def test_a_damaged_local_version_is_downloaded_again(server: FakeServer, tmp_path: Path) -> None:
    """A version directory already in DEST is checked against the listing (failed before: with
    state.json gone, garbage in versions/v1 was kept and reported "unchanged")."""
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
        (tmp_path / pull.VERSIONS_DIR / "v1" / "adapter_model.safetensors").write_bytes(b"garbage")
        (tmp_path / pull.STATE_FILE).unlink()
        result = pull.pull_once(client, BASE, "m", tmp_path)
    assert result.changed
    assert result.version == 1
    assert (tmp_path / pull.CURRENT_LINK / "adapter_model.safetensors").read_bytes() == b"w1"
    assert pull.local_versions(tmp_path) == [1]
    assert not [p for p in (tmp_path / pull.VERSIONS_DIR).iterdir() if p.name.startswith(".tmp")]


def test_a_current_version_damaged_under_an_intact_state_is_replaced_at_the_next_poll(
    server: FakeServer, tmp_path: Path
) -> None:
    """state.json intact, a served file damaged: the next poll notices it (before: every poll was a
    304 and the damaged file was served until the next version)."""
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
        (tmp_path / pull.CURRENT_LINK / "adapter_model.safetensors").write_bytes(b"garbage")
        server.requests.clear()
        result = pull.pull_once(client, BASE, "m", tmp_path)
        assert "if-none-match" not in server.requests[0].headers
        assert result.changed
        assert (tmp_path / pull.CURRENT_LINK / "adapter_model.safetensors").read_bytes() == b"w1"
        server.requests.clear()
        again = pull.pull_once(client, BASE, "m", tmp_path)  # intact now: a conditional poll, 304
    assert not again.changed
    assert server.requests[0].headers["if-none-match"] == '"v1"'
    assert pull.local_versions(tmp_path) == [1]
    assert not [p for p in (tmp_path / pull.VERSIONS_DIR).iterdir() if p.name.startswith(".tmp")]


def test_current_resolves_to_a_complete_version_throughout_a_replacement(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacing the damaged version that current points at: before every rename and link swap of
    the replacement, current resolves to a directory with every file (before: for the moment
    between two renames versions/v1 did not exist)."""
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
    (tmp_path / pull.CURRENT_LINK / "adapter_model.safetensors").write_bytes(b"garbage")
    seen: list[bytes] = []

    def resolves() -> None:
        current = tmp_path / pull.CURRENT_LINK
        seen.append((current / "adapter_model.safetensors").read_bytes())
        assert (current / "adapter_config.json").is_file()

    real_rename, real_replace = os.rename, os.replace

    def rename(src: Any, dst: Any) -> None:
        resolves()
        real_rename(src, dst)
        resolves()

    def replace(src: Any, dst: Any) -> None:
        resolves()
        real_replace(src, dst)
        resolves()

    monkeypatch.setattr(os, "rename", rename)  # the module's os is this os
    monkeypatch.setattr(os, "replace", replace)
    with _client(server) as client:
        result = pull.pull_once(client, BASE, "m", tmp_path)
    assert result.changed
    assert len(seen) >= 4
    assert seen[-1] == b"w1"
    assert (tmp_path / pull.CURRENT_LINK).resolve() == (tmp_path / pull.VERSIONS_DIR / "v1").resolve()


def test_a_state_without_a_listing_polls_unconditionally_once(server: FakeServer, tmp_path: Path) -> None:
    """A state.json written before the listing was kept: one full answer, checked, then 304s."""
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
        state = pull.read_state(tmp_path)
        del state["files"]
        (tmp_path / pull.STATE_FILE).write_text(json.dumps(state))
        server.requests.clear()
        first = pull.pull_once(client, BASE, "m", tmp_path)
        second = pull.pull_once(client, BASE, "m", tmp_path)
    assert not first.changed  # the local files were intact: no download
    assert not second.changed
    assert [r.url.path for r in server.requests] == ["/v1/models/m/adapters/latest"] * 2
    assert "if-none-match" not in server.requests[0].headers
    assert server.requests[1].headers["if-none-match"] == '"v1"'


def test_an_intact_local_version_is_kept_without_a_download(server: FakeServer, tmp_path: Path) -> None:
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
        (tmp_path / pull.STATE_FILE).unlink()
        server.requests.clear()
        result = pull.pull_once(client, BASE, "m", tmp_path)
    assert not result.changed
    assert [r.url.path for r in server.requests] == ["/v1/models/m/adapters/latest"]


def test_another_models_version_of_the_same_number_is_replaced(server: FakeServer, tmp_path: Path) -> None:
    """Without state.json, another model's versions/v1 is not taken for this model's v1."""
    other = FakeServer("m2")
    other.publish(1, {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": b"other"})
    with httpx.Client(transport=httpx.MockTransport(other.handler)) as client:
        pull.pull_once(client, BASE, "m2", tmp_path)
    (tmp_path / pull.STATE_FILE).unlink()
    with _client(server) as client:
        result = pull.pull_once(client, BASE, "m", tmp_path)
    assert result.changed
    assert (tmp_path / pull.CURRENT_LINK / "adapter_model.safetensors").read_bytes() == b"w1"
    assert pull.read_state(tmp_path)["model"] == "m"


def test_a_dest_holding_another_model_is_refused_and_left_alone(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed before: `lethe pull --model m2` into digits' DEST printed "m2 v4 unchanged", wrote m2
    into state.json and kept serving digits' weights."""
    other = FakeServer("m2")
    other.publish(1, {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": b"other"})
    with _client(server) as client:
        pull.pull_once(client, BASE, "m", tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def other_client(api_key: str | None = None, base_url: str = BASE, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(other.handler))

    with other_client() as client, pytest.raises(pull.PullError, match="another --dest"):
        pull.pull_once(client, BASE, "m2", tmp_path)
    monkeypatch.setattr(pull, "make_client", other_client)
    args = ["--model", "m2", "--dest", str(tmp_path), "--url", BASE, "--with-base"]
    result = CliRunner().invoke(pull.pull_command, args)
    assert result.exit_code == 1, result.output
    assert "holds the adapters of model 'm'" in result.output
    assert "another --dest" in result.output
    assert other.requests == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_refuses_path_traversal() -> None:
    listing = {"version": 3, "files": {"../evil": {"sha256": "0" * 64}}}
    with pytest.raises(pull.PullError, match="refusing"):
        pull.parse_listing(listing, BASE, "m")


def test_listing_forms() -> None:
    sha = "a" * 64
    version, files = pull.parse_listing(
        {"version": "4", "files": [{"name": "a.json", "sha256": sha, "size": 2, "url": "/dl/a.json"}]},
        BASE,
        "m",
    )
    assert version == 4
    assert files[0].url == f"{BASE}/dl/a.json"
    _, files = pull.parse_listing({"version": 4, "files": {"b.bin": {"sha256": sha}}}, BASE, "m")
    assert files[0].url == f"{BASE}/v1/models/m/adapters/4/files/b.bin"
    assert files[0].size is None


def test_cli_prints_version(server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "make_client", lambda api_key, base_url, timeout=30.0: _client(server))
    result = CliRunner().invoke(pull.pull_command, ["--model", "m", "--dest", str(tmp_path), "--url", BASE])
    assert result.exit_code == 0, result.output
    assert "m v1 installed" in result.output
    result = CliRunner().invoke(pull.pull_command, ["--model", "m", "--dest", str(tmp_path), "--url", BASE])
    assert "m v1 unchanged" in result.output


@pytest.mark.parametrize(
    "args",
    [["--keep", "0"], ["--keep", "-1"], ["--watch", "--interval", "-1"], ["--watch", "--interval", "0"]],
)
def test_cli_refuses_bad_numbers_before_pulling(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(pull.pull_command, ["--model", "m", "--dest", str(tmp_path), *args])
    assert result.exit_code == 2
    assert f"Invalid value for '{args[-2]}'" in result.output
    assert not (tmp_path / pull.VERSIONS_DIR).exists()


def test_cli_help_names_the_environment_variables() -> None:
    shown = CliRunner().invoke(pull.pull_command, ["--help"]).output
    assert "LETHE_API_URL" in shown
    assert "LETHE_API_KEY" in shown


def test_cli_names_the_api_it_cannot_reach(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = CliRunner().invoke(pull.pull_command, ["--model", "m", "--dest", str(tmp_path), "--url", url])
    assert result.exit_code == 1
    assert f"Error: the API at {url} is unreachable" in result.output
    assert "Traceback" not in result.output


def test_pull_base_downloads_and_verifies(server: FakeServer, tmp_path: Path) -> None:
    with _client(server) as client:
        dest = pull.pull_base(client, BASE, "m", tmp_path / "base")
        assert (dest / "model.safetensors").read_bytes() == b"base-weights"
        mtime = (dest / "config.json").stat().st_mtime_ns
        pull.pull_base(client, BASE, "m", dest)  # unchanged files are kept
        assert (dest / "config.json").stat().st_mtime_ns == mtime


class _Spy:
    """Answers for the serving origin (a ``FakeServer``) and records what reaches any other host."""

    def __init__(self, server: FakeServer, rewrite: Any) -> None:
        self.server = server
        self.rewrite = rewrite
        self.elsewhere: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != "lethe.test":
            self.elsewhere.append(request)
            return httpx.Response(200, content=b"w1")
        response = self.server.handler(request)
        rewritten: httpx.Response = self.rewrite(request, response)
        return rewritten


def _pull_with(spy: _Spy, tmp_path: Path) -> None:
    transport = httpx.MockTransport(spy.handler)
    with pull.make_client("lethe_serve_secret", base_url=BASE, transport=transport) as client:
        pull.pull_once(client, BASE, "m", tmp_path)


def test_a_listing_naming_another_origin_is_refused_and_the_key_stays_home(
    server: FakeServer, tmp_path: Path
) -> None:
    """Issue 9 item 3 (failed on 5a93ed6: file URLs of another host were fetched with the serve key,
    a Host-rewriting proxy captured it): the pull fails and nothing reaches the other host."""

    def absolute_elsewhere(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.url.path.endswith("/latest") and response.status_code == 200:
            listing = response.json()
            for name, meta in listing["files"].items():
                meta["url"] = f"http://evil.test/v1/models/m/adapters/1/files/{name}"
            return httpx.Response(200, json=listing, headers={"ETag": '"v1"'})
        return response

    spy = _Spy(server, absolute_elsewhere)
    with pytest.raises(pull.PullError, match="not the origin"):
        _pull_with(spy, tmp_path)
    assert spy.elsewhere == []
    assert pull.current_version(tmp_path) is None


def test_a_redirect_to_another_origin_is_refused(server: FakeServer, tmp_path: Path) -> None:
    """Issue 9 item 3 (failed on 5a93ed6: redirects were followed to any host): a download
    redirected elsewhere fails before anything is sent there."""

    def redirect_elsewhere(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if "/files/" in request.url.path:
            return httpx.Response(302, headers={"Location": "https://evil.test/steal"})
        return response

    spy = _Spy(server, redirect_elsewhere)
    with pytest.raises(pull.PullError, match="another origin"):
        _pull_with(spy, tmp_path)
    assert spy.elsewhere == []


def test_the_key_goes_to_the_serving_origin(server: FakeServer, tmp_path: Path) -> None:
    spy = _Spy(server, lambda request, response: response)
    _pull_with(spy, tmp_path)
    assert pull.current_version(tmp_path) == 1
    assert server.requests
    assert all(r.headers["Authorization"] == "Bearer lethe_serve_secret" for r in server.requests)
    assert pull.origin_of("https://a.test/x") == pull.origin_of("https://A.test:443/y")
    assert pull.origin_of("http://a.test") != pull.origin_of("https://a.test")
