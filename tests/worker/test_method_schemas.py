"""The service's copy of the methods' settings schemas (``service/methods.json``) is what the worker
declares (issue 9, item 13): the API validates a model's method and settings without torch."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from pydantic.dataclasses import is_pydantic_dataclass

from service import methods
from service.errors import UnprocessableError
from worker.cli import models_command
from worker.unlearning.acceptance import AcceptanceConfig
from worker.unlearning.audit import AuditConfig
from worker.unlearning.config import parse_settings, setting_keys
from worker.unlearning.methods import available_methods, get_spec, specs
from worker.unlearning.methods import schemas as method_schemas
from worker.unlearning.methods.orthograd import OrthoGradConfig, project_out
from worker.unlearning.training import TrainConfig
from worker.unlearning.workload import available_workloads, load_workload


def test_the_shipped_schemas_are_what_the_worker_declares() -> None:
    """If this fails, regenerate: ``python -m worker.unlearning.methods.schemas > service/methods.json``."""
    assert methods.catalogue() == method_schemas.catalogue()
    shipped = (files("service") / "methods.json").read_text("utf-8")
    assert shipped == method_schemas.render()


def test_every_registered_method_declares_a_pydantic_settings_class() -> None:
    """A method's spec names the pydantic class of its settings block (or none), and the service
    knows every registered method."""
    assert methods.method_names() == available_methods()
    for name in available_methods():
        config = get_spec(name).config
        assert config is None or is_pydantic_dataclass(config), name
        assert methods.catalogue()["methods"][name]["additionalProperties"] is False


def _configs() -> list[type]:
    """Every settings class with a schema: the methods' and the engine's."""
    declared = {spec.config for spec in specs() if spec.config is not None}
    return sorted(declared | {AcceptanceConfig, AuditConfig, TrainConfig}, key=str)


def _choices() -> list[tuple[type, str, list[str]]]:
    """Every string setting with a fixed set of values (``enum``), from the schemas."""
    return [
        (cls, name, prop["enum"])
        for cls in _configs()
        for name, prop in method_schemas.config_schema(cls)["properties"].items()
        if "enum" in prop
    ]


#: the configs whose ``from_settings`` reads the whole settings, and the key of their block
WHOLE_SETTINGS: dict[type, str] = {AuditConfig: "audit", TrainConfig: "train"}


def _build(cls: type, settings: dict[str, Any]) -> object:
    """``cls`` from a settings block, the way the worker reads it."""
    from_settings = getattr(cls, "from_settings", None)
    if from_settings is not None:
        return from_settings({WHOLE_SETTINGS[cls]: settings} if cls in WHOLE_SETTINGS else settings)
    return parse_settings(cls, settings, cls.__name__)


def _run_with(cls: type, name: str, value: str) -> None:
    """What refuses a bad choice: the config."""
    config = _build(cls, {name: value})
    assert getattr(config, name) == value
    if cls is OrthoGradConfig:
        project_out(torch.ones(3), torch.eye(3)[:1], solver=value)


def test_the_schemas_list_the_choices() -> None:
    """The string settings with a fixed set of values carry it as an ``enum`` (the API refuses any
    other value when a model is registered)."""
    listed = {(cls.__name__, name): values for cls, name, values in _choices()}
    assert listed[("SSDConfig", "layout")] == ["reference", "merged"]
    assert listed[("IAConfig", "check_rows")] == ["anchor", "outside_anchor", "both"]
    assert listed[("OrthoGradConfig", "solver")] == ["gram", "qr"]
    assert listed[("AcceptanceConfig", "fallback")] == ["retrain", "none"]


@pytest.mark.parametrize(("cls", "name", "values"), _choices(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_the_choices_are_the_methods_own(cls: type, name: str, values: list[str]) -> None:
    """Every value a schema allows, the config accepts; another string it refuses."""
    for value in values:
        _run_with(cls, name, value)
    with pytest.raises(ValueError, match=name):
        _run_with(cls, name, "nonsense")


@pytest.mark.parametrize("cls", _configs(), ids=lambda c: c.__name__)
def test_every_schema_key_is_a_config_key(cls: type) -> None:
    """The configs refuse unknown keys; the schema lists exactly what they accept (an alias and
    its field name both)."""
    schema = method_schemas.config_schema(cls)
    for name, prop in schema["properties"].items():
        _build(cls, {name: prop["default"]})
    assert set(schema["properties"]) == set(setting_keys(cls))
    if cls is not AuditConfig:  # the audit ignores keys it does not own (the API refuses them)
        with pytest.raises(ValueError, match="unknown"):
            _build(cls, {"surely_not_a_setting": 1})


@pytest.mark.parametrize("workload", available_workloads())
def test_the_built_in_workloads_settings_are_valid(workload: str) -> None:
    defaults = load_workload(workload).default_settings()
    for method in methods.method_names():
        methods.validate(method, {}, defaults)
    with pytest.raises(UnprocessableError):
        methods.validate("default", {}, {**defaults, "sdd": {}})


def test_lethe_models_create_refuses_an_unknown_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI registers through the same validation: a clear error, nothing registered."""
    monkeypatch.setenv("LETHE_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(models_command, ["create", "m", "--method", "defualt", "--prepare", "none"])
    assert result.exit_code == 1, result.output
    assert "unknown method 'defualt'" in result.output
    result = runner.invoke(
        models_command, ["create", "m", "--settings", '{"ssd": {"fisher": 1}}', "--prepare", "none"]
    )
    assert result.exit_code == 1, result.output
    assert "settings.ssd.fisher" in result.output
    assert runner.invoke(models_command, ["create", "m", "--prepare", "none"]).exit_code == 0
