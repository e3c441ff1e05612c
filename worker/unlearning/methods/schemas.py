"""JSON Schemas of a model's ``method_config`` and ``settings``, generated from the methods' configs.

The API validates a model's method and settings when it is registered or reconfigured, without
importing torch: it reads ``service/methods.json``, which this module writes::

    python -m worker.unlearning.methods.schemas > service/methods.json

``tests/worker/test_method_schemas.py`` proves the shipped file equals :func:`catalogue`, that every
registered method is declared in :data:`METHOD_CONFIGS`, and that the configs refuse what the
schemas refuse (choices) and accept what the built-in workloads set.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from worker.unlearning.acceptance import AcceptanceConfig
from worker.unlearning.audit import AuditConfig
from worker.unlearning.interference import IAConfig
from worker.unlearning.methods import available_methods
from worker.unlearning.methods.gdr_gma import GdrGmaConfig
from worker.unlearning.methods.neggrad_plus import NegGradPlusConfig
from worker.unlearning.methods.orthograd import OrthoGradConfig
from worker.unlearning.methods.uno import UnoConfig
from worker.unlearning.ssd import SSDConfig
from worker.unlearning.training import TrainConfig

#: The config each method reads from its own block, ``settings[<method>]`` (which ``method_config``
#: is merged over); ``None``: the method has no block of its own. ``default`` is :func:`_default`.
METHOD_CONFIGS: dict[str, type | None] = {
    "original": None,
    "retrain": None,  # the v1 recipe: settings["train"] and settings["lora"]
    "default": None,
    "ssd": SSDConfig,
    "ia": IAConfig,
    "neggrad_plus": NegGradPlusConfig,
    "orthograd": OrthoGradConfig,
    "gdr_gma": GdrGmaConfig,
    "uno": UnoConfig,
}
#: String settings with a fixed set of values (the configs refuse any other when a round runs).
CHOICES: dict[tuple[type, str], tuple[str, ...]] = {
    (SSDConfig, "fisher"): ("batch", "per_sample"),
    (IAConfig, "grad_backend"): ("autograd", "func"),
    (IAConfig, "check_rows"): ("anchor", "outside_anchor", "both"),
    (IAConfig, "subspace_init"): ("random", "orthogonal", "gradient"),
    (IAConfig, "forget_balance"): ("none", "total", "per_task"),
    (IAConfig, "task_distance"): ("mean", "max"),
    (IAConfig, "forget_accuracy_pick"): ("closest", "earliest"),
    (OrthoGradConfig, "solver"): ("gram", "qr"),
    (AcceptanceConfig, "fallback"): ("retrain", "none"),
}
#: Another name a setting may be given by (``SSDConfig.from_settings``: ``lambda`` for ``lam``).
ALIASES: dict[tuple[type, str], str] = {(SSDConfig, "lam"): "lambda"}
#: ``settings["pretrain"]``: what :meth:`worker.unlearning.workload.Workload.pretrain` reads.
PRETRAIN = {"epochs": "int", "batch_size": "int", "lr": "float"}
#: ``settings["lora"]``: read by :meth:`TrainConfig.from_settings` (``rank``, ``lora_alpha``).
LORA = {"rank": "int", "alpha": "int"}
JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}


def _object(properties: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


def _typed(types: dict[str, str]) -> dict[str, Any]:
    return {name: {"type": JSON_TYPES[kind]} for name, kind in types.items()}


def _description(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def config_schema(cls: type) -> dict[str, Any]:
    """The schema of a config dataclass's settings block: its fields, typed, with their defaults."""
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        prop: dict[str, Any] = {"type": JSON_TYPES[str(f.type)], "default": f.default}
        if (cls, f.name) in CHOICES:
            prop["enum"] = list(CHOICES[cls, f.name])
        for name in (f.name, ALIASES.get((cls, f.name))):
            if name is not None:
                properties[name] = prop
    return _object(properties, _description(cls))


def _default() -> dict[str, Any]:
    """``settings["default"]``: stage switches; ``ssd`` / ``ia`` may be a block merged over theirs."""
    stages = {
        "ssd": {"anyOf": [{"type": "boolean"}, config_schema(SSDConfig)]},
        "ia": {"anyOf": [{"type": "boolean"}, config_schema(IAConfig)]},
        "prune": {"type": "boolean"},
    }
    return _object(stages, "Stages of the default method (SSD, interference-aware updates, pruning).")


def method_config_schema(method: str) -> dict[str, Any]:
    """The schema of ``method``'s own block (``settings[method]``, and ``method_config``)."""
    if method == "default":
        return _default()
    cls = METHOD_CONFIGS[method]
    if cls is None:
        return _object({}, f"{method} has no settings of its own.")
    return config_schema(cls)


def settings_schema(methods: list[str]) -> dict[str, Any]:
    """The schema of a model's ``settings``: the methods' blocks and the engine's."""
    fraction = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    engine = {
        "train": config_schema(TrainConfig),
        "lora": _object(_typed(LORA), "The adapter of v1 (and of the retrain reference)."),
        "pretrain": _object(_typed(PRETRAIN), "Training of the frozen base."),
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
    blocks = {m: method_config_schema(m) for m in methods if m not in ("original", "retrain")}
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
