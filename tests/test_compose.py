"""Structure of docker-compose.yml and the Dockerfile (no Docker engine in CI: parse and check)."""

from __future__ import annotations

import importlib.util
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
    worker = stages["worker"]
    assert "torch==" in worker
    assert "pyproject-deps.py ml" in worker  # the ml extra's dependencies


@pytest.mark.parametrize("stage", ["api", "worker"])
def test_dockerfile_installs_dependencies_before_the_source(stage: str) -> None:
    """Issue 10 part 8. Defect: the source was copied before any dependency was installed (and
    installed in place with ``pip install -e``), so every code change rebuilt the dependency layers.
    Now: dependencies from pyproject.toml, then the source (migrations included), then the package
    as a wheel without dependencies; the base stage holds no source."""
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert not re.search(r"COPY\s+(service|worker|migrations)\b", stages["runtime"])
    text = stages[stage]
    deps = text.index("pip install -r requirements.txt")
    sources = [m.start() for m in re.finditer(r"(?m)^COPY\s+(service|worker|migrations)\b", text)]
    assert len(sources) == 3
    assert deps < min(sources) < max(sources) < text.index("pip install --no-deps .")
    assert "pip install -e" not in text


def test_pyproject_deps_lists_the_core_and_the_extras() -> None:
    spec = importlib.util.spec_from_file_location("pyproject_deps", ROOT / "scripts" / "pyproject-deps.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    core = module.dependencies(ROOT / "pyproject.toml", [])
    with_ml = module.dependencies(ROOT / "pyproject.toml", ["ml"])
    assert any(d.startswith("fastapi") for d in core)
    assert not any(d.startswith("torch") for d in core)
    assert set(core) < set(with_ml)
    assert any(d.startswith("torch") for d in with_ml)


def test_dockerignore_keeps_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".lethe", ".git"} <= set(ignored)


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/compose.gpus.yml"])
def test_no_secret_has_a_default(path: str) -> None:
    """Defect (issue 9, item 14): Postgres defaulted to the password ``lethe``. Every reference to a
    password must be required (``${VAR:?message}``): compose refuses to start without it."""
    text = (ROOT / path).read_text()
    references = re.findall(r"\$\{([A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|KEY)[A-Z0-9_]*)(:?[-?+]?)", text)
    assert references, "the database password must come from the environment"
    for name, operator in references:
        assert operator == ":?", f"${{{name}}} must be required (:?), not defaulted ({operator!r})"
    assert "POSTGRES_PASSWORD: lethe" not in text


def test_secrets_reach_postgres_and_lethe_from_the_environment(services: dict[str, dict[str, Any]]) -> None:
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD:?")
    for name in ("api", "worker", "migrate"):
        assert ":${POSTGRES_PASSWORD:?" in services[name]["environment"]["LETHE_DATABASE_URL"]


def _published(svc: dict[str, Any]) -> list[str]:
    return [str(port) for port in svc.get("ports", [])]


def test_only_the_tls_proxy_is_published(services: dict[str, dict[str, Any]]) -> None:
    """Defect (issue 9, item 14): the API was published as plain HTTP on 0.0.0.0:8000. Now nothing
    but the proxy publishes a port (443, and 80 for the redirect to https and ACME)."""
    for name, svc in services.items():
        if name != "proxy":
            assert _published(svc) == [], f"{name} publishes {svc['ports']}"
    assert sorted(_published(services["proxy"])) == ["443:443", "80:80"]
    assert services["api"]["expose"] == ["8000"]


