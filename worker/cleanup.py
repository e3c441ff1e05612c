"""After a round publishes: delete the withdrawn versions' files, purge the forgotten raw data,
then retrain the reference adapters the purge dropped — background work that yields to requests.

Idempotent; :func:`reconcile` redoes all three at every wake and at worker start, so a worker that
died between ``publish_round`` and the purge loses nothing (docs/architecture.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from service import rounds
from service.db.models import ForgetRequest, Model, Sample
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import versions as versions_repo
from worker.context import WorkerContext, _spec, model_lock

if TYPE_CHECKING:
    from worker.unlearning.datastore import DataStore

log = logging.getLogger(__name__)


def after_publish(ctx: WorkerContext, model_name: str, *, withdrawn: list[int]) -> None:
    """Delete the withdrawn versions' files, then purge. A failure here is logged, not raised: the
    version is published and the requests are completed; :func:`reconcile` finishes the job."""
    try:
        delete_withdrawn_files(ctx, model_name)
        ctx.emit("withdrawn_deleted", versions=withdrawn)
        purge_completed(ctx, model_name)
        ctx.emit("purged")
        refresh_dropped_references(ctx, model_name)
    except Exception:
        log.exception("after publishing %s: cleanup failed; the next wake reconciles it", model_name)


def reconcile(ctx: WorkerContext, model_name: str) -> None:
    """Finish what a crash after a publish left undone (files of withdrawn versions, purges, the
    references a purge dropped: while requests wait, those are left for the next idle moment)."""
    try:
        delete_withdrawn_files(ctx, model_name)
        purge_completed(ctx, model_name)
        refresh_dropped_references(ctx, model_name)
    except Exception:
        log.exception("reconciling %s failed; will retry at the next wake", model_name)


def delete_withdrawn_files(ctx: WorkerContext, model_name: str) -> list[int]:
    store = ctx.artifacts(model_name)
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, model_name)
        if model is None:
            return []
        todo = [
            (v.version, v.location)
            for v in versions_repo.list_versions(session, model.id)
            if v.status == "withdrawn"
        ]
    done: list[int] = []
    stored = store.stored_versions() if todo else set()  # one listing of the object store, if any
    for version, location in todo:
        left = store.resolve(location).exists() or Path(location).name in stored
        if left or store.read_tombstone(version) is None:
            store.delete_version(version, location, reason="withdrawn: contains a forgotten subject")
            done.append(version)
    return done


def _pending_purges(session: Session, model: Model) -> list[ForgetRequest]:
    """Completed requests whose raw data is not yet recorded as purged.

    A fixed number of statements however long the history: only completed requests without a
    recorded purge are read (a partial index), their samples in one query; those found purged
    already (e.g. by a wider request) are recorded now, so the next wake does not read them again.
    """
    completed = requests_repo.unpurged_completed(session, model.id)
    if not completed:
        return []
    clients = {r.client_id for r in completed if r.client_id is not None}
    purged_clients = models_repo.purged_client_ids(session, model.id, clients)
    wanted_samples = {s for r in completed if r.sample_ids is not None for s in r.sample_ids}
    wanted_clients = {r.client_id for r in completed if r.sample_ids is None and r.client_id is not None}
    samples = models_repo.samples_of(session, model.id, sample_ids=wanted_samples, client_ids=wanted_clients)
    by_id = {s.sample_id: s for s in samples}
    by_client: dict[str, list[Sample]] = {}
    for sample in samples:
        by_client.setdefault(sample.client_id, []).append(sample)
    pending: list[ForgetRequest] = []
    done: list[str] = []
    for req in completed:
        tasks = list(req.tasks) or list(model.tasks)
        if req.client_id is not None and req.client_id in purged_clients:
            done.append(req.id)  # the whole client is gone
            continue
        if req.kind == "client" and req.sample_ids is None and set(tasks) >= set(model.tasks):
            pending.append(req)  # whole client, not yet purged
            continue
        if req.sample_ids is not None:
            covered = [by_id[s] for s in req.sample_ids if s in by_id]
        else:
            covered = by_client.get(req.client_id or "", [])
        if any(_purge_due(s, tasks, model.tasks) for s in covered):
            pending.append(req)
        else:
            done.append(req.id)
    requests_repo.mark_purged(session, done, at=utcnow())
    return pending


def _purge_due(sample: Sample, tasks: list[str], all_tasks: list[str]) -> bool:
    """Whether a request's purge is still due for ``sample``: labels of its tasks left, or every
    label purged but not the inputs (nothing of it is kept, so they go too; a store purged before
    inputs were deleted so is caught up here)."""
    if sample.purged:
        return False
    purged = set(sample.purged_tasks)
    return not set(tasks) <= purged or (bool(all_tasks) and purged >= set(all_tasks))


def purge_completed(ctx: WorkerContext, model_name: str, *, everything: bool = False) -> list[str]:
    """Purge the raw data of completed requests not yet purged; record it (mark_purged).
    ``everything``: of every completed request, whatever the database records as purged (after a
    data store was restored from a backup, it holds data that was purged since)."""
    data_dir = ctx.data_dir(model_name)
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, model_name)
        if model is None or model.status != "ready":
            return []
        todo = requests_repo.completed(session, model.id) if everything else _pending_purges(session, model)
        pending = [_spec(r) for r in todo]
    if not pending:
        return []
    from worker.unlearning.datastore import DataStore
    from worker.unlearning.reference_adapters import drop_references_with

    with model_lock(data_dir):
        store = DataStore(data_dir)
        clients: list[str] = []
        pairs: list[tuple[str, str]] = []
        for spec in pending:
            resolved = store.resolve(spec)
            if resolved.whole_client and resolved.client_id is not None:
                clients.append(resolved.client_id)
            else:
                pairs.extend((s, t) for s in resolved.sample_ids for t in resolved.forget_tasks)
        # a reference adapter of the likelihood-ratio audit trained on forgotten data keeps it:
        # drop those before the data goes (every forgotten client's OUT references stay)
        touched = set(clients) | _owners(store, {s for s, _ in pairs})
        drop_references_with(ctx.references_dir(model_name), touched)
        report = store.purge(pending)
    ctx.emit("store_purged", requests=[s.request_id for s in pending])
    with transaction(ctx.session_factory) as session:
        rounds.mark_purged(
            session,
            model_name,
            client_ids=sorted(set(clients)),
            sample_tasks=sorted(set(pairs)),
            request_ids=[s.request_id for s in pending],
        )
    # request ids only: the subjects' ids are personal data and stay out of the logs
    log.info(
        "purged %s for requests %s (%d clients, %d samples, %d labels deleted)", model_name,
        [s.request_id for s in pending], len(report.deleted_clients), len(report.deleted_samples),
        len(report.purged_pairs),
    )  # fmt: skip
    return [s.request_id for s in pending]


#: how often a background refresh asks the database whether a request of its model is waiting
WAITING_CHECK_SECONDS = 1.0


def refresh_dropped_references(ctx: WorkerContext, model_name: str) -> list[int]:
    """Retrain the reference adapters that purges dropped (:func:`refresh_references`), unless a
    request of the model is waiting, and stop as soon as one arrives: a reference retrain costs
    about half an adapter retrain (about 30 s on ``scenes``), and the next request must not wait
    for it. What is left stays dropped until the next round's cleanup finds the queue empty;
    meanwhile the audit and the early-stopping targets use the references left (a client without
    an OUT reference gets the constant target, named in its evidence). Returns the indices
    retrained."""
    from worker.unlearning.reference_adapters import read_references

    refs = read_references(ctx.references_dir(model_name))
    if refs is None or len(refs.members) == refs.k:
        return []
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, model_name)
        if model is None or model.status != "ready":
            return []
        model_id = model.id
        recipe = (model.workload, dict(model.workload_options or {}), dict(model.settings),
                  dict(model.base_files))  # fmt: skip
    watch = QueueWatch(ctx, model_id)
    done = refresh_references(ctx, model_name, *recipe, should_stop=watch)
    if watch.waiting and len(done) < refs.k - len(refs.members):
        log.info("refresh of %s's reference adapters yielded to a waiting request (%d retrained)",
                 model_name, len(done))  # fmt: skip
        ctx.emit("references_refresh_deferred", references=done)
    return done


class QueueWatch:
    """A cheap ``should_stop`` for background work: whether the model has a queued request, read
    from the database at most every :data:`WAITING_CHECK_SECONDS`. Once seen, ``waiting`` stays
    true (the work stopped for it)."""

    def __init__(self, ctx: WorkerContext, model_id: int) -> None:
        self.ctx, self.model_id = ctx, model_id
        self.waiting = False
        self._checked_at = -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.waiting and now - self._checked_at >= WAITING_CHECK_SECONDS:
            with transaction(self.ctx.session_factory) as session:
                self.waiting = requests_repo.queue_stats(session, self.model_id)[0] > 0
            self._checked_at = now
        return self.waiting


def refresh_references(
    ctx: WorkerContext,
    model_name: str,
    workload_name: str,
    workload_options: dict[str, Any],
    settings: dict[str, Any],
    base_files: dict[str, Any],
    *,
    should_stop: Callable[[], bool] | None = None,
) -> list[int]:
    """Retrain the likelihood-ratio audit's reference adapters that the purge dropped, each on its
    half of the clients minus the forgotten ones, from the store as purged (so no forgotten data can
    enter one). Off the request path (the requests are completed and published), under the model's
    lock (a concurrent purge must not drop a reference while it is rewritten), which rounds do not
    take. ``should_stop``: yield (the reference in training is discarded; those finished stay).
    Called when some are dropped (:func:`refresh_dropped_references` read the set); a complete set
    trains nothing (``refresh_from_store`` reads it again under the lock). A failure is logged:
    the audit and targets use the references left, and the next cleanup tries again."""
    directory = ctx.references_dir(model_name)
    from worker.unlearning.reference_adapters import refresh_from_store
    from worker.unlearning.workload import build_workload

    try:
        workload = build_workload(workload_name, workload_options)
        base_dir = ctx.artifacts(model_name).fetch_base(base_files)
        with model_lock(ctx.data_dir(model_name)):
            done = refresh_from_store(
                workload, data_dir=ctx.data_dir(model_name), base_dir=base_dir, directory=directory,
                settings=settings, device=ctx.device, should_stop=should_stop,
            )  # fmt: skip
    except Exception:
        log.exception("refreshing the reference adapters of %s failed; the next cleanup retries", model_name)
        return []
    if done:
        log.info("refreshed reference adapters %s of %s", done, model_name)
        ctx.emit("references_refreshed", references=done)
    return done


def _owners(store: DataStore, sample_ids: set[str]) -> set[str]:
    """The active clients holding any of ``sample_ids``."""
    if not sample_ids:
        return set()
    return {c for c in store.active_clients if sample_ids & set(store.sample_ids_of(c))}
