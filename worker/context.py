"""What every job of the worker shares: its context (settings, sessions, identity, device), the
model lock, and the bridge from database rows to the ML core (forget specs, workloads).

Torch and the ML core are imported lazily (inside functions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service import rounds
from service.db.models import ForgetRequest, Model
from service.db.session import make_session_factory
from service.settings import Settings
from service.storage import ArtifactStore, make_store
from worker.artifacts import ModelArtifacts
from worker.blob_cache import BlobCache
from worker.config import WorkerSettings
from worker.file_lock import exclusive_lock

if TYPE_CHECKING:
    from worker.unlearning.types import ForgetSpec
    from worker.unlearning.workload import Workload

log = logging.getLogger(__name__)

ProgressHook = Callable[[str, dict[str, Any]], None]


class PermanentRoundError(Exception):
    """The round cannot succeed by retrying (bad request content): its requests fail."""


@dataclass
class WorkerContext:
    """What a task needs: settings, a session factory, identity, device."""

    settings: Settings
    worker_settings: WorkerSettings
    session_factory: sessionmaker[Session]
    worker_id: str
    hostname: str = field(default_factory=socket.gethostname)
    device: str = "cpu"
    #: called with (event, details) at each step; tests use it to crash at a chosen point
    hook: ProgressHook | None = None
    engine: Engine | None = None
    #: the object store when ``artifact_store`` is not the local directory (built on first use)
    _remote: ArtifactStore | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls, settings: Settings, worker_settings: WorkerSettings, *, worker_id: str | None = None
    ) -> WorkerContext:
        engine = settings.create_engine()
        hostname = socket.gethostname()
        if worker_settings.torch_threads:
            import torch

            torch.set_num_threads(worker_settings.torch_threads)
        return cls(
            settings=settings,
            worker_settings=worker_settings,
            session_factory=make_session_factory(engine),
            worker_id=worker_id or f"{hostname}:{os.getpid()}",
            hostname=hostname,
            device=resolve_device(worker_settings.device),
            hook=fault_pause_hook(worker_settings.fault_pause, settings.resolved_home),
            engine=engine,
        )

    def close(self) -> None:
        """Close the database connections (the context is not used afterwards)."""
        if self.engine is not None:
            self.engine.dispose()

    @property
    def artifacts_root(self) -> Path:
        return self.settings.resolved_artifacts_dir

    def artifacts(self, model: str) -> ModelArtifacts:
        """The model's artifacts: this directory, and the object store if one is configured."""
        if self._remote is None and self.settings.artifact_store != "local":
            self._remote = make_store(self.settings)
        blobs = BlobCache(
            self.settings.resolved_home / "blob-cache", max_bytes=self.worker_settings.blob_cache_max_bytes
        )
        return ModelArtifacts(self.artifacts_root, model, remote=self._remote, blobs=blobs)

    def data_dir(self, model: str) -> Path:
        return self.settings.resolved_data_dir / model

    def prepare_lock(self, model: str) -> Path:
        """The file whose ``flock`` serialises a model's preparation, on every worker machine: beside
        the dataset store, which they share (the artifacts directory is each machine's own with an
        object store), and outside ``<model>/``, which a preparation deletes and rebuilds."""
        return self.settings.resolved_data_dir / f".{model}.prepare.lock"

    def cache_dir(self, model: str) -> Path:
        return self.settings.resolved_home / "cache" / model

    def references_dir(self, model: str) -> Path:
        """The likelihood-ratio audit's reference adapters: in the dataset store, which every worker
        machine shares, so that every round can read them and one purge deletes those that hold
        erased data everywhere."""
        return self.data_dir(model) / "references"

    def emit(self, event: str, **details: Any) -> None:
        if self.hook is not None:
            self.hook(event, details)


def fault_pause_hook(spec: str | None, home: Path) -> ProgressHook | None:
    """Fault injection for crash tests: ``"<event>:<seconds>"`` pauses the round at that step.

    On reaching the step the worker writes ``$LETHE_HOME/fault-<event>`` (so a test knows when to
    SIGKILL it) and sleeps. Events: claimed, progress, engine_done, committed, published,
    withdrawn_deleted, store_purged (raw data deleted, not yet recorded), purged. Unset in
    production (``LETHE_WORKER_FAULT_PAUSE``, documented as test-only).
    """
    if not spec:
        return None
    event, _, seconds = spec.partition(":")
    pause = float(seconds or 3600)
    fired: list[str] = []

    def hook(name: str, details: dict[str, Any]) -> None:
        if name == event and not fired:
            fired.append(name)
            (home / f"fault-{event}").write_text(json.dumps({"pid": os.getpid(), **details}, default=str))
            log.warning("fault injection: pausing %.0f s at %s", pause, event)
            time.sleep(pause)

    return hook


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when this process sees a GPU, else ``cpu`` (the CPU fallback).

    Runs in the worker process itself (the per-GPU child), never in a supervisor. ``cuda`` asked
    for explicitly without a visible GPU is a configuration error, not a silent fallback.
    """
    if device == "cpu" or (device == "auto" and os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")):
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise RuntimeError(
            "LETHE_WORKER_DEVICE=cuda but this process sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use auto or cpu"
        )
    return "cuda" if available else "cpu"


def model_lock(directory: Path, name: str = ".lethe.lock") -> contextlib.AbstractContextManager[None]:
    """An exclusive ``flock`` on ``directory/name`` (data-store writes, preparation)."""
    return exclusive_lock(directory / name)


def _spec(request: rounds.ClaimedRequest | ForgetRequest) -> ForgetSpec:
    from worker.unlearning.types import ForgetSpec

    kind = request.kind
    if kind not in ("client", "task"):
        raise PermanentRoundError(f"unknown request kind {kind!r}")
    return ForgetSpec(
        request_id=request.id,
        kind="client" if kind == "client" else "task",
        client_id=request.client_id,
        sample_ids=list(request.sample_ids) if request.sample_ids is not None else None,
        tasks=list(request.tasks),
    )


def _load_workload(model: Model) -> Workload:
    """The model's workload built with its ``workload_options``; ``ValueError`` if refused."""
    from worker.unlearning.workload import build_workload

    return build_workload(model.workload, model.workload_options)
