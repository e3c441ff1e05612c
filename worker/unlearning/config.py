"""Typed settings blocks: a frozen pydantic dataclass filled from one key of the per-model settings.

Every block is declared with :data:`SETTINGS` (unknown keys refused, a field's alias and its name
both accepted), so that its JSON Schema (``pydantic.TypeAdapter(cls).json_schema()``) is what the
API validates with (``worker.unlearning.methods.schemas``) and what the worker accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar, cast

from pydantic import AliasChoices, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

#: The pydantic config of every settings block (an alternative key of a field is declared on it:
#: ``Field(validation_alias=AliasChoices("lambda", "lam"))``, so that code keeps the field name).
SETTINGS = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

T = TypeVar("T")

# Bounds of the settings' numbers, in the JSON Schema the API validates with, so that a model's
# settings cannot ask for something that fails every later request (a batch of 0 rows) or holds
# the only worker for days (1e308 epochs). The upper bounds are far above any measured use
# (docs/methods.md); a run that needs more is a workload with its own defaults.
MAX_EPOCHS = 10_000
MAX_STEPS = 1_000_000
MAX_ROWS = 1_000_000

#: passes over a data set (0: none)
Epochs = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
#: optimiser steps, patience, resamples, counts of rows or samples where 0 means "off" / "all"
Count = Annotated[int, Field(ge=0, le=MAX_STEPS)]
#: every how many optimiser steps something is done (at least 1: every step)
Period = Annotated[int, Field(ge=1, le=MAX_STEPS)]
#: rows per forward or backward (at least one)
BatchSize = Annotated[int, Field(ge=1, le=MAX_ROWS)]
#: a learning rate (positive, finite)
LearningRate = Annotated[float, Field(gt=0, le=1e3, allow_inf_nan=False)]
#: a weight, scale or tolerance (non-negative, finite)
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: a share, probability or AUC in [0, 1]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
#: a factor that shrinks something (strictly between 0 and 1)
Shrink = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
#: a signed shift of an AUC (or of a fraction): at most half the scale either way
SignedHalf = Annotated[float, Field(ge=-0.5, le=0.5, allow_inf_nan=False)]
#: an adapter's LoRA rank and alpha in ``settings["train"]`` (0: the workload's LoraConfig)
MAX_RANK = 1024
AdapterRank = Annotated[int, Field(ge=0, le=MAX_RANK)]
AdapterAlpha = Annotated[int, Field(ge=0, le=64 * MAX_RANK)]


def setting_keys(cls: type) -> dict[str, str]:
    """Every key a settings block of ``cls`` may use (field names and aliases) → its field name."""
    fields: dict[str, FieldInfo] = cast(Any, cls).__pydantic_fields__
    keys = {name: name for name in fields}
    for name, info in fields.items():
        aliases = info.validation_alias
        choices = aliases.choices if isinstance(aliases, AliasChoices) else [aliases or info.alias]
        keys.update({alias: name for alias in choices if isinstance(alias, str)})
    return keys


def parse_settings(cls: type[T], settings: Mapping[str, Any] | None, what: str) -> T:
    """``cls`` from a settings block; an unknown key or a value of the wrong type or choice is a
    ``ValueError`` naming ``what`` (e.g. ``"SSD"``) and the key."""
    raw = dict(settings or {})
    keys = setting_keys(cls)
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ValueError(f"unknown {what} setting {unknown[0]!r} (known: {', '.join(sorted(keys))})")
    try:
        return cls(**raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else "?"  # a block's key (not a union member's tag)
        raise ValueError(f"{what} setting {key!r}: {error['msg']} (got {error['input']!r})") from None
