"""Unit tests of the worker's plumbing: watchdog, Celery configuration, GPU discovery, fault hook."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from click.testing import CliRunner

from service.settings import Settings
from worker import cli, liveness, models
from worker.celery_app import TASK_NAMES, TASK_WAKE, celery_config
from worker.config import GPU_QUEUE, WorkerSettings
from worker.context import fault_pause_hook, resolve_device
from worker.watchdog import RoundWatchdog


class LostError(Exception):
    pass


def test_watchdog_renews_and_detects_lost_lease() -> None:
    calls: list[float] = []

    def renew() -> None:
        calls.append(time.monotonic())
        if len(calls) >= 2:
            raise LostError("taken over")

    dog = RoundWatchdog(
        renew=renew, interval=0.05, soft_limit=60, hard_limit=120, lease_lost_types=(LostError,)
    )
    with dog:
        deadline = time.monotonic() + 5
        while dog.lease_lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(LostError):
            dog.check()
    assert dog.renewals == 1
    assert len(calls) == 2  # no renewal after the loss


def test_watchdog_keeps_renewing_after_transient_errors() -> None:
    attempts: list[int] = []

    def renew() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("database blip")

    dog = RoundWatchdog(
        renew=renew, interval=0.05, soft_limit=60, hard_limit=120, lease_lost_types=(LostError,)
    )
    with dog:
        deadline = time.monotonic() + 5
        while dog.renewals < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert dog.lease_lost is None
    assert dog.renewals >= 2
    dog.check()


def test_watchdog_soft_limit_interrupts_the_task_thread() -> None:
    dog = RoundWatchdog(renew=lambda: None, interval=0.05, soft_limit=0.2, hard_limit=60)

    def busy_round() -> None:
        with dog, dog.interruptible():
            for _ in range(500):  # a Python loop: the asynchronous exception lands between bytecodes
                time.sleep(0.01)

    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        busy_round()
    assert time.monotonic() - started < 4
    assert dog.soft_limit_hit


def test_watchdog_interrupts_only_inside_the_interruptible_region() -> None:
    """Outside ``interruptible()`` (sealing, publishing) the soft limit is only raised by check();
    entering the region after the limit passed raises at once."""
    dog = RoundWatchdog(renew=lambda: None, interval=0.05, soft_limit=0.2, hard_limit=60)
    with dog:
        deadline = time.monotonic() + 5
        while not dog.soft_limit_hit and time.monotonic() < deadline:
            time.sleep(0.01)  # a Python loop that would receive an asynchronous exception
        assert dog.soft_limit_hit
        for _ in range(50):  # still nothing delivered
            time.sleep(0.01)
        with pytest.raises(SoftTimeLimitExceeded, match="longer than"):
            dog.check()
        with pytest.raises(SoftTimeLimitExceeded), dog.interruptible():
            pass


def test_watchdog_hard_limit_ends_the_process() -> None:
    ended = threading.Event()
    dog = RoundWatchdog(
        renew=lambda: None,
        interval=0.05,
        soft_limit=0.1,
        hard_limit=0.3,
        on_hard_limit=ended.set,
        interrupt_on_soft_limit=False,
    )
    with dog:
        assert ended.wait(5)
    with pytest.raises(SoftTimeLimitExceeded):
        dog.check()


def test_celery_config_reliability_settings() -> None:
    ws = WorkerSettings(soft_time_limit=100, hard_time_limit=200)
    conf = celery_config(Settings(broker_url="redis://127.0.0.1:1/0"), ws)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_time_limit"] == 200
    assert conf["task_soft_time_limit"] == 100
    assert conf["broker_transport_options"]["visibility_timeout"] > ws.hard_time_limit
    assert conf["task_default_queue"] == GPU_QUEUE
    assert {conf["task_routes"][name]["queue"] for name in TASK_NAMES} == {GPU_QUEUE}


def test_certification_has_its_own_queue_named_alike_on_both_sides() -> None:
    """Issue 8 part 5: ``lethe.certify_version`` is routed to ``lethe.certify`` (the API sends it
    there by name, torch-free), and a default worker consumes both queues."""
    from service import dispatch
    from worker.celery_app import TASK_CERTIFY
    from worker.config import CERTIFY_QUEUE

    conf = celery_config(Settings(broker_url="redis://127.0.0.1:1/0"), WorkerSettings())
    assert (
        (TASK_CERTIFY, CERTIFY_QUEUE)
        == (dispatch.TASK_CERTIFY, dispatch.CERTIFY_QUEUE)
        == (
            "lethe.certify_version",
            "lethe.certify",
        )
    )
    assert conf["task_routes"][TASK_CERTIFY]["queue"] == CERTIFY_QUEUE
    assert {q.name for q in conf["task_queues"]} == {GPU_QUEUE, CERTIFY_QUEUE}
    assert WorkerSettings().queues == [GPU_QUEUE, CERTIFY_QUEUE]


def test_celery_config_needs_a_broker() -> None:
    with pytest.raises(ValueError, match="BROKER"):
        celery_config(Settings(broker_url=None), WorkerSettings())


def test_worker_settings_validate_limits() -> None:
    with pytest.raises(ValueError, match="hard_time_limit"):
        WorkerSettings(soft_time_limit=10, hard_time_limit=5)


def test_visible_gpus_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert cli.visible_gpus() == ["0", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cli.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("shutil.which", lambda _name: None)
    assert cli.visible_gpus() == []


def test_fault_pause_hook(tmp_path: Path) -> None:
    assert fault_pause_hook(None, tmp_path) is None
    hook = fault_pause_hook("committed:0", tmp_path)
    assert hook is not None
    hook("claimed", {})
    assert not (tmp_path / "fault-committed").exists()
    hook("committed", {"round_id": 3})
    assert json.loads((tmp_path / "fault-committed").read_text())["round_id"] == 3


def test_supervisor_side_never_imports_torch() -> None:
    """The parent of the per-GPU workers (and the CLI) must not load torch (no CUDA in a parent)."""
    code = (
        "import sys, worker.cli, worker.embedded, worker.celery_app, worker.tasks, worker.pipeline\n"
        "import service.pull\n"
        "worker.cli.visible_gpus()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'worker.unlearning.engine' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_models_create_and_list_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LETHE_DATABASE_URL", raising=False)
    runner = CliRunner()
    created = runner.invoke(cli.models_command, ["create", "m-one", "--prepare", "none", "--settings", "{}"])
    assert created.exit_code == 0, created.output
    assert "model m-one registered" in created.output
    again = runner.invoke(cli.models_command, ["create", "m-one", "--prepare", "none"])
    assert "model m-one exists" in again.output
    bad = runner.invoke(cli.models_command, ["create", "Bad_Name", "--prepare", "none"])
    assert bad.exit_code != 0
    listed = runner.invoke(cli.models_command, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert rows == [
        {
            "name": "m-one",
            "workload": "digits-clients",
            "workload_options": {},
            "method": "default",
            "status": "preparing",
            "latest_version": None,
            "versions": [],
        }
    ]


def test_models_create_refuses_bad_arguments_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed before: a missing @file and a workload option the constructor refuses were tracebacks
    (the latter after registering the model, left ``failed``); bad JSON did not name its option."""
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LETHE_DATABASE_URL", raising=False)
    runner = CliRunner()
    unmigrated = runner.invoke(cli.models_command, ["list"])
    assert unmigrated.exit_code == 1
    assert "has `lethe migrate` run?" in unmigrated.output
    models.migrate()
    for args, option in [
        (["--settings", f"@{tmp_path / 'missing.json'}"], "--settings"),
        (["--settings", "{bad"], "--settings"),
        (["--method-config", "[1]"], "--method-config"),
        (["--workload-option", "foo=1"], "--workload-option"),
    ]:
        result = runner.invoke(cli.models_command, ["create", "m3", "--prepare", "none", *args])
        assert result.exit_code == 2, result.output
        assert (
            f"Invalid value for {option}" in result.output or f"Invalid value for '{option}'" in result.output
        )
        assert result.exception is None or isinstance(result.exception, SystemExit)
    listed = runner.invoke(cli.models_command, ["list"])
    assert listed.output == "no models\n"


