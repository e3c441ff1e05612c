"""After a restore: re-apply every erasure the database records, and report what still disagrees.

A backup brings back what was erased after it was taken: a data store restored from an older backup
holds raw data purged since, artifacts restored from one hold withdrawn versions. For each model,
:func:`reapply_erasures`

1. withdraws active versions older than the newest version that completed a forget request (each
   was trained before that erasure),
2. deletes the files of every withdrawn version still on disk (tombstone first),
3. purges from the data store the data of *every* completed request, whatever the database records
   as purged (purges are idempotent) and records it,
4. optionally moves sealed version directories the database does not know to
   ``<model>/quarantine/`` (never deletes them: they may be the newest intact adapters),
5. checks the database against the artifacts again (``round_job.check_consistency``), which halts
   or resumes the model.

Run it with the workers stopped (docs/operations.md, "Backup and restore").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from service.db.session import transaction
from service.repositories import halts as halts_repo
from service.repositories import models as models_repo
from worker import consistency
from worker.cleanup import delete_withdrawn_files, purge_completed
from worker.context import WorkerContext
from worker.round_job import check_consistency

log = logging.getLogger(__name__)


@dataclass
class ReapplyReport:
    model: str
    withdrawn: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    purged_requests: int = 0
    quarantined: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def reapply_erasures(
    ctx: WorkerContext, model_name: str, *, quarantine_unknown: bool = False
) -> ReapplyReport:
    report = ReapplyReport(model_name)
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, model_name)
        if model is None:
            raise LookupError(f"model {model_name!r} is not registered")
        if model.status != "ready":
            return report  # nothing was published or erased yet
        report.withdrawn = halts_repo.withdraw_superseded(session, model.id)
    report.deleted = delete_withdrawn_files(ctx, model_name)
    # the reference adapters a purge drops are retrained by the worker's next cleanup, when no request
    # waits (worker.cleanup.refresh_dropped_references), not here
    report.purged_requests = len(purge_completed(ctx, model_name, everything=True))
    if quarantine_unknown:
        store = ctx.artifacts(model_name)
        with transaction(ctx.session_factory) as session:
            model = models_repo.get_model(session, model_name)
            assert model is not None
            view = consistency.DatabaseView.load(session, model)
        quarantine = store.model_dir / "quarantine"
        for directory in consistency.foreign_directories(store, view):
            quarantine.mkdir(exist_ok=True)
            os.rename(directory, quarantine / directory.name)
            report.quarantined.append(directory.name)
            log.warning("moved %s to %s: the database does not know it", directory, quarantine)
    report.problems = check_consistency(ctx, model_name)
    return report
