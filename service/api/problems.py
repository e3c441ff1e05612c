"""RFC 9457 problem details for every error: domain, HTTP, routing, validation, and the unexpected."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.api.auth import authenticate_request
from service.api.schemas import FORGET_REQUEST_KINDS
from service.errors import ServiceError
from service.storage import StoreError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://lethe.dev/problems/"


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem; more extension members (ids such as ``forgotten_by``) may follow."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URI naming the problem type; `about:blank`: see the status.")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    field: str | None = Field(default=None, description="The input the problem is about.")
    errors: list[FieldError] | None = Field(default=None, description="Every validation error.")


def problem_response(
    status: int,
    *,
    detail: str | None = None,
    title: str | None = None,
    type_: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = problem_body(status, detail=detail, title=title, type_=type_, instance=instance, **extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_body(
    status: int,
    *,
    detail: str | None = None,
    title: str | None = None,
    type_: str | None = None,
    instance: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A problem object (also one item's result in a bulk answer)."""
    body: dict[str, Any] = {
        "type": type_ or "about:blank",
        "title": title or _phrase(status),
        "status": status,
    }
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def service_problem(exc: ServiceError, instance: str | None) -> dict[str, Any]:
    """The problem object of a domain error."""
    return problem_body(
        exc.status,
        title=exc.title,
        detail=exc.detail,
        type_=TYPE_BASE + exc.slug,
        instance=instance,
        field=exc.field,
        **exc.extra,
    )


