"""``import service…`` never imports torch, peft or the worker package."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import service

#: Every module of the package, so that a new one is covered too.
MODULES = sorted(["service", *(m.name for m in pkgutil.walk_packages(service.__path__, prefix="service."))])
FORBIDDEN = ("torch", "peft", "worker", "transformers", "safetensors", "sklearn")

PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from service.api.app import create_app
from service.settings import Settings
create_app(Settings(database_url="sqlite://"))
bad = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})
print(",".join(bad))
"""


def test_service_imports_no_ml_and_no_worker() -> None:
    assert {"service.api.app", "service.cli", "service.rounds", "service.db.migrate"} <= set(MODULES)
    code = PROBE.format(forbidden=set(FORBIDDEN))
    result = subprocess.run(
        [sys.executable, "-c", code, *MODULES], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"service imported: {result.stdout}"


def test_the_cli_help_lists_commands_without_importing_torch() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from service.cli import main;"
        "r = CliRunner().invoke(main, ['keys', '--help']); assert r.exit_code == 0, r.output;"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {set(FORBIDDEN)!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""
