"""Workload options: the keyword arguments a registered model's workload is built with.

Checked here without importing the workload (the API never imports torch): a JSON object whose keys
are Python identifiers (they become keyword arguments), plain JSON values, at most
:data:`MAX_OPTIONS_BYTES` encoded. Whether the workload's constructor accepts them is checked by the
worker when it prepares the model (a rejected option marks the model ``failed`` with the error).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

#: Options carry a few sizes, a seed, a data path: not data.
MAX_OPTIONS_BYTES = 16 * 1024


def check(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as a plain dict, or ``ValueError`` saying what is wrong."""
    for key in options:
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"option name {key!r} is not a keyword argument name (letters, digits, _)")
    try:
        encoded = json.dumps(dict(options), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        raise ValueError("options must be plain JSON: no NaN or Infinity, no lone surrogates") from None
    if len(encoded) > MAX_OPTIONS_BYTES:
        raise ValueError(f"options take {len(encoded)} bytes as JSON; at most {MAX_OPTIONS_BYTES}")
    return dict(options)


def parse_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--workload-option``) as options: VALUE is parsed as JSON
    (``n=3``, ``sizes=[1,2]``, ``flag=true``, ``name="a"``); a VALUE that is not JSON is taken as a
    string (``path=/data/x``). A key given twice: the last wins."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"workload option {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return check(out)
