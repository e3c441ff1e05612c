"""Page cursors: one opaque, tamper-evident format for every paginated list.

A cursor is ``base64url("<kind>:<field>|<field>…") "." base64url(tag)`` without padding. ``kind``
names the list it belongs to (``seq``: forget requests, ``due``: the deadline queue, ``subject``: a
model's clients, ``sample``: a client's samples); ``tag`` is an HMAC-SHA256 (its first 16 bytes),
under a server secret, of the list's identity (its kind, path parameters and filters) and of the
position. So a cursor of another list, of the same list with other path parameters or filters
(another model, client, task or status), an altered or forged one, or garbage is a 400 ``field:
"cursor"``, never a 500 or a silently wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime

from service.errors import BadRequestError

#: the largest id or sequence number a 32-bit column holds (larger names none: 400, no query)
MAX_SEQ = 2**31 - 1
#: bytes of the HMAC kept in a cursor (128 bits: unforgeable, and the cursor stays short)
TAG_BYTES = 16

#: A path parameter or filter that tells one list from another (None: not given).
Part = str | int | bool | None


def invalid() -> BadRequestError:
    return BadRequestError(
        "invalid cursor: pass a `next_cursor` of this list, with the same filters", field="cursor"
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class Listing:
    """One paginated list: its ``kind`` and ``identity`` (path parameters and filters, in a fixed
    order), and the server secret its cursors are signed with."""

    kind: str
    key: bytes
    identity: tuple[Part, ...] = ()

    def _tag(self, text: str) -> str:
        signed = json.dumps([self.kind, list(self.identity), text], ensure_ascii=False, separators=(",", ":"))
        return _b64(hmac.new(self.key, signed.encode("utf-8"), hashlib.sha256).digest()[:TAG_BYTES])

    def encode(self, *fields: str | int) -> str:
        text = f"{self.kind}:" + "|".join(str(f) for f in fields)
        return f"{_b64(text.encode('utf-8'))}.{self._tag(text)}"

    def decode(self, cursor: str, *, fields: int = 1) -> list[str]:
        """The ``fields`` non-empty fields of a cursor this list gave (the last may hold ``|``, so a
        single field is taken whole); 400 for anything else."""
        if not cursor.isascii():
            raise invalid()
        payload, _, _ = cursor.partition(".")
        try:
            text = base64.urlsafe_b64decode(payload.encode("ascii") + b"==").decode("utf-8")
        except (ValueError, UnicodeError, binascii.Error):
            raise invalid() from None
        # the exact cursor this list gives for that position: another list's, or an altered one, is not
        if not hmac.compare_digest(f"{_b64(text.encode('utf-8'))}.{self._tag(text)}", cursor):
            raise invalid()
        prefix, sep, rest = text.partition(":")
        parts = rest.split("|", fields - 1)
        if prefix != self.kind or not sep or len(parts) != fields or not all(parts):
            raise invalid()
        return parts

    def decode_number(self, cursor: str) -> int:
        """The one number a cursor of this list holds; 400 for anything else."""
        return number(self.decode(cursor)[0])


def number(field: str) -> int:
    """A field that holds a sequence number or id (0 … MAX_SEQ); 400 otherwise."""
    if not field.isascii() or not field.isdigit() or int(field) > MAX_SEQ:
        raise invalid()
    return int(field)


def moment(field: str) -> datetime:
    """A field that holds a timezone-aware ISO 8601 moment; 400 otherwise."""
    try:
        value = datetime.fromisoformat(field)
    except ValueError:
        raise invalid() from None
    if value.tzinfo is None:
        raise invalid()
    return value
