"""The toy workload as a test-local ``lethe.workloads`` entry point (it is a template, not shipped)."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import pytest

import service.registry
import worker.unlearning.workload

TOY = EntryPoint(name="toy", value="worker.unlearning.workloads.toy:ToyWorkload", group="lethe.workloads")


def register_toy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``toy`` listed beside the installed workloads, for the worker and the API's registry."""

    def with_toy(*, group: str) -> list[EntryPoint]:
        found = list(entry_points(group=group))
        return [*found, TOY] if group == TOY.group else found

    monkeypatch.setattr(worker.unlearning.workload, "entry_points", with_toy)
    monkeypatch.setattr(service.registry, "entry_points", with_toy)
