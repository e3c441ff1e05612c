"""``/v1/models/{model}``: what serving hosts pull: the latest adapter, its files, the base model."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy.orm import Session

from service import storage
from service.api import schemas
from service.api.auth import Principal, require
from service.api.problems import problem_responses
from service.api.state import AppState, State
from service.artifacts import check_name, etag_matches, etag_of, resolve_file, sha256_header
from service.db.models import AdapterVersion, Model
from service.errors import GoneError, NotFoundError
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo

router = APIRouter(prefix="/v1/models", tags=["serving"], responses=problem_responses(401, 403, 404, 503))
Server = Annotated[Principal, Depends(require("serve"))]
IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match")]
VERSION = re.compile(r"[1-9][0-9]{0,8}")


def _model(session: Session, name: str) -> Model:
    model = models_repo.get_model(session, name)
    if model is None:
        raise NotFoundError(f"model {name!r} is not registered")
    return model


def _with_base(session: Session, name: str) -> tuple[Model, str]:
    """The model and its base model's directory (404 until a worker prepared it)."""
    model = _model(session, name)
    if model.base_location is None:
        raise NotFoundError(f"model {name!r} has no base model yet ({model.status})")
    return model, model.base_location


def _version(session: Session, model: Model, version: str) -> AdapterVersion:
    row = versions_repo.get_version(session, model.id, int(version)) if VERSION.fullmatch(version) else None
    if row is None:
        raise NotFoundError(f"model {model.name!r} has no adapter version {version!r}")
    if row.status == "withdrawn":
        raise GoneError(
            f"adapter version {row.version} of {model.name!r} was withdrawn",
            withdrawn_at=row.withdrawn_at.isoformat() if row.withdrawn_at else None,
        )
    return row


def _files(files: dict[str, Any], url_for: Any) -> list[schemas.FileOut]:
    return [
        schemas.FileOut(name=name, sha256=str(d["sha256"]), size=int(d["size"]), url=str(url_for(name)))
        for name, d in sorted(files.items())
    ]


def _url_of(request: Request, route: str, **params: str) -> str:
    """A file's URL: ``LETHE_PUBLIC_URL`` + its path, or the path alone. Never from the request's
    Host or forwarded headers, which a client or a proxy can set (and so direct the serve key)."""
    path = str(request.app.url_path_for(route, **params))
    public: str | None = request.app.state.lethe.settings.public_url
    return public.rstrip("/") + path if public else path


def _adapter(request: Request, model: Model, row: AdapterVersion) -> schemas.AdapterOut:
    def url(name: str) -> Any:
        return _url_of(
            request, "download_adapter_file", model=model.name, version=str(row.version), name=name
        )

    return schemas.AdapterOut(
        model=model.name,
        version=row.version,
        parent=row.parent_version,
        status="active",
        created_at=row.created_at,
        files=_files(row.files, url),
    )


def _metadata_response(
    payload: schemas.AdapterOut | schemas.BaseModelOut, etag: str, if_none_match: str | None
) -> Response:
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(payload.model_dump_json(), media_type="application/json", headers=headers)


def _adapter_response(
    request: Request, model: Model, row: AdapterVersion, if_none_match: str | None
) -> Response:
    etag = etag_of(model.name, row.version, row.files)
    return _metadata_response(_adapter(request, model, row), etag, if_none_match)


def _file_response(
    state: AppState, location: str, name: str, files: dict[str, Any], if_none_match: str | None, *, head: bool
) -> Response:
    """One recorded file: from the artifacts directory (local store), or streamed from the object
    store through the API (s3 store; the serve key, the sha256 headers and the 410 of a withdrawn
    version stay in force, and serving hosts need no credentials for, or route to, the bucket)."""
    sha256 = str(files.get(name, {}).get("sha256", ""))
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Repr-Digest": "", "X-Checksum-SHA256": sha256}
    store = state.store()
    if store.kind == "local":
        path = resolve_file(state.settings.resolved_artifacts_dir, location, name, files)
        headers["Repr-Digest"] = sha256_header(sha256)
        if etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="application/octet-stream", headers=headers)
    check_name(name, files)
    headers["Repr-Digest"] = sha256_header(sha256)
    key = storage.join(location, name)
    try:
        size = store.size(key)
        if etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        headers["Content-Length"] = str(size)
        if head:
            return Response(status_code=200, media_type="application/octet-stream", headers=headers)
        chunks = store.stream(key)
    except storage.NotInStoreError as exc:
        raise NotFoundError(f"file {name!r} is not available") from exc
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the `If-None-Match` ETag is current"}
}
A_FILE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The file"},
    **NOT_MODIFIED,
}