def validation_problem(raw: Sequence[Any], instance: str | None, *, prefix: str = "") -> dict[str, Any]:
    """The 422 problem object of pydantic errors (``prefix``: the location they are under)."""
    errors = [
        {
            "field": prefix + _field_name({**e, "loc": ("body", *e.get("loc", ()))}),
            "message": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in raw
    ]
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    return problem_body(
        422,
        title="Unprocessable content",
        detail=f"{first['field'] or 'request'}: {first['message']}",
        type_=TYPE_BASE + "validation",
        instance=instance,
        field=first["field"] or None,
        errors=errors,
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for error statuses (their body: see :func:`document_problems`)."""
    return {status: {"description": _phrase(status)} for status in statuses}


#: Parameter schemas every value satisfies (a path segment, an optional plain header).
_UNCONSTRAINED = ({"type": "string"}, {"anyOf": [{"type": "string"}, {"type": "null"}]})


def _can_fail_validation(operation: dict[str, Any]) -> bool:
    """Whether FastAPI may answer 422: a body, or a parameter that is constrained or required
    (path parameters are always present)."""
    if "requestBody" in operation:
        return True
    for parameter in operation.get("parameters", []):
        constraints = {k: v for k, v in parameter["schema"].items() if k not in ("title", "description")}
        required = parameter.get("required", False) and parameter["in"] != "path"
        if required or constraints not in _UNCONSTRAINED:
            return True
    return False


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make every 4xx/5xx response of an OpenAPI document an ``application/problem+json`` Problem,
    and drop the 422 FastAPI lists for operations whose inputs always validate."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    ref = {"$ref": "#/components/schemas/Problem"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if not _can_fail_validation(operation):
                responses.pop("422", None)
            if "requestBody" in operation:
                responses.setdefault("400", {"description": "The body is not JSON"})
                responses.setdefault("413", {"description": "The body is larger than the server accepts"})
                responses.setdefault("415", {"description": "The body is not sent as `application/json`"})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {PROBLEM_JSON: {"schema": ref}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return schema


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse(
        service_problem(exc, request.url.path), status_code=exc.status, media_type=PROBLEM_JSON
    )


#: FastAPI's 400 for a body it could not decode (invalid UTF-8, nesting too deep for the parser).
_BODY_PARSE_ERROR = "There was an error parsing the body"


#: The methods a 405's ``Allow`` may list.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method some route answers at this path (Starlette's 405 lists one route's only)."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        return await _bad_json(request)
    detail: str | None = exc.detail if isinstance(exc.detail, str) else None
    if detail == _phrase(exc.status_code):
        detail = None
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return problem_response(
        exc.status_code,
        detail=detail,
        instance=request.url.path,
        headers=headers or None,
    )


async def _bad_json(request: Request) -> JSONResponse:
    """400 for a body that is not JSON, after the caller was authenticated: FastAPI decodes the
    body before it runs the route's dependencies, and an anonymous caller must learn nothing more
    than 401 (or 403 without the scope)."""
    try:
        await authenticate_request(request)
    except StarletteHTTPException as exc:
        return await _http_error(request, exc)
    except DBAPIError as exc:  # an exception handler's own errors reach no other handler
        return await _database_error(request, exc)
    return problem_response(
        400, detail="the body is not valid JSON", instance=request.url.path, type_=TYPE_BASE + "bad-json"
    )


#: What a route with a JSON body answers a body of another media type with (RFC 9110 15.5.16).
_ACCEPT_HEADER = {"POST": "Accept-Post", "PATCH": "Accept-Patch", "PUT": "Accept-Put"}


def _unsupported_media_type(request: Request) -> JSONResponse:
    """415 for a body the route did not read as JSON: FastAPI reads a body as JSON only when its
    ``Content-Type`` is ``application/json`` (or ``…+json``), so anything else reached validation as
    bytes. Authentication already ran (the route's dependencies come before its body)."""
    given = request.headers.get("content-type")
    header = _ACCEPT_HEADER.get(request.method)
    return problem_response(
        415,
        detail="the body must be JSON sent with Content-Type: application/json "
        + (f"(got {given!r})" if given else "(no Content-Type was sent)"),
        instance=request.url.path,
        type_=TYPE_BASE + "unsupported-media-type",
        field="Content-Type",
        headers={header: "application/json"} if header else None,
    )


#: The message of a request without a body where the route needs one.
_BODY_MISSING = "the body is missing: send a JSON object with Content-Type: application/json"


def _body_missing(error: Any) -> bool:
    return tuple(error.get("loc", ())) == ("body",) and error.get("type") == "missing"


#: Errors of a discriminated union's tag: the input they are about is the tag, ``kind``.
_TAG_ERRORS = ("union_tag_invalid", "union_tag_not_found")


def _field_name(error: Any) -> str:
    if error.get("type") in _TAG_ERRORS:
        return "kind"
    parts = [str(p) for p in error.get("loc", ())]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        if parts[0] == "body" and len(parts) > 2 and parts[1] in FORGET_REQUEST_KINDS:
            parts = parts[1:]  # the union member's tag (the forget request's kind), not a field
        parts = parts[1:]
    return ".".join(parts)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": _field_name(e),
            "message": _BODY_MISSING if _body_missing(e) else str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        return await _bad_json(request)
    if isinstance(exc.body, bytes | bytearray) and exc.body:
        return _unsupported_media_type(request)
    key_errors = [e for e in raw if tuple(e.get("loc", ()))[:2] == ("header", "Idempotency-Key")]
    if key_errors:
        missing = any(e.get("type") == "missing" for e in key_errors)
        return problem_response(
            400,
            detail="the Idempotency-Key header is required"
            if missing
            else "the Idempotency-Key header must be 1 to 200 printable ASCII characters",
            instance=request.url.path,
            type_=TYPE_BASE + "idempotency-key-required",
            field="Idempotency-Key",
        )
    # no body at all is the problem to name (not "request: Field required")
    absent = next((i for i, e in enumerate(raw) if _body_missing(e)), None)
    first = errors[absent or 0] if errors else {"field": "", "message": "invalid request"}
    return problem_response(
        422,
        title="Unprocessable content",
        detail=_BODY_MISSING if absent is not None else f"{first['field'] or 'request'}: {first['message']}",
        type_=TYPE_BASE + "validation",
        instance=request.url.path,
        field=first["field"] or None,
        errors=errors,
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, DataError):
        return problem_response(
            422, detail="a value was not accepted by the database", instance=request.url.path
        )
    if isinstance(exc, IntegrityError):
        # A race the code did not turn into a domain answer; nothing was written.
        log.warning("integrity error on %s %s", request.method, request.url.path, exc_info=True)
        return problem_response(
            409, detail="the request conflicts with a concurrent change; try again", instance=request.url.path
        )
    log.warning("database error on %s %s", request.method, request.url.path, exc_info=True)
    return _unavailable(request, "the database is unavailable; try again")


async def _pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    """Every pooled connection is busy (SQLAlchemy's pool ``TimeoutError``): overloaded, not broken."""
    log.warning("database pool exhausted on %s %s: %s", request.method, request.url.path, exc)
    return _unavailable(request, "the service is overloaded (no database connection free); try again")


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    """The artifact store (S3-compatible service) is unreachable or refused: not the caller's fault."""
    log.warning("artifact store error on %s %s: %s", request.method, request.url.path, exc)
    return _unavailable(request, "the artifact store is unavailable; try again")


def _unavailable(request: Request, detail: str) -> JSONResponse:
    """503 with ``Retry-After``: a dependency is down or saturated, not the caller's fault."""
    return problem_response(503, detail=detail, instance=request.url.path, headers={"Retry-After": "5"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, detail="internal error", instance=request.url.path)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _pool_timeout)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(Exception, _unexpected)
