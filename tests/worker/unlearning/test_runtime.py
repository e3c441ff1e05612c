"""What a measurement ran on (``runtime.runtime_environment``)."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from worker.unlearning.runtime import PACKAGES, package_versions, runtime_environment


def test_environment_names_torch_its_kernel_path_and_the_other_packages() -> None:
    env = runtime_environment()
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads()
    assert set(env["packages"]) == set(PACKAGES)
    assert env["packages"]["peft"] == metadata.version("peft")


def test_a_missing_package_is_recorded_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.unlearning.runtime.PACKAGES", ("numpy", "no-such-package-lethe"))
    assert package_versions() == {"numpy": metadata.version("numpy"), "no-such-package-lethe": None}