def test_models_create_of_an_existing_model_shows_it_and_refuses_other_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed before: `models create digits --workload scenes --method ssd` on an existing model
    printed "model digits exists (workload scenes)" and exited 0; nothing of it was stored."""
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LETHE_DATABASE_URL", raising=False)
    runner = CliRunner()
    assert runner.invoke(cli.models_command, ["create", "--prepare", "none"]).exit_code == 0
    same = runner.invoke(cli.models_command, ["create", "--prepare", "none", "--method", "default"])
    assert same.exit_code == 0, same.output
    # the line itself (other tests may have configured logging into the runner's output)
    assert (
        "model digits exists (preparing, workload digits-clients, method default)" in same.output.splitlines()
    )
    other = runner.invoke(
        cli.models_command, ["create", "--workload", "scenes", "--method", "ssd", "--prepare", "none"]
    )
    assert other.exit_code == 1
    assert 'workload "scenes" (stored: "digits-clients")' in other.output
    assert 'method "ssd" (stored: "default")' in other.output
    assert "PATCH /v1/admin/models/digits" in other.output
    listed = runner.invoke(cli.models_command, ["list"])
    assert "workload=digits-clients method=default latest=none versions=[]" in listed.output
    assert "NAME (default: digits)" in runner.invoke(cli.models_command, ["create", "--help"]).output


def test_worker_check_reads_the_heartbeat_of_its_own_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed before: every stack's `lethe worker --check` read /tmp/lethe-worker.alive."""
    monkeypatch.delenv("LETHE_WORKER_ALIVE_FILE", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "worker.alive").touch()
    runner = CliRunner()
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "a"))
    alive = runner.invoke(cli.worker_command, ["--check"])
    assert alive.exit_code == 0, alive.output
    assert alive.output.startswith("ok: last heartbeat")
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "b"))
    assert liveness.heartbeat_age(Settings()) == float("inf")
    other = runner.invoke(cli.worker_command, ["--check"])
    assert other.exit_code == 1
    assert "no heartbeat" in other.output
    monkeypatch.setenv("LETHE_WORKER_ALIVE_FILE", str(tmp_path / "a" / "worker.alive"))  # the image's way
    assert runner.invoke(cli.worker_command, ["--check"]).exit_code == 0


