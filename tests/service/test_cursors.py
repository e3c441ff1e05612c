"""``service.api.cursors``: the one page-cursor format of every paginated list (the admin lists and
``/v1/forget-requests`` each had their own encoder and decoder, two formats), signed with the list's
identity: a cursor of another list, of other path parameters or filters, or a forged one is a 400."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from service.api import cursors
from service.errors import BadRequestError

KINDS = ("seq", "due", "subject", "sample")
KEY = b"k" * 32


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode("ascii").rstrip("=")


def _listing(kind: str, *identity: cursors.Part, key: bytes = KEY) -> cursors.Listing:
    return cursors.Listing(kind, key, identity)


def _rejected(cursor: str, listing: cursors.Listing, fields: int = 1) -> bool:
    try:
        listing.decode(cursor, fields=fields)
    except BadRequestError as exc:
        return exc.status == 400 and exc.field == "cursor"
    return False


def test_fields_round_trip_whole() -> None:
    """A sample id may hold ``|``, ``:``, ``.`` and non-ASCII text: the last field is taken whole."""
    samples = _listing("sample", "digits", "c1", None)
    assert samples.decode(samples.encode("a|b:c. é")) == ["a|b:c. é"]
    due = datetime(2026, 12, 2, 4, 5, 6, 7, tzinfo=UTC)
    queue = _listing("due", False, None)
    first, second = queue.decode(queue.encode(due.isoformat(), 42), fields=2)
    assert (cursors.moment(first), cursors.number(second)) == (due, 42)
    seq = _listing("seq", None, None)
    assert seq.decode_number(seq.encode(cursors.MAX_SEQ)) == cursors.MAX_SEQ


@pytest.mark.parametrize("kind", KINDS)
def test_a_cursor_of_another_list_is_a_400_on_the_cursor(kind: str) -> None:
    """A cursor names its list: every other list answers it with 400 ``field: "cursor"``."""
    listing = _listing(kind)
    cursor = listing.encode("1", "2") if kind == "due" else listing.encode("1")
    assert not _rejected(cursor, listing, fields=2 if kind == "due" else 1)
    for other in KINDS:
        if other != kind:
            assert _rejected(cursor, _listing(other), fields=2 if other == "due" else 1)


def test_a_cursor_is_bound_to_the_path_parameters_and_filters() -> None:
    """Defect: a cursor of c3's samples paged c4's samples, and the same with ``?task=`` added."""
    c3 = _listing("sample", "digits", "c3", None)
    cursor = c3.encode("s00013")
    assert c3.decode(cursor) == ["s00013"]
    for other in (
        _listing("sample", "digits", "c4", None),  # another client
        _listing("sample", "digits", "c3", "digit"),  # a filter added
        _listing("sample", "other", "c3", None),  # another model
        _listing("sample", "digits", "c3", None, key=b"x" * 32),  # another server secret
        _listing("sample", "digits", None, "c3"),  # the same values in other places
    ):
        assert _rejected(cursor, other), other
    queue = _listing("due", True, None)
    assert _rejected(queue.encode("2026-12-02T04:05:06+00:00", 7), _listing("due", False, None), fields=2)


def test_forged_and_altered_cursors_are_a_400() -> None:
    """Defect: ``base64("sample:zzz")`` and ``base64("seq:3")`` were pages of their lists."""
    seq = _listing("seq", None, None)
    assert _rejected(_raw("seq:3"), seq)
    assert _rejected(_raw("sample:zzz"), _listing("sample", "digits", "c3", None))
    genuine = seq.encode(3)
    payload, tag = genuine.split(".")
    assert _rejected(f"{_raw('seq:4')}.{tag}", seq)  # another position under the same tag
    assert _rejected(f"{payload}.{tag[:-1]}", seq)  # a truncated tag
    assert _rejected(f"{payload}.{tag}=", seq)  # another spelling of the same cursor
    assert _rejected(f"{payload}.{tag[:-1]}é", seq)  # not ASCII (no TypeError: a 400)


@pytest.mark.parametrize(
    "cursor",
    ["!!", "=" * 10, "%ff", ".", "é", _raw("seq"), _raw("seq:"), _raw(":1"), _raw("seq\x00:1")],
)
def test_garbage_is_a_400_on_the_cursor(cursor: str) -> None:
    assert _rejected(cursor, _listing("seq"))


def test_bad_fields_are_a_400_on_the_cursor() -> None:
    """Fields that cannot be what the list needs are rejected before any query (also when signed)."""
    due = _listing("due")
    assert _rejected(due.encode("2026-12-02T04:05:06+00:00"), due, fields=2)  # one field of two
    assert _rejected(due.encode("", 7), due, fields=2)  # an empty field
    for bad in ("x", "-1", "٣", str(cursors.MAX_SEQ + 1)):
        with pytest.raises(BadRequestError):
            cursors.number(bad)
    for bad in ("yesterday", "2026-12-02T04:05:06"):  # not a moment; no timezone
        with pytest.raises(BadRequestError):
            cursors.moment(bad)
    with pytest.raises(BadRequestError):
        _listing("seq").decode(base64.urlsafe_b64encode(b"seq:\xff").decode() + ".AAAA")  # not UTF-8
