"""Logging: one JSON object per line (``LETHE_LOG_FORMAT=json``) or readable text, with the ids
known where a line is written (HTTP request id, round id, model, Celery task id) taken from
context variables, so that a function deep in a round need not pass them along.

Subject ids (client ids, sample ids) are never bound and must never be logged: log request ids
and counts instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["json", "text"]

#: the fields a line may carry from its context (anything else is refused by :func:`bind`)
CONTEXT_FIELDS = (
    "request_id",
    "forget_request_id",
    "round_id",
    "model",
    "task_id",
    "task",
    "certification_id",
)

_context: ContextVar[dict[str, Any]] = ContextVar("lethe_log_context", default={})  # noqa: B039 (never mutated)


def bind(**fields: Any) -> Token[dict[str, Any]]:
    """Add ``fields`` to this context's log lines until :func:`unbind` with the returned token."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"not a log context field: {sorted(unknown)}")
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: Token[dict[str, Any]]) -> None:
    _context.reset(token)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def current() -> dict[str, Any]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (``record.lethe``) when it is created."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "lethe"):
            record.lethe = current()
        return True


# uvicorn's access log passes (client address, method, path with query, HTTP version, status)
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context ids, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = getattr(record, "lethe", None)
        if context is None:
            context = current()
        doc.update(context)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            doc.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The readable format, with the context ids appended (``[round_id=3 model=m1]``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = getattr(record, "lethe", None) or current()
        if not context:
            return line
        ids = " ".join(f"{k}={v}" for k, v in context.items())
        head, sep, tail = line.partition("\n")
        return f"{head} [{ids}]{sep}{tail}"


class _LetheHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure` installs (so that a second call replaces it). It writes to
    whatever ``sys.stderr`` is at the time of the line, never to a stream replaced since."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


def configure(fmt: LogFormat, level: str | int = "INFO") -> None:
    """Give the root logger one stderr handler in ``fmt`` (replacing the one a previous call
    added; other handlers, e.g. a test runner's, stay). uvicorn's and Celery's loggers propagate to
    it (uvicorn runs with ``log_config=None``; the worker stops Celery's own set-up)."""
    handler = _LetheHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LetheHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # a library's warnings become lines in the same format
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