def test_the_heartbeat_touches_the_alive_file_of_its_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LETHE_WORKER_ALIVE_FILE", raising=False)
    monkeypatch.setattr(liveness, "heartbeat", lambda ctx, *, queues, state: None)  # no database here
    settings = Settings(home=tmp_path / "home", broker_url=None)
    ctx: Any = SimpleNamespace(settings=settings, worker_settings=WorkerSettings())
    app: Any = _RecordingApp()
    liveness.Heartbeat(app, ctx, interval=1.0, do_sweep=False, busy=lambda: False).beat()
    assert (tmp_path / "home" / "worker.alive").is_file()
    assert liveness.heartbeat_age(settings) < 60


def test_worker_refuses_bad_arguments_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LETHE_BROKER_URL", raising=False)
    runner = CliRunner()
    no_broker = runner.invoke(cli.worker_command, ["--gpus", "none"])
    assert no_broker.exit_code == 1
    assert "LETHE_BROKER_URL is not set" in no_broker.output
    assert runner.invoke(cli.worker_command, ["--loglevel", "loud"]).exit_code == 2


def test_up_refuses_a_busy_port_and_no_workers_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Failed before: with the port taken, `lethe up` started Redis and a worker, printed "Lethe is
    up" and then "the API exited (3)"; `--workers 0` started no worker."""
    import worker.embedded

    started: list[object] = []
    monkeypatch.setattr(worker.embedded, "EmbeddedStack", lambda **kw: started.append(kw))
    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(cli.up_command, ["--port", str(port)])
    assert result.exit_code == 2
    assert f"127.0.0.1:{port} is in use" in result.output
    assert "Lethe is up" not in result.output
    for workers in ("0", "-1"):
        assert runner.invoke(cli.up_command, ["--workers", workers]).exit_code == 2
    assert started == []