def test_the_proxy_terminates_tls_for_the_api(services: dict[str, dict[str, Any]]) -> None:
    proxy = services["proxy"]
    assert str(proxy["image"]).startswith("caddy:")
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in proxy["volumes"]}
    assert mounts["/etc/caddy/Caddyfile"] == "./deploy/Caddyfile"
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    assert proxy["environment"]["LETHE_PUBLIC_HOST"].startswith("${LETHE_PUBLIC_HOST:?")
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text()
    lines = [line.strip() for line in caddyfile.splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    assert code[0] == "{$LETHE_PUBLIC_HOST} {", "the site is the public host name (Caddy serves https)"
    assert "tls {$LETHE_TLS}" in code
    assert "reverse_proxy api:8000" in code
    assert "respond /metrics 404" in code, "the metrics stay on the compose network"
    assert not any(line.startswith("encode") for line in code), "compression would change the bytes' digests"
    assert any(line.startswith("header Strict-Transport-Security") for line in code)


def test_the_api_runs_lethe_serve(services: dict[str, dict[str, Any]]) -> None:
    """`lethe serve` runs uvicorn with the protocol that answers its own 400s as problem+json."""
    assert _command(services["api"]).startswith("lethe serve --host 0.0.0.0 --port 8000")
    api = _stages((ROOT / "Dockerfile").read_text())["api"]
    assert 'CMD ["lethe", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-migrate"]' in api


def test_the_api_trusts_only_its_proxy_and_builds_urls_from_the_public_host(
    services: dict[str, dict[str, Any]],
) -> None:
    """Issue 9 item 3 behind the proxy: forwarded headers are trusted through LETHE_TRUSTED_PROXIES
    (the api publishes no port: only the proxy reaches it), and file URLs come from LETHE_PUBLIC_URL,
    never from a request's Host header."""
    env = services["api"]["environment"]
    assert env["LETHE_TRUSTED_PROXIES"] == "*"
    assert env["LETHE_PUBLIC_URL"].startswith("https://${LETHE_PUBLIC_HOST:?")
    assert "FORWARDED_ALLOW_IPS" not in env
    assert "ports" not in services["api"]


# --- several GPUs and machines (issue 10 part 7) ---------------------------------------------------


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, list)
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def _load(path: str) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load((ROOT / path).read_text())
    assert isinstance(data, dict)
    svcs = data["services"]
    assert isinstance(svcs, dict)
    return svcs


def test_one_worker_per_machine_runs_one_process_per_gpu(services: dict[str, dict[str, Any]]) -> None:
    """Defect (issue 10 part 7): the file advised `--scale worker=N`, and every replica reserved every
    GPU (N processes on each GPU). Now one `worker` per machine reserves its GPUs and `lethe worker`
    runs one process per GPU in it (its supervisor: CUDA_VISIBLE_DEVICES per child); no replicas."""
    worker = services["worker"]
    assert [d.get("count") for d in _gpu_devices(worker)] == ["all"]
    assert _command(worker) == "lethe worker"  # --gpus auto: one solo-pool process per visible GPU
    assert "replicas" not in worker.get("deploy", {})
    text = (ROOT / "docker-compose.yml").read_text()
    assert "do not `--scale worker=N`" in text
    assert not re.search(r"(?m)^# Scale workers .*--scale worker=N", text)


def test_the_two_gpu_override_pins_one_gpu_per_worker_service(services: dict[str, dict[str, Any]]) -> None:
    """deploy/compose.gpus.yml: `worker` moves to a profile (does not start), `worker-gpu0` and
    `worker-gpu1` each reserve exactly one, distinct GPU (device_ids, no count) and otherwise run
    like `worker`: same image, command, database, broker, volume and start-up gates."""
    override = _load("deploy/compose.gpus.yml")
    assert override["worker"] == {"profiles": ["all-gpus"]}
    pinned = {name: svc for name, svc in override.items() if name.startswith("worker-gpu")}
    assert sorted(pinned) == ["worker-gpu0", "worker-gpu1"]
    base = services["worker"]
    for index, name in enumerate(sorted(pinned)):
        svc = pinned[name]
        (device,) = _gpu_devices(svc)
        assert device["device_ids"] == [str(index)]
        assert "count" not in device  # count and device_ids are exclusive
        assert svc["image"] == base["image"]
        assert _command(svc) == _command(base)
        assert svc["volumes"] == base["volumes"]
        assert svc["depends_on"] == base["depends_on"]
        assert svc["healthcheck"] == base["healthcheck"]
        for key in ("LETHE_HOME", "LETHE_DATABASE_URL", "LETHE_BROKER_URL", "LETHE_ARTIFACT_STORE",
                    "LETHE_S3_ENDPOINT_URL", "LETHE_S3_SECRET_ACCESS_KEY"):  # fmt: skip
            assert svc["environment"][key] == base["environment"][key]
        assert svc["environment"]["LETHE_WORKER_DEVICE"] == "cuda"  # a GPU it cannot see is an error
    assert not any(_published(svc) for svc in override.values())


