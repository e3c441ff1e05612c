"""``lethe pull``: keep a serving host's copy of a model's latest adapter current (torch-free).

The client polls ``GET /v1/models/{model}/adapters/latest`` with ``If-None-Match``; on a new
version it downloads every file into a temporary directory next to the destination, checks each
file's sha256 (and size) against the server's listing (and the version's ``manifest.json``), fsyncs,
renames the directory to ``DEST/versions/v<n>`` and then swaps the ``DEST/current`` symbolic link
atomically (``rename`` over the old link). Readers that resolve ``current`` see the old version or
the new one, never a half-written directory. A version directory already in ``DEST`` is used only
if it holds exactly the listed files with their sha256 and size; otherwise it is downloaded again.
``state.json`` keeps the listing of the installed version: before each conditional poll the current
version is checked against it (a sha256 of every file), so a local file damaged after the install
is noticed at the next poll, not only at the next version. A damaged current version is replaced
without a moment in which ``current`` resolves to nothing (:func:`_install`).
A ``DEST`` holds one model: one whose ``state.json`` names another model is refused. Older local
versions that the server withdrew (410) are deleted; see docs/serving.md for vLLM / LoRAX hosts (a
new adapter name per version).

Layout of ``DEST``::

    DEST/current -> versions/v<n>     the version to serve
    DEST/versions/v<n>/               peft files + manifest.json, verified
    DEST/state.json                   model, version, ETag and file listing of the last successful pull
    DEST/base/                        the frozen base model (``--with-base``), verified

The serve key goes to the ``--url`` origin only: file URLs of another origin (scheme, host, port)
are refused, every request (redirects included) to another origin is refused before it is sent, and
the ``Authorization`` header is attached for that origin only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import click
import httpx

from service.cli_options import api_key_option, api_url_option
from service.fileio import fsync_dir, sha256_file, sync_open_file

STATE_FILE = "state.json"
CURRENT_LINK = "current"
VERSIONS_DIR = "versions"
MANIFEST = "manifest.json"


class PullError(Exception):
    """The server's answer could not be turned into a verified local version."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str
    size: int | None
    url: str


@dataclass(frozen=True)
class PullResult:
    changed: bool
    version: int | None
    path: Path | None
    etag: str | None


Origin = tuple[str, str, int | None]


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of an absolute URL, the default port made explicit."""
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, parsed.host.lower(), port


def _same_origin(url: str, base_url: str) -> bool:
    return origin_of(url) == origin_of(base_url)


def _safe_name(name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or name.startswith("/"):
        raise PullError(f"refusing the file name {name!r}")
    return path.as_posix()


def parse_listing(data: Mapping[str, Any], base_url: str, model: str) -> tuple[int, list[RemoteFile]]:
    """Version number and files of a ``.../adapters/latest`` (or ``.../adapters/{n}``) answer.

    ``files`` may be a mapping ``{name: {"sha256", "size", "url"?}}`` or a list of objects with a
    ``name`` (or ``path``); a missing ``url`` means the standard file route.
    """
    try:
        version = int(data["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PullError(f"no version in the server's answer: {data!r}") from exc
    raw = data.get("files")
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(raw, Mapping):
        entries = [(str(k), v) for k, v in raw.items() if isinstance(v, Mapping)]
    elif isinstance(raw, list):
        entries = [(str(v.get("name") or v.get("path")), v) for v in raw if isinstance(v, Mapping)]
    if not entries:
        raise PullError("the server listed no files")
    files: list[RemoteFile] = []
    for name, meta in entries:
        name = _safe_name(name)
        sha = str(meta.get("sha256", "")).lower()
        if len(sha) != 64:
            raise PullError(f"no sha256 for {name}")
        url = meta.get("url") or meta.get("href") or meta.get("download_url")
        if not url:
            url = f"/v1/models/{quote(model)}/adapters/{version}/files/{quote(name)}"
        size = meta.get("size")
        url = str(url)
        if not url.startswith(("http://", "https://")):
            url = base_url.rstrip("/") + "/" + url.lstrip("/")
        if not _same_origin(url, base_url):
            raise PullError(f"refusing the URL {url!r} of {name}: not the origin of {base_url}")
        files.append(RemoteFile(name, sha, None if size is None else int(size), url))
    return version, files


def _download(client: httpx.Client, remote: RemoteFile, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with client.stream("GET", remote.url) as resp:
        if resp.status_code != 200:
            raise PullError(f"GET {remote.url}: HTTP {resp.status_code}")
        with open(target, "wb") as fh:
            for chunk in resp.iter_bytes():
                h.update(chunk)
                size += len(chunk)
                fh.write(chunk)
            sync_open_file(fh)
    if h.hexdigest() != remote.sha256:
        raise PullError(f"{remote.name}: sha256 {h.hexdigest()} != {remote.sha256} (listed)")
    if remote.size is not None and size != remote.size:
        raise PullError(f"{remote.name}: {size} bytes != {remote.size} (listed)")


def _check_manifest(directory: Path, files: list[RemoteFile]) -> None:
    """When the version carries a manifest, every file it lists must be here with that hash."""
    path = directory / MANIFEST
    if not path.exists():
        return
    manifest = json.loads(path.read_text())
    listed = {f.name: f.sha256 for f in files}
    for name, meta in dict(manifest.get("files", {})).items():
        if listed.get(name) != str(meta.get("sha256")):
            raise PullError(f"manifest and server listing disagree on {name}")


def read_state(dest: Path) -> dict[str, Any]:
    try:
        data = json.loads((dest / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(dest: Path, state: Mapping[str, Any]) -> None:
    tmp = dest / f".{STATE_FILE}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(dict(state), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, dest / STATE_FILE)


def current_version(dest: Path) -> int | None:
    link = dest / CURRENT_LINK
    if not link.is_symlink():
        return None
    name = Path(os.readlink(link)).name
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def swap_current(dest: Path, version_dir: Path) -> None:
    """Point ``dest/current`` at ``version_dir`` atomically (a new link renamed over the old one)."""
    tmp = dest / f".{CURRENT_LINK}.{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(version_dir, dest), tmp)
    os.replace(tmp, dest / CURRENT_LINK)
    fsync_dir(dest)


def local_versions(dest: Path) -> list[int]:
    root = dest / VERSIONS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir() if p.name.startswith("v") and p.name[1:].isdigit())


def check_dest(dest: Path, model: str) -> None:
    """Refuse a ``dest`` whose state names another model: its versions are that model's."""
    held = read_state(dest).get("model")
    if held is not None and held != model:
        raise PullError(
            f"{dest} holds the adapters of model {held!r}, not {model!r}: "
            f"pull each model into its own directory (another --dest)"
        )