def test_one_worker_process_per_gpu() -> None:
    for gpu in ("0", "3"):
        args, env = cli.child_command(gpu, "info")
        assert env["CUDA_VISIBLE_DEVICES"] == gpu
        assert env["LETHE_WORKER_DEVICE"] == "cuda"
        assert args[-4:] == ["--gpus", "inherit", "--loglevel", "info"]


def test_device_resolution_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_device("auto") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert resolve_device("auto") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="sees no GPU"):
        resolve_device("cuda")  # asked for explicitly: an error, not a silent fallback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


SUPERVISOR = """
import os, sys
from pathlib import Path
import worker.cli as cli

out = Path(sys.argv[1])
CHILD = (
    "import os, sys, time, pathlib; "
    "pathlib.Path(sys.argv[1], f'child-{os.getpid()}').write_text("
    "os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + os.environ['LETHE_WORKER_DEVICE']); time.sleep(120)"
)
real = cli.child_command


def child_command(gpu, loglevel):
    _, env = real(gpu, loglevel)  # the real environment; a stand-in process instead of Celery
    return [sys.executable, "-c", CHILD, str(out)], env


cli.child_command = child_command
try:
    cli.worker_command.main(["--gpus", "0,1"], standalone_mode=False)
except SystemExit as exc:
    code = exc.code
else:
    code = None
(out / "parent").write_text(f"{code} torch={'torch' in sys.modules}")
"""


def _children(directory: Path) -> dict[int, str]:
    return {int(p.name.split("-")[1]): p.read_text() for p in directory.glob("child-*")}


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_supervisor_runs_one_process_per_gpu_and_never_imports_torch(tmp_path: Path) -> None:
    """``lethe worker --gpus 0,1``: one child per GPU, each seeing only its GPU, a dead child is
    restarted, SIGTERM is forwarded, and the supervising parent never imports torch (so it can never
    initialise CUDA before its children exist)."""
    env = {**os.environ, "LETHE_BROKER_URL": "redis://127.0.0.1:1/0"}  # never reached: no Celery runs
    parent = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)], env=env)
    try:
        _wait_for(lambda: len(_children(tmp_path)) == 2)
        first = _children(tmp_path)
        assert sorted(first.values()) == ["0 cuda", "1 cuda"]
        victim = next(pid for pid, seen in first.items() if seen == "1 cuda")
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: len(_children(tmp_path)) == 3)  # restarted on the same GPU
        (new_pid,) = set(_children(tmp_path)) - set(first)
        assert _children(tmp_path)[new_pid] == "1 cuda"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
    assert (tmp_path / "parent").read_text() == "0 torch=False"
    for pid in _children(tmp_path):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class _RecordingApp:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str]]] = []

    def send_task(self, name: str, args: list[str]) -> None:
        self.sent.append((name, args))


@pytest.mark.redis
def test_one_outstanding_wake_per_model_until_a_worker_starts_it(redis_server_url: str) -> None:
    """Issue 9 item 7: the worker's wakes (sweeper, next round) share the API's marker: none is sent
    while one is queued; starting the wake clears the marker."""
    broker = redis.Redis.from_url(redis_server_url)
    app = _RecordingApp()
    try:
        broker.delete(liveness.WAKE_KEY.format(model="m-wake"))
        assert liveness.send_wake(app, broker, "m-wake")  # type: ignore[arg-type]
        assert not liveness.send_wake(app, broker, "m-wake")  # type: ignore[arg-type]
        liveness.wake_again(app, "m-wake", broker)  # type: ignore[arg-type]
        assert app.sent == [(TASK_WAKE, ["m-wake"])]
        liveness.wake_started(broker, "m-wake")
        liveness.wake_again(app, "m-wake", broker)  # type: ignore[arg-type]
        assert app.sent == [(TASK_WAKE, ["m-wake"])] * 2
    finally:
        broker.delete(liveness.WAKE_KEY.format(model="m-wake"))
        broker.close()
