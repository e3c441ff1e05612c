"""Structure of docker-compose.yml and the Dockerfile (no Docker engine in CI: parse and check)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


def _stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its instructions (FROM line included, comments left out)."""
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    parts = re.split(r"(?m)^(?=FROM )", code)
    out: dict[str, str] = {}
    for part in parts:
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", part, flags=re.IGNORECASE)
        if m:
            out[m.group(1)] = part
    return out


def _command(svc: dict[str, Any]) -> str:
    cmd = svc.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)


def test_redis_is_durable_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    cmd = services["redis"]["command"]
    assert isinstance(cmd, list)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any("/data" in str(v) for v in services["redis"]["volumes"])


@pytest.mark.parametrize("name", ["postgres", "redis", "api"])
def test_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert check.get("retries", 0) >= 3


def test_migrate_is_one_shot_and_gates_api_and_worker(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate.get("restart") == "no"
    assert "migrate" in _command(migrate)
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"


def test_worker_reserves_gpus(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "worker" in _command(services["worker"])


def test_api_and_worker_share_state_and_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker", "migrate"):
        env = services[name]["environment"]
        assert env["LETHE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["LETHE_BROKER_URL"].startswith("redis://redis:")
    assert set(services["api"]["volumes"]) & set(services["worker"]["volumes"])


def test_images_targets(services: dict[str, dict[str, Any]]) -> None:
    assert services["api"]["build"]["target"] == "api"
    assert services["migrate"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"


def test_dockerfile_api_stage_has_no_torch() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert {"api", "worker"} <= set(stages)
    api = stages["api"]
    # The api image installs the package without the ml extra, and refuses to build with torch.
    assert "torch==" not in api
    assert "[ml]" not in api
    assert "find_spec('torch')" in api
    assert re.search(r"FROM\s+runtime\s+AS\s+api", api)
    # Nothing the api stage builds on installs torch either.
    assert "torch" not in stages["runtime"]
    # `lethe migrate` needs alembic.ini and migrations/ in the image
    assert "alembic.ini" in stages["runtime"]
    assert "migrations" in stages["runtime"]
    worker = stages["worker"]
    assert "torch==" in worker
    assert "[ml]" in worker


def test_dockerignore_keeps_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".lethe", ".git"} <= set(ignored)
