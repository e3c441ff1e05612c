"""Options shared by the commands that talk to a running API (``lethe pull``, ``lethe requests
follow``): where it is and which key to use, both also read from the environment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

DEFAULT_API_URL = "http://127.0.0.1:8000"

api_url_option = click.option(
    "--url",
    "url",
    envvar="LETHE_API_URL",
    show_envvar=True,
    default=DEFAULT_API_URL,
    show_default=True,
    help="The API's base URL.",
)


def api_key_option(scope: str, *, required: bool) -> Callable[[Any], Any]:
    """``--api-key`` (``LETHE_API_KEY``) of a command that needs a key with ``scope``."""
    return click.option(
        "--api-key",
        "api_key",
        envvar="LETHE_API_KEY",
        show_envvar=True,
        required=required,
        default=None,
        help=f"Key with the {scope} scope.",
    )
