"""JSON Schemas of a model's ``method_config`` and ``settings``, generated from the methods' configs.

Each registered method declares the pydantic class of its own settings block
(:func:`worker.unlearning.methods.register`, ``config=``); its schema is pydantic's
(``TypeAdapter(cls).json_schema()``), self-contained (no ``$ref``) and without titles. The API
validates a model's method and settings when it is registered or reconfigured, without importing
torch: it reads ``service/methods.json``, which this module writes::

    python -m worker.unlearning.methods.schemas > service/methods.json

``tests/worker/test_method_schemas.py`` proves the shipped file equals :func:`catalogue` and that
the configs refuse what the schemas refuse (choices, unknown keys).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from worker.unlearning.acceptance import AcceptanceConfig
from worker.unlearning.audit import AuditConfig
from worker.unlearning.config import MAX_RANK
from worker.unlearning.methods import available_methods, get_spec
from worker.unlearning.training import TrainConfig
from worker.unlearning.workload import PretrainConfig

#: ``settings["lora"]``: read by :meth:`TrainConfig.from_settings` (``rank``, ``lora_alpha``);
#: an adapter of rank or alpha 0 does nothing (``train``'s 0 means the workload's LoraConfig)
LORA = {
    "rank": {"type": "integer", "minimum": 1, "maximum": MAX_RANK},
    "alpha": {"type": "integer", "minimum": 1, "maximum": 64 * MAX_RANK},
}


class _Untitled(GenerateJsonSchema):
    """pydantic's schema without the ``title`` of every field and class (noise for the API)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _object(properties: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every ``{"$ref": "#/$defs/X"}`` replaced by ``X`` (a block's schema is embedded
    in the settings schema, where a local ``$ref`` would resolve against the wrong root), and the
    classes' titles dropped."""
    if isinstance(node, dict):
        if "$ref" in node:
            definition = defs[node["$ref"].removeprefix("#/$defs/")]
            return _inline({k: v for k, v in definition.items() if k != "title"}, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _named_both_ways(schema: Any, by_name: Any) -> Any:
    """The object schemas of ``schema`` (by alias) with each aliased field's name listed too (the
    configs accept both, e.g. SSD's ``lambda`` and ``lam``)."""
    if isinstance(schema, dict):
        out = {k: _named_both_ways(v, by_name.get(k, {})) for k, v in schema.items()}
        if "properties" in schema and "properties" in by_name:
            out["properties"] = {**by_name["properties"], **out["properties"]}
        return out
    if isinstance(schema, list):
        return [_named_both_ways(v, b) for v, b in zip(schema, by_name, strict=True)]
    return schema


def config_schema(cls: type) -> dict[str, Any]:
    """The schema of a settings block of ``cls`` (a pydantic dataclass): its fields typed, with
    their defaults and choices, unknown keys refused."""
    adapter: TypeAdapter[Any] = TypeAdapter(cls)

    def generate(by_alias: bool) -> dict[str, Any]:
        schema = adapter.json_schema(by_alias=by_alias, schema_generator=_Untitled)
        schema.pop("title", None)
        inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
        return inlined

    both: dict[str, Any] = _named_both_ways(generate(by_alias=True), generate(by_alias=False))
    return both


def method_config_schema(method: str) -> dict[str, Any]:
    """The schema of ``method``'s own block (``settings[method]``, and ``method_config``)."""
    cls = get_spec(method).config
    if cls is None:
        return _object({}, f"{method} has no settings of its own.")
    return config_schema(cls)


def settings_schema(methods: list[str]) -> dict[str, Any]:
    """The schema of a model's ``settings``: the methods' blocks and the engine's."""
    fraction = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    engine = {
        "train": config_schema(TrainConfig),
        "lora": _object(LORA, "The adapter of v1 (and of the retrain reference)."),
        "pretrain": config_schema(PretrainConfig),
        "audit": config_schema(AuditConfig),
        "acceptance": config_schema(AcceptanceConfig),
        "anchor_fraction": fraction,
        "anchor_fractions": {
            "type": "object",
            "propertyNames": {"enum": methods},
            "additionalProperties": fraction,
        },
        "anchor_draw": {"type": "integer"},
    }
    blocks = {m: method_config_schema(m) for m in methods if get_spec(m).config is not None}
    return _object({**blocks, **engine}, "Per-model settings (docs/methods.md).")


def catalogue() -> dict[str, Any]:
    """What ``service/methods.json`` holds: each method's ``method_config`` schema, and the schema of
    ``settings``."""
    methods = available_methods()
    return {
        "methods": {m: method_config_schema(m) for m in methods},
        "settings": settings_schema(methods),
    }


def render() -> str:
    return json.dumps(catalogue(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
