"""The preparation of a model: dataset, base, v1, registration (status ``preparing`` → ``ready``)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from service import rounds
from service.db.session import transaction
from service.repositories import models as models_repo
from worker import context
from worker.artifacts import version_dir_name
from worker.context import WorkerContext, model_lock
from worker.watchdog import RoundWatchdog

log = logging.getLogger(__name__)


def prepare_model(
    ctx: WorkerContext, model_name: str, *, time_limits: bool = True
) -> rounds.PublishedVersion | None:
    """Materialise the dataset, pretrain the base, train v1, register it (status → ready).

    Serialised per model by a file lock; a crashed attempt's partial files are rebuilt from scratch
    (the model is still ``preparing``, so nothing depends on them). ``time_limits``: the training
    runs under the worker's soft / hard time limits (off for ``lethe models create``, which an
    operator runs in the foreground).
    """
    from worker.unlearning.engine import prepare

    store = ctx.artifacts(model_name)
    data_dir = ctx.data_dir(model_name)
    store.model_dir.mkdir(parents=True, exist_ok=True)
    lock = ctx.prepare_lock(model_name)
    with model_lock(lock.parent, lock.name):
        with transaction(ctx.session_factory) as session:
            model = models_repo.get_model(session, model_name)
            if model is None:
                raise rounds.UnknownModelError(model_name)
            if model.status != "preparing":
                log.info("model %s is %s: nothing to prepare", model_name, model.status)
                return None
            workload_name = model.workload
            settings = dict(model.settings)
            model_row = model
        try:
            workload = context._load_workload(model_row)
            import shutil

            for stale in (data_dir, store.base_dir, store.adapters_dir, store.state_dir):
                if stale.exists():
                    shutil.rmtree(stale)
            name = version_dir_name(0, int(time.time() * 1000))
            staging = store.staging_dir(name)
            ctx.emit("preparing", model=model_name)
            with _time_limited(ctx, time_limits):
                prepared = prepare(
                    workload,
                    data_dir=data_dir,
                    base_dir=store.base_dir,
                    adapter_dir=staging,
                    settings=settings,
                    seed=ctx.worker_settings.seed,
                    # v1's SSD importance is computed now, so the first request does not wait on it
                    cache_dir=ctx.cache_dir(model_name),
                    # the likelihood-ratio audit's references (settings.audit.reference_adapters)
                    references_dir=ctx.references_dir(model_name),
                )
            base_files = store.upload_base()  # to the object store, if any, before v1 names it
            store.keep_state(staging, name)
            committed = store.commit(
                staging,
                name,
                parent_version=None,
                requests=[],
                evidence={"prepare": prepared.evidence},
                extra={"workload": workload_name, "version": 1},
            )
            with transaction(ctx.session_factory) as session:
                return rounds.register_prepared_model(
                    session,
                    model_name,
                    subjects=prepared.subjects,
                    location=committed.location,
                    files=dict(committed.files),
                    evidence=prepared.evidence,
                    tasks=prepared.tasks,
                    base_location=f"{model_name}/base",
                    base_files=dict(base_files),
                )
        except Exception as exc:
            log.exception("preparing %s failed", model_name)
            with transaction(ctx.session_factory) as session:
                rounds.mark_model_failed(session, model_name, error=f"{type(exc).__name__}: {exc}"[:2000])
            raise


@contextlib.contextmanager
def _time_limited(ctx: WorkerContext, enabled: bool) -> Iterator[None]:
    """The worker's soft / hard time limits around a block (the solo pool ignores Celery's)."""
    if not enabled:
        yield
        return
    ws = ctx.worker_settings
    dog = RoundWatchdog(renew=lambda: None, interval=60.0, soft_limit=ws.soft_time_limit,
                        hard_limit=ws.hard_time_limit)  # fmt: skip
    with dog, dog.interruptible():
        yield
