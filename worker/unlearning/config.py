"""Typed settings blocks: a frozen dataclass filled from one key of the per-model settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def typed_kwargs(cls: type, settings: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``settings`` as keyword arguments of the dataclass ``cls``, each value cast to its field's
    type (``bool``, ``int``, ``float``, else ``str``); an unknown key is a ``ValueError`` naming
    ``what`` (e.g. ``"SSD"``)."""
    known = {f.name: f.type for f in fields(cls)}
    casts = {"bool": bool, "int": int, "float": float}
    kwargs: dict[str, Any] = {}
    for key, value in dict(settings or {}).items():
        if key not in known:
            raise ValueError(f"unknown {what} setting {key!r}")
        kwargs[key] = casts.get(str(known[key]), str)(value)
    return kwargs
