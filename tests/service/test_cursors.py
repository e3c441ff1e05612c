"""``service.api.cursors``: the one page-cursor format of every paginated list (the admin lists and
``/v1/forget-requests`` each had their own encoder and decoder, two formats)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from service.api import cursors
from service.errors import BadRequestError

KINDS = ("seq", "due", "subject", "sample")


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode("ascii").rstrip("=")


def _rejected(cursor: str, kind: str, fields: int = 1) -> bool:
    try:
        cursors.decode(cursor, kind, fields=fields)
    except BadRequestError as exc:
        return exc.status == 400 and exc.field == "cursor"
    return False


def test_fields_round_trip_whole() -> None:
    """A sample id may hold ``|``, ``:`` and non-ASCII text: the last field is taken whole."""
    assert cursors.decode(cursors.encode("sample", "a|b:c é"), "sample") == ["a|b:c é"]
    due = datetime(2026, 12, 2, 4, 5, 6, 7, tzinfo=UTC)
    first, second = cursors.decode(cursors.encode("due", due.isoformat(), 42), "due", fields=2)
    assert (cursors.moment(first), cursors.number(second)) == (due, 42)
    assert cursors.decode_number(cursors.encode("seq", cursors.MAX_SEQ), "seq") == cursors.MAX_SEQ


@pytest.mark.parametrize("kind", KINDS)
def test_a_cursor_of_another_list_is_a_400_on_the_cursor(kind: str) -> None:
    """A cursor names its list: every other list answers it with 400 ``field: "cursor"``."""
    cursor = cursors.encode(kind, "1", "2") if kind == "due" else cursors.encode(kind, "1")
    for other in KINDS:
        if other != kind:
            assert _rejected(cursor, other, fields=2 if other == "due" else 1)


@pytest.mark.parametrize(
    "cursor",
    ["!!", "=" * 10, "%ff", _raw("seq"), _raw("seq:"), _raw(":1"), _raw("seq\x00:1")],
)
def test_garbage_is_a_400_on_the_cursor(cursor: str) -> None:
    assert _rejected(cursor, "seq")


def test_bad_fields_are_a_400_on_the_cursor() -> None:
    """Fields that cannot be what the list needs are rejected before any query."""
    assert _rejected(_raw("due:2026-12-02T04:05:06+00:00"), "due", fields=2)  # one field of two
    assert _rejected(_raw("due:|7"), "due", fields=2)  # an empty field
    for bad in ("x", "-1", "٣", str(cursors.MAX_SEQ + 1)):
        with pytest.raises(BadRequestError):
            cursors.number(bad)
    for bad in ("yesterday", "2026-12-02T04:05:06"):  # not a moment; no timezone
        with pytest.raises(BadRequestError):
            cursors.moment(bad)
    with pytest.raises(BadRequestError):
        cursors.decode(base64.urlsafe_b64encode(b"seq:\xff").decode(), "seq")  # not UTF-8
