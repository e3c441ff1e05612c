"""The unlearning methods and the JSON Schemas of their settings, without torch.

``methods.json`` (package data) is generated from the worker's method configs
(``python -m worker.unlearning.methods.schemas > service/methods.json``); a test proves it equals
what the worker's registry declares. A model's ``method``, ``method_config`` (the method's own
settings block) and ``settings`` are validated against it, so that nonsense answers 422 when the
model is registered or reconfigured instead of failing its requests later.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from service.errors import UnprocessableError

DEFAULT_METHOD = "default"


@functools.cache
def catalogue() -> dict[str, Any]:
    """``{"methods": {name: method_config schema}, "settings": settings schema}``."""
    data: dict[str, Any] = json.loads(files("service").joinpath("methods.json").read_text("utf-8"))
    return data


def method_names() -> list[str]:
    return sorted(catalogue()["methods"])


def _where(error: ValidationError, field: str) -> str:
    """The offending input as ``field.key.key``: the unexpected or misnamed key itself, not the
    object around it."""
    path = [field, *(str(part) for part in error.absolute_path)]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        path.append(sorted(set(error.instance) - set(schema.get("properties", {})))[0])
    elif "propertyNames" in error.relative_schema_path:
        path.append(str(error.instance))
    return ".".join(path)


def _check(schema: dict[str, Any], value: dict[str, Any], field: str) -> None:
    error = best_match(Draft202012Validator(schema).iter_errors(value))
    if error is not None:
        where = _where(error, field)
        raise UnprocessableError(f"{where}: {error.message}", field=where)


def validate(method: str, method_config: dict[str, Any], settings: dict[str, Any]) -> None:
    """422 naming the field (``method``, ``method_config.<key>…``, ``settings.<key>…``) unless the
    method exists and both objects match its schemas."""
    schemas = catalogue()["methods"]
    if method not in schemas:
        raise UnprocessableError(
            f"unknown method {method!r}; available: {', '.join(method_names())}", field="method"
        )
    _check(schemas[method], method_config, "method_config")
    _check(catalogue()["settings"], settings, "settings")