@router.get(
    "/{model}/adapters/latest",
    summary="The latest active adapter version (ETag; 304 on If-None-Match)",
    response_model=schemas.AdapterOut,
    responses=NOT_MODIFIED,
)
def latest_adapter(
    model: str, request: Request, state: State, _: Server, if_none_match: IfNoneMatch = None
) -> Response:
    if if_none_match:
        # the cheap path: one small query, then the cached ETag of that version (etag_cache.py)
        with state.reads() as session:
            latest = versions_repo.latest_active_id(session, model)
        if latest is not None and latest[1] is not None:
            etag = state.latest_etags.get(model, latest[1])
            if etag is not None and etag_matches(if_none_match, etag):
                return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
    with state.transaction() as session:
        found = _model(session, model)
        row = versions_repo.latest_active(session, found.id)
        if row is None:
            raise NotFoundError(f"model {model!r} has no adapter version yet ({found.status})")
        response = _adapter_response(request, found, row, if_none_match)
        state.latest_etags.put(model, row.id, response.headers["ETag"])
        return response


@router.get(
    "/{model}/adapters/{version}",
    summary="One adapter version (410 when withdrawn)",
    response_model=schemas.AdapterOut,
    responses={**NOT_MODIFIED, **problem_responses(410)},
)
def adapter_version(
    model: str, version: str, request: Request, state: State, _: Server, if_none_match: IfNoneMatch = None
) -> Response:
    with state.transaction() as session:
        found = _model(session, model)
        return _adapter_response(request, found, _version(session, found, version), if_none_match)


@router.get(
    "/{model}/adapters/{version}/files/{name}",
    summary="Download one file of an adapter version (with its SHA-256)",
    response_class=FileResponse,
    responses={**A_FILE, **problem_responses(410)},
)
def download_adapter_file(
    model: str, version: str, name: str, state: State, _: Server, if_none_match: IfNoneMatch = None
) -> Response:
    return _adapter_file(model, version, name, state, if_none_match, head=False)


def _adapter_file(
    model: str, version: str, name: str, state: AppState, if_none_match: str | None, *, head: bool
) -> Response:
    with state.transaction() as session:
        row = _version(session, _model(session, model), version)
    return _file_response(state, row.location, name, row.files, if_none_match, head=head)


@router.head(
    "/{model}/adapters/{version}/files/{name}",
    summary="The headers of one file of an adapter version (as GET, without the body)",
    response_class=FileResponse,
    responses={**A_FILE, **problem_responses(410)},
)
def head_adapter_file(
    model: str, version: str, name: str, state: State, principal: Server, if_none_match: IfNoneMatch = None
) -> Response:
    return _adapter_file(model, version, name, state, if_none_match, head=True)


@router.get(
    "/{model}/base",
    summary="The frozen base model's files (ETag; 304 on If-None-Match)",
    response_model=schemas.BaseModelOut,
    responses=NOT_MODIFIED,
)
def base_model(
    model: str, request: Request, state: State, _: Server, if_none_match: IfNoneMatch = None
) -> Response:
    with state.transaction() as session:
        found, _location = _with_base(session, model)

    def url(name: str) -> Any:
        return _url_of(request, "download_base_file", model=found.name, name=name)

    payload = schemas.BaseModelOut(model=found.name, files=_files(found.base_files, url))
    return _metadata_response(payload, etag_of(found.name, "base", found.base_files), if_none_match)


@router.get(
    "/{model}/base/files/{name:path}",
    summary="Download one file of the base model (with its SHA-256)",
    response_class=FileResponse,
    responses=A_FILE,
)
def download_base_file(
    model: str, name: str, state: State, _: Server, if_none_match: IfNoneMatch = None
) -> Response:
    return _base_file(model, name, state, if_none_match, head=False)


def _base_file(model: str, name: str, state: AppState, if_none_match: str | None, *, head: bool) -> Response:
    with state.transaction() as session:
        found, location = _with_base(session, model)
    return _file_response(state, location, name, found.base_files, if_none_match, head=head)


@router.head(
    "/{model}/base/files/{name:path}",
    summary="The headers of one file of the base model (as GET, without the body)",
    response_class=FileResponse,
    responses=A_FILE,
)
def head_base_file(
    model: str, name: str, state: State, principal: Server, if_none_match: IfNoneMatch = None
) -> Response:
    return _base_file(model, name, state, if_none_match, head=True)
