"""One bench package with one CLI (issue 7 part 6): ``python -m bench <command>`` and ``lethe
bench`` run every benchmark; the ML core never imports the package.

Defect: the benchmark lived inside the ML core (``worker/unlearning/bench.py``) and the latency,
reliability and coalescing benches were loose scripts (``scripts/*.py``) that no test imported and
mypy did not check."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bench import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("quality", "--tune"),
        ("measure-workload", "--seeds"),
        ("latency", "--write-docs"),
        ("reliability", "--trials"),
        ("coalescing", "--sizes"),
        ("plot", "--out"),
    ],
)
def test_every_command_runs_with_its_flags(
    command: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m bench {command}" in out
    assert flag in out


def test_help_lists_the_commands_and_an_unknown_command_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in cli.COMMANDS)
    assert cli.main(["no-such-bench"]) == 2
    assert "unknown command 'no-such-bench'" in capsys.readouterr().err


def test_lethe_bench_is_the_packages_command() -> None:
    """``lethe bench`` (the ``lethe.cli`` entry point) is :func:`bench.cli.bench_command`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["lethe.cli"]["bench"]
    module, name = target.split(":")
    command = getattr(import_module(module), name)
    assert command is cli.bench_command
    assert isinstance(command, click.Command)
    assert "bench*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "matplotlib>=3.8" in project["project"]["optional-dependencies"]["bench"]
    runner = CliRunner()
    listed = runner.invoke(command, ["--help"])
    assert listed.exit_code == 0
    assert all(name in listed.output for name in cli.COMMANDS)
    plot_help = runner.invoke(command, ["plot", "--help"])
    assert plot_help.exit_code == 0
    assert "usage: lethe bench plot" in plot_help.output


def test_python_dash_m_bench_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "measure-workload" in done.stdout


def _imports_bench(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "bench" for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module or "").split(".")[0] == "bench"
        ):
            return True
    return False


def test_the_core_and_the_service_never_import_the_bench_package() -> None:
    sources = [*(ROOT / "worker").rglob("*.py"), *(ROOT / "service").rglob("*.py")]
    assert len(sources) > 50
    assert [str(p.relative_to(ROOT)) for p in sources if _imports_bench(p)] == []
    assert not (ROOT / "worker" / "unlearning" / "bench.py").exists()
    assert not list((ROOT / "scripts").glob("*bench*.py"))


def test_quality_passes_served_methods_to_the_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import quality

    seen: dict[str, object] = {}

    def run_bench(*args: object, **kwargs: object) -> dict[str, object]:
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(quality, "run_bench", run_bench)
    assert cli.main(["quality", "--served", "default,ia", "--no-plots"]) == 0
    assert seen["served"] == ["default", "ia"]
    assert seen["second_retrain"] is True
    assert cli.main(["quality", "--no-second-retrain", "--no-plots"]) == 0
    assert seen.pop("second_retrain") is False
    assert cli.main(["quality", "--no-plots"]) == 0
    assert seen["served"] == []
    assert seen["request_settings"] is None
    assert cli.main(["quality", "--request-settings", "FU,PU:shape", "--no-plots"]) == 0
    assert seen["request_settings"] == ["FU", "PU:shape"]