def test_the_worker_host_file_runs_workers_only_against_the_main_hosts_services() -> None:
    """deploy/compose.worker-host.yml (machines 2..M): only `worker`, every GPU of the machine,
    database, broker, the S3 artifact store and the shared dataset store required from the
    environment, nothing published."""
    svcs = _load("deploy/compose.worker-host.yml")
    assert list(svcs) == ["worker"]
    worker = svcs["worker"]
    assert [d.get("count") for d in _gpu_devices(worker)] == ["all"]
    assert _command(worker) == "lethe worker"
    env = worker["environment"]
    assert env["LETHE_DATABASE_URL"].startswith("${LETHE_DATABASE_URL:?")
    assert env["LETHE_BROKER_URL"].startswith("${LETHE_BROKER_URL:?")
    assert worker["volumes"] == ["${LETHE_SHARED_HOME:?set LETHE_SHARED_HOME, the shared dataset store "
                                 "mounted here}:/var/lib/lethe"]  # fmt: skip
    assert env["LETHE_ARTIFACT_STORE"] == "s3"
    assert env["LETHE_S3_ENDPOINT_URL"].startswith("${LETHE_S3_ENDPOINT_URL:?")
    assert _published(worker) == []


def test_artifacts_live_in_minio_not_in_a_shared_volume(services: dict[str, dict[str, Any]]) -> None:
    """Issue 10 part 6: compose runs MinIO; the API and the worker use it as their artifact store
    (settings that exist), after ``minio-init`` created the bucket; MinIO publishes no port."""
    from service.settings import Settings

    minio = services["minio"]
    assert "server" in _command(minio)
    assert minio["healthcheck"]["test"][0] == "CMD"
    assert any(str(v).endswith(":/data") for v in minio["volumes"])
    assert not _published(minio)
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")
    init = services["minio-init"]
    assert init.get("restart") == "no"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in _command(init)
    fields = set(Settings.model_fields)
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["LETHE_ARTIFACT_STORE"] == "s3"
        assert env["LETHE_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["LETHE_S3_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        unknown = {k for k in env if k.startswith("LETHE_S3_") and k[len("LETHE_") :].lower() not in fields}
        assert not unknown, unknown


def test_each_worker_container_checks_its_own_heartbeat(services: dict[str, dict[str, Any]]) -> None:
    """`lethe worker --check` reads LETHE_WORKER_ALIVE_FILE (default under $LETHE_HOME); the worker
    image keeps it out of the $LETHE_HOME volume that worker containers share, or one container's
    check would see another's heartbeat."""
    worker_stage = _stages((ROOT / "Dockerfile").read_text())["worker"]
    alive = re.search(r"(?m)^ENV\s+LETHE_WORKER_ALIVE_FILE=(\S+)$", worker_stage)
    assert alive is not None
    worker = services["worker"]
    assert not alive.group(1).startswith(worker["environment"]["LETHE_HOME"].rstrip("/") + "/")
    assert "LETHE_WORKER_ALIVE_FILE" not in worker["environment"]
    assert worker["healthcheck"]["test"] == ["CMD", "lethe", "worker", "--check"]
