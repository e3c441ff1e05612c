"""``lethe requests follow``: poll a forget request through the API and draw its round's progress.

A plain-text bar (no terminal library): on a terminal one line redrawn in place, otherwise one line
per change (logs, CI). The bar spans the round's stages (``ROUND_STAGES``); within a stage that
counts steps (request k of n, epoch k of n) it advances by the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from service.db.models import ROUND_STAGES

#: Statuses after which a request changes no more.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "rejected"})
BAR_WIDTH = 30


class FollowError(Exception):
    """The request could not be read (unknown id, bad key, API unreachable)."""


def fraction(progress: Mapping[str, Any]) -> float:
    """How far through the round a progress object is, in [0, 1]."""
    stage = str(progress["stage"])
    index = ROUND_STAGES.index(stage) if stage in ROUND_STAGES else 0
    step, of = int(progress.get("step") or 0), int(progress.get("of") or 0)
    within = min(step, of) / of if of > 0 else 0.0
    return min(1.0, (index + within) / len(ROUND_STAGES))


def bar(body: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """The progress bar of a request body and the stage it shows (empty for a final request
    without progress)."""
    status = str(body.get("status", "?"))
    if status == "completed":
        return f"[{'#' * width}] v{body.get('version')}"
    progress = body.get("progress")
    if not progress:
        return "" if status in FINAL_STATUSES else f"[{'.' * width}] waiting"
    filled = int(fraction(progress) * width)
    steps = f" {progress['step']}/{progress['of']}" if progress.get("of") else ""
    where = "stopped at " if status in FINAL_STATUSES else ""
    return f"[{'#' * filled}{'.' * (width - filled)}] {where}{progress['stage']}{steps}"


def render(body: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """One line: the request's id, status and progress bar."""
    head = f"{str(body.get('id', ''))[:8]} {body.get('status', '?')!s:<9}"
    return f"{head} {bar(body, width)}".rstrip()


def follow(
    client: httpx.Client,
    request_id: str,
    *,
    echo: Callable[[str], None],
    interval: float = 1.0,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll ``GET /v1/forget-requests/{id}`` until the request is final; ``echo`` each new line.
    Returns the last body; raises :class:`FollowError` on an error answer or after ``timeout``."""
    started = clock()
    shown: str | None = None
    while True:
        try:
            resp = client.get(f"/v1/forget-requests/{request_id}")
        except httpx.HTTPError as exc:
            raise FollowError(f"the API at {str(client.base_url).rstrip('/')} is unreachable: {exc}") from exc
        if resp.status_code != 200:
            detail = (
                resp.json().get("detail") if resp.headers.get("content-type", "").endswith("json") else None
            )
            raise FollowError(
                f"GET /v1/forget-requests/{request_id}: {resp.status_code} {detail or resp.text}"
            )
        body: dict[str, Any] = resp.json()
        line = render(body)
        if line != shown:
            echo(line)
            shown = line
        if body.get("status") in FINAL_STATUSES:
            return body
        if timeout is not None and clock() - started > timeout:
            raise FollowError(f"request {request_id} is still {body.get('status')} after {timeout:.0f} s")
        sleep(interval)
