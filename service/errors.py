"""Domain errors; the API turns each into an ``application/problem+json`` response."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error the caller can act on: an HTTP status, a short title and a detail."""

    status: int = 400
    title: str = "Bad request"
    slug: str = "bad-request"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra


class BadRequestError(ServiceError):
    status, title, slug = 400, "Bad request", "bad-request"


class NotFoundError(ServiceError):
    status, title, slug = 404, "Not found", "not-found"


class ConflictError(ServiceError):
    status, title, slug = 409, "Conflict", "conflict"


class UnprocessableError(ServiceError):
    status, title, slug = 422, "Unprocessable content", "unprocessable"


class GoneError(ServiceError):
    status, title, slug = 410, "Gone", "gone"
