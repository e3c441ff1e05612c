"""The service's copy of the methods' settings schemas (``service/methods.json``) is what the worker
declares (issue 9, item 13): the API validates a model's method and settings without torch."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from service import methods
from service.errors import UnprocessableError
from worker.cli import models_command
from worker.unlearning.methods import available_methods
from worker.unlearning.methods import schemas as method_schemas
from worker.unlearning.methods.gradient_loop import parse_config
from worker.unlearning.methods.orthograd import OrthoGradConfig, project_out
from worker.unlearning.workload import available_workloads, load_workload


def test_the_shipped_schemas_are_what_the_worker_declares() -> None:
    """If this fails, regenerate: ``python -m worker.unlearning.methods.schemas > service/methods.json``."""
    assert methods.catalogue() == method_schemas.catalogue()
    shipped = (files("service") / "methods.json").read_text("utf-8")
    assert shipped == method_schemas.render()


def test_every_registered_method_is_declared() -> None:
    """A new method must say which settings block it reads (``METHOD_CONFIGS``)."""
    assert set(method_schemas.METHOD_CONFIGS) == set(available_methods())
    assert methods.method_names() == available_methods()


def _build(cls: type, settings: dict[str, Any]) -> object:
    from_settings = getattr(cls, "from_settings", None)
    if from_settings is not None:
        return from_settings(settings)
    return parse_config(cls, settings, cls.__name__)


def _run_with(cls: type, name: str, value: str) -> None:
    """What refuses a bad choice: the config, or (``orthograd``'s solver) the step that uses it."""
    config = _build(cls, {name: value})
    assert getattr(config, name) == value
    if cls is OrthoGradConfig:
        project_out(torch.ones(3), torch.eye(3)[:1], solver=value)


@pytest.mark.parametrize(("cls", "name"), sorted(method_schemas.CHOICES, key=str))
def test_the_choices_are_the_methods_own(cls: type, name: str) -> None:
    """Every value a schema allows, the method accepts; another string it refuses."""
    for value in method_schemas.CHOICES[cls, name]:
        _run_with(cls, name, value)
    with pytest.raises(ValueError, match=name):
        _run_with(cls, name, "nonsense")


@pytest.mark.parametrize("cls", sorted({c for c in method_schemas.METHOD_CONFIGS.values() if c}, key=str))
def test_every_schema_key_is_a_config_key(cls: type) -> None:
    """The configs refuse unknown keys; the schema lists exactly what they accept."""
    schema = method_schemas.config_schema(cls)
    settings = {name: prop["default"] for name, prop in schema["properties"].items()}
    settings.pop("lambda", None)  # an alias of ``lam``
    _build(cls, settings)
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
