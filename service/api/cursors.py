"""Page cursors: one opaque format for every paginated list.

A cursor is ``base64url("<kind>:<field>|<field>…")`` without padding. ``kind`` names the list it
belongs to (``seq``: forget requests, ``due``: the deadline queue, ``subject``: a model's clients,
``sample``: a client's samples), so that a cursor of another list, an altered one or garbage is a
400 ``field: "cursor"``, never a 500 or a silently wrong page.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from service.errors import BadRequestError

#: the largest id or sequence number a 32-bit column holds (larger names none: 400, no query)
MAX_SEQ = 2**31 - 1


def invalid() -> BadRequestError:
    return BadRequestError("invalid cursor", field="cursor")


def encode(kind: str, *fields: str | int) -> str:
    text = f"{kind}:" + "|".join(str(f) for f in fields)
    return base64.urlsafe_b64encode(text.encode()).decode("ascii").rstrip("=")


def decode(cursor: str, kind: str, *, fields: int = 1) -> list[str]:
    """The ``fields`` non-empty fields of a cursor of this ``kind`` (the last may hold ``|``, so a
    single field is taken whole); 400 for anything else."""
    try:
        value = base64.urlsafe_b64decode(cursor.encode("ascii") + b"==").decode("utf-8")
    except (ValueError, UnicodeError, binascii.Error):
        raise invalid() from None
    prefix, sep, rest = value.partition(":")
    parts = rest.split("|", fields - 1)
    if prefix != kind or not sep or len(parts) != fields or not all(parts):
        raise invalid()
    return parts


def number(field: str) -> int:
    """A field that holds a sequence number or id (0 … MAX_SEQ); 400 otherwise."""
    if not field.isascii() or not field.isdigit() or int(field) > MAX_SEQ:
        raise invalid()
    return int(field)


def decode_number(cursor: str, kind: str) -> int:
    """The one number a cursor of this ``kind`` holds; 400 for anything else."""
    return number(decode(cursor, kind)[0])


def moment(field: str) -> datetime:
    """A field that holds a timezone-aware ISO 8601 moment; 400 otherwise."""
    try:
        value = datetime.fromisoformat(field)
    except ValueError:
        raise invalid() from None
    if value.tzinfo is None:
        raise invalid()
    return value
