"""Which webhook URLs may be registered and reached.

Only ``http``/``https`` (production should register ``https`` only: the body is signed, not
encrypted). Against SSRF, hosts that are, or resolve to, non-public addresses (loopback, private,
link-local, CGNAT, reserved, multicast) are refused unless ``LETHE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES``:
at registration for literal addresses and ``localhost`` (no DNS on the request path), and at every
delivery for every address the name resolves to. Redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from service.errors import UnprocessableError

SCHEMES = ("http", "https")


class AddressRefused(Exception):  # noqa: N818 (a refusal, not a bug)
    """The URL's host resolves to an address webhooks may not reach."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _literal(host: str) -> str | None:
    """The address ``host`` is written as, if it is one: also the numeric IPv4 forms that the
    resolver reads as addresses (``2130706433``, ``0x7f000001``, ``127.1``, ``017700000001`` are
    all 127.0.0.1: ``inet_aton``'s forms, which ``getaddrinfo`` accepts too)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except (OSError, ValueError):  # a name (resolved at delivery)
        return None


def check_url(url: str, *, allow_private: bool) -> str:
    """``url`` if it may be registered; otherwise 422 naming the field ``url``."""

    def refuse(why: str) -> UnprocessableError:
        return UnprocessableError(f"webhook url refused: {why}", field="url")

    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise refuse("it must be printable ASCII without spaces (encode it)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if parts.scheme.lower() not in SCHEMES:
        raise refuse("only http and https URLs are accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise refuse("it has no host")
    if parts.username is not None or parts.password is not None:
        raise refuse("credentials in the URL are not accepted")
    if parts.fragment:
        raise refuse("a fragment is not sent; remove it")
    if port == 0:
        raise refuse("port 0")
    if not allow_private:
        literal = _literal(host)
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            raise refuse("loopback hosts are not allowed")
        if literal is not None and not is_public(literal):
            named = literal if literal == host else f"{host} is the address {literal}, which"
            raise refuse(f"{named} is not a public address")
    return url


def check_resolved(url: str) -> None:
    """Before a delivery: every address the host resolves to must be public (``AddressRefused``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AddressRefused(f"cannot resolve {host}: {exc}") from None
    for info in infos:
        address = str(info[4][0])
        if not is_public(address):
            raise AddressRefused(f"{host} resolves to {address}, which is not a public address")