def _matches_listing(directory: Path, files: list[RemoteFile]) -> bool:
    """Whether ``directory`` holds exactly the listed files, each with its listed sha256 and size.

    A local version directory is trusted only after this: it may be another model's version of
    the same number, or a file in it may have been damaged since it was installed. A missing
    directory, or a link in place of one, does not match."""
    if not directory.is_dir() or directory.is_symlink():
        return False
    names: set[str] = set()
    for path in directory.rglob("*"):
        if path.is_symlink():
            return False
        if not path.is_dir():
            names.add(path.relative_to(directory).as_posix())
    if names != {f.name for f in files}:
        return False
    for remote in files:
        sha, size = sha256_file(directory / remote.name)
        if sha != remote.sha256 or (remote.size is not None and size != remote.size):
            return False
    return True


def _install(
    client: httpx.Client, files: list[RemoteFile], final: Path, *, serving: Path | None = None
) -> None:
    """Download ``files`` into a temporary directory, verify them and rename it to ``final``.

    A ``final`` already there failed :func:`_matches_listing`; it is renamed aside and deleted.
    ``serving`` (``DEST`` when ``current`` points at ``final``): ``current`` is first pointed at the
    verified temporary directory, ``final`` is replaced by hard links to its files, and ``current``
    is pointed back; readers that resolve ``current`` always find a complete, verified version.
    Without it, nothing points at ``final`` and a rename aside is enough."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.parent / f".tmp-{final.name}-{tag}"
    linked = final.parent / f".tmp-linked-{final.name}-{tag}"
    stale = final.parent / f".tmp-stale-{final.name}-{tag}"
    try:
        for remote in files:
            _download(client, remote, tmp / remote.name)
        _check_manifest(tmp, files)
        fsync_dir(tmp)
        source = tmp
        if serving is not None:
            swap_current(serving, tmp)  # the new files serve while final is replaced
            for remote in files:  # the files are immutable once verified: links, not copies
                (linked / remote.name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(tmp / remote.name, linked / remote.name)
                except OSError:  # a file system without hard links
                    shutil.copy2(tmp / remote.name, linked / remote.name)
            fsync_dir(linked)
            source = linked
        if final.exists() or final.is_symlink():
            os.rename(final, stale)
        os.rename(source, final)
        fsync_dir(final.parent)
        if serving is not None:
            swap_current(serving, final)
    finally:
        if serving is not None and current_version(serving) is None and final.is_dir():
            swap_current(serving, final)  # failed after pointing current at tmp: never leave it dangling
        for leftover in (tmp, linked, stale):
            if leftover.is_symlink():
                leftover.unlink()
            elif leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _listed(files: list[RemoteFile]) -> list[dict[str, Any]]:
    """The listing kept in ``state.json`` (what the local copy is checked against before a 304)."""
    return [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in files]


def _stored_listing(state: Mapping[str, Any]) -> list[RemoteFile] | None:
    """The listing ``state.json`` kept, or ``None`` (a state written before it was kept, or damaged)."""
    rows = state.get("files")
    if not isinstance(rows, list) or not rows:
        return None
    try:
        return [
            RemoteFile(
                str(r["name"]), str(r["sha256"]), None if r.get("size") is None else int(r["size"]), url=""
            )
            for r in rows
        ]
    except (KeyError, TypeError, ValueError):
        return None


def _current_intact(dest: Path, version: int | None, state: Mapping[str, Any]) -> bool:
    """Whether ``current`` (version ``version``) still holds exactly the files of its stored listing."""
    listing = _stored_listing(state)
    return (
        version is not None
        and listing is not None
        and _matches_listing(dest / VERSIONS_DIR / f"v{version}", listing)
    )


def pull_once(client: httpx.Client, base_url: str, model: str, dest: Path, *, keep: int = 2) -> PullResult:
    """One poll: download and install the latest version if it changed, or if the local copy of it
    does not match the server's listing (checked before the request: a poll answered 304 is one
    whose local copy was found intact)."""
    check_dest(dest, model)
    dest.mkdir(parents=True, exist_ok=True)
    state = read_state(dest)
    have = current_version(dest)
    headers: dict[str, str] = {}
    etag = state.get("etag") if state.get("model") == model and state.get("version") == have else None
    if etag and _current_intact(dest, have, state):
        headers["If-None-Match"] = str(etag)
    resp = client.get(f"{base_url}/v1/models/{quote(model)}/adapters/latest", headers=headers)
    if resp.status_code == 304 and headers:
        return PullResult(False, have, dest / VERSIONS_DIR / f"v{have}", str(etag))
    if resp.status_code != 200:
        raise PullError(f"GET latest adapter of {model}: HTTP {resp.status_code}: {resp.text[:300]}")
    version, files = parse_listing(resp.json(), base_url, model)
    new_etag = resp.headers.get("ETag")
    final = dest / VERSIONS_DIR / f"v{version}"
    changed = have != version
    if not _matches_listing(final, files):
        _install(client, files, final, serving=dest if have == version else None)
        changed = True  # new files, even for the version ``current`` already named
    if changed:
        swap_current(dest, final)
    _write_state(dest, {"model": model, "version": version, "etag": new_etag, "files": _listed(files)})
    _prune(client, base_url, model, dest, current=version, keep=keep)
    return PullResult(changed, version, final, new_etag)


def _prune(client: httpx.Client, base_url: str, model: str, dest: Path, *, current: int, keep: int) -> None:
    """Delete local versions the server withdrew (410), and all but the newest ``keep``."""
    older = [v for v in local_versions(dest) if v != current]
    for v in older:
        with contextlib.suppress(httpx.HTTPError):
            if client.get(f"{base_url}/v1/models/{quote(model)}/adapters/{v}").status_code in (404, 410):
                shutil.rmtree(dest / VERSIONS_DIR / f"v{v}", ignore_errors=True)
    remaining = [v for v in local_versions(dest) if v != current]
    for v in remaining[: max(0, len(remaining) - (keep - 1))]:
        shutil.rmtree(dest / VERSIONS_DIR / f"v{v}", ignore_errors=True)
    for tmp in (dest / VERSIONS_DIR).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def pull_base(client: httpx.Client, base_url: str, model: str, dest: Path) -> Path:
    """Download the model's frozen base (``GET /v1/models/{model}/base``) into ``dest``, verified.

    The base does not change between adapter versions; files already present with the listed
    sha256 are kept.
    """
    resp = client.get(f"{base_url}/v1/models/{quote(model)}/base")
    if resp.status_code != 200:
        raise PullError(f"GET base of {model}: HTTP {resp.status_code}: {resp.text[:300]}")
    _, files = parse_listing({"version": 0, **resp.json()}, base_url, model)
    dest.mkdir(parents=True, exist_ok=True)
    for remote in files:
        target = dest / remote.name
        if target.is_file() and sha256_file(target)[0] == remote.sha256:
            continue
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        try:
            _download(client, remote, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(dest)
    return dest


class _BearerForOrigin(httpx.Auth):
    """``Authorization: Bearer`` on requests to one origin, never on any other."""

    def __init__(self, api_key: str, origin: Origin) -> None:
        self._header = f"Bearer {api_key}"
        self._origin = origin

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin_of(str(request.url)) == self._origin:
            request.headers["Authorization"] = self._header
        yield request


def make_client(
    api_key: str | None, *, base_url: str, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """A client that talks to ``base_url``'s origin only (redirects included) and sends the key
    there only. (``transport``: tests.)"""
    origin = origin_of(base_url)

    def same_origin_only(request: httpx.Request) -> None:
        if origin_of(str(request.url)) != origin:
            raise PullError(f"refusing to follow {request.url} away from {base_url} (another origin)")

    return httpx.Client(
        auth=_BearerForOrigin(api_key, origin) if api_key else None,
        timeout=timeout,
        follow_redirects=True,
        event_hooks={"request": [same_origin_only]},
        transport=transport,
    )


def describe(exc: Exception, base_url: str) -> str:
    """A pull's error for a person: a connection failure names the API's URL."""
    if isinstance(exc, httpx.TransportError):
        return f"the API at {base_url} is unreachable: {exc}"
    return str(exc)


def watch(
    base_url: str,
    model: str,
    dest: Path,
    *,
    api_key: str | None,
    interval: float,
    keep: int,
    on_change: Callable[[PullResult], None],
    stop: Callable[[], bool] = lambda: False,
) -> None:
    with make_client(api_key, base_url=base_url) as client:
        while not stop():
            try:
                result = pull_once(client, base_url, model, dest, keep=keep)
                if result.changed:
                    on_change(result)
            except (PullError, httpx.HTTPError) as exc:
                click.echo(f"lethe pull: {describe(exc, base_url)}", err=True)
            time.sleep(interval)


@click.command("pull")
@click.option("--model", "model", required=True, help="Model name.")
@click.option(
    "--dest",
    "dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of this model's versions (DEST/current: the one to serve); one model per DEST.",
)
@api_url_option
@api_key_option("serve", required=False)
@click.option("--watch/--once", "watch_mode", default=False, help="Keep polling (ETag) or pull once.")
@click.option(
    "--interval",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between polls with --watch.",
)
@click.option(
    "--keep",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Local versions kept, the current one included (withdrawn ones never).",
)
@click.option("--with-base", is_flag=True, help="Also fetch the frozen base model into DEST/base (verified).")
@click.option("--exec", "exec_cmd", default=None, help="Shell command run after each new version "
              "(env: LETHE_ADAPTER_NAME, LETHE_ADAPTER_PATH, LETHE_ADAPTER_VERSION).")  # fmt: skip
def pull_command(
    model: str, dest: Path, url: str, api_key: str | None, watch_mode: bool, interval: float,
    keep: int, with_base: bool, exec_cmd: str | None,
) -> None:  # fmt: skip
    """Pull the latest adapter of MODEL into DEST (verified, swapped atomically); print its version."""
    base_url = url.rstrip("/")
    dest = dest.expanduser().resolve()

    def announce(result: PullResult) -> None:
        click.echo(f"{model} v{result.version} {'installed' if result.changed else 'unchanged'} "
                   f"at {dest / CURRENT_LINK}")  # fmt: skip
        if exec_cmd and result.changed and result.path is not None:
            env = dict(os.environ)
            env.update(
                LETHE_ADAPTER_NAME=f"{model}-v{result.version}",
                LETHE_ADAPTER_PATH=str(result.path),
                LETHE_ADAPTER_VERSION=str(result.version),
            )
            subprocess.run(exec_cmd, shell=True, env=env, check=False)

    result: PullResult | None = None
    try:
        check_dest(dest, model)  # before --with-base writes anything
        with make_client(api_key, base_url=base_url) as client:
            if with_base:
                pull_base(client, base_url, model, dest / "base")
            if not watch_mode:
                result = pull_once(client, base_url, model, dest, keep=keep)
    except (PullError, httpx.HTTPError) as exc:
        raise click.ClickException(describe(exc, base_url)) from exc
    if result is not None:
        announce(result)
        return
    watch(base_url, model, dest, api_key=api_key, interval=interval, keep=keep, on_change=announce)
