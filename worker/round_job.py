"""One unlearning round: the worker's side of the queue protocol.

A round (``run_round``)::

    claim (service.rounds.claim_round: lease + fencing token, requests in arrival order)
    → GC orphan directories of crashed attempts (we hold the model's lease)
    → engine.run_round into a staging directory, lease renewed by a watchdog thread
    → mark_verifying → seal the version (artifacts.commit: fsync, manifest, rename)
    → publish_round (checks the fencing token; moves latest; withdraws every earlier active
      version: each of them was trained on the subjects this round forgets; completes requests)
    → delete withdrawn versions' files (tombstones keep their hashes)
    → DataStore.purge + mark_purged
    → the next request's full-data importance of the new version, into the worker's cache (after
      publishing: no request waits for it; best effort).

Crash safety: every step before ``publish_round`` commits is redone by the next attempt (the lease
expires, the round is resumed under a new token, the old attempt's directory is an orphan and
removed). ``publish_round`` is one transaction. Everything after it is idempotent and re-done by
:func:`reconcile` (at the start of every wake and at worker start) if the worker dies in between:
withdrawn versions whose files still exist are deleted, completed requests whose data is not
recorded as purged are purged.

Torch and the ML core are imported lazily (inside functions), so ``lethe worker``'s supervisor and
the CLI's help never load torch.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from service import logs, metrics, rounds
from service.db.models import Model
from service.db.session import transaction
from service.repositories import halts as halts_repo
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo
from service.settings import Settings
from worker import consistency, context
from worker.artifacts import CommittedVersion, ModelArtifacts, version_dir_name
from worker.cleanup import after_publish, reconcile
from worker.context import PermanentRoundError, WorkerContext, _spec
from worker.progress import ThrottledProgress
from worker.watchdog import RoundWatchdog

if TYPE_CHECKING:
    from worker.unlearning.engine import RoundOutcome
    from worker.unlearning.workload import Workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    round_id: int
    fencing_token: int
    requests: list[str]
    version: int | None
    status: str  # published | lease_lost | failed
    withdrawn: list[int] = field(default_factory=list)
    error: str | None = None


def wake_model(ctx: WorkerContext, model_name: str, *, max_rounds: int = 1000) -> list[RoundResult]:
    """Check that the database and the artifacts agree, reconcile, then run the model's rounds
    until nothing is left to claim. A model whose database and artifacts disagree is halted: its
    recorded erasures are still carried out (reconcile), but no round runs."""
    halted = check_consistency(ctx, model_name)
    reconcile(ctx, model_name)
    if halted:
        return []
    results: list[RoundResult] = []
    for _ in range(max_rounds):
        result = run_one_round(ctx, model_name)
        if result is None:
            break
        results.append(result)
        if result.status == "lease_lost":
            break  # someone else holds the model now
    return results


def check_consistency(ctx: WorkerContext, model_name: str) -> list[str]:
    """Compare the database with the model's artifacts; halt the model (``models.halted_reason``, an
    ERROR log line) while they disagree, resume it once they agree. Returns the disagreements.

    Outside a lease another worker may publish meanwhile (new row, withdrawn files deleted), so a
    disagreement counts only if the database did not change while the disk was looked at."""
    store = ctx.artifacts(model_name)
    found: list[str] = []
    for _ in range(3):
        with transaction(ctx.session_factory) as session:
            model = models_repo.get_model(session, model_name)
            if model is None or model.status != "ready":
                return []
            view = consistency.DatabaseView.load(session, model)
        found = consistency.problems(store, view)
        if not found:
            break
        with transaction(ctx.session_factory) as session:
            model = models_repo.get_model(session, model_name)
            if model is not None and consistency.DatabaseView.load(session, model) == view:
                break
    reason = "; ".join(found)[:4000] if found else None
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, model_name)
        changed = model is not None and halts_repo.set_halted(session, model, reason)
    if found:
        log.error(
            "model %s HALTED: its database and artifacts disagree; no round runs and no adapter directory "
            "is deleted until they agree (docs/operations.md, restore): %s", model_name, reason,
        )  # fmt: skip
    elif changed:
        log.warning("model %s resumed: its database and artifacts agree again", model_name)
    return found


def claim(ctx: WorkerContext, model_name: str) -> rounds.ClaimedRound | None:
    s = ctx.settings
    with transaction(ctx.session_factory) as session:
        return rounds.claim_round(
            session,
            model_name,
            ctx.worker_id,
            lease_seconds=s.lease_seconds,
            max_requests=s.max_requests_per_round,
            max_attempts=s.max_attempts,
            max_crashes=s.max_crashes,
        )


def retry_policy(settings: Settings) -> rounds.RetryPolicy:
    return rounds.RetryPolicy(
        max_attempts=settings.max_attempts,
        base_seconds=settings.retry_base_seconds,
        max_seconds=settings.retry_max_seconds,
    )


@dataclass
class _Attempt:
    """The directories one round attempt wrote, for cleanup when it does not publish."""

    staging: Path | None = None
    committed: CommittedVersion | None = None
    #: set just before the publish transaction: from then on the database may name ``committed``
    #: (a commit whose outcome is unknown), so only the orphan GC, which reads the database, may
    #: remove it
    publishing: bool = False

    def discard(self, store: ModelArtifacts) -> None:
        if self.staging is not None:
            store.discard(self.staging)
        if self.committed is not None and not self.publishing:
            store.discard(self.committed.path)


def run_one_round(ctx: WorkerContext, model_name: str) -> RoundResult | None:
    claimed = claim(ctx, model_name)
    if claimed is None:
        return None
    started = time.monotonic()
    with logs.bound(round_id=claimed.round_id, model=model_name):
        result = _run_claimed(ctx, claimed)
    metrics.ROUND_DURATION.labels(model_name, result.status).observe(time.monotonic() - started)
    if result.status == "published":
        metrics.VERSIONS_PUBLISHED.labels(model_name).inc()
        metrics.VERSIONS_WITHDRAWN.labels(model_name).inc(len(result.withdrawn))
    return result


def _run_claimed(ctx: WorkerContext, claimed: rounds.ClaimedRound) -> RoundResult:
    model_name = claimed.model_name
    log.info(
        "round %d of %s claimed (token %d): %s",
        claimed.round_id, model_name, claimed.fencing_token, [r.id for r in claimed.requests],
    )  # fmt: skip
    ctx.emit("claimed", round_id=claimed.round_id, token=claimed.fencing_token)
    store = ctx.artifacts(model_name)
    attempt = _Attempt()
    request_ids = [r.id for r in claimed.requests]
    try:
        done = _run_and_publish(ctx, claimed, store, attempt)
    except rounds.LeaseLost as exc:
        log.warning("round %d: lease lost (%s); discarding its directory", claimed.round_id, exc)
        attempt.publishing = False  # LeaseLost comes before publish_round writes: it rolled back
        attempt.discard(store)
        return RoundResult(claimed.round_id, claimed.fencing_token, request_ids, None, "lease_lost",
                           error=str(exc))  # fmt: skip
    except Exception as exc:  # SoftTimeLimitExceeded is an Exception: retried
        retryable = not isinstance(exc, PermanentRoundError | ValueError | KeyError)
        error = f"{type(exc).__name__}: {exc}"
        log.error("round %d failed (%s): %s", claimed.round_id, "retry" if retryable else "final",
                  traceback.format_exc())  # fmt: skip
        attempt.discard(store)
        try:
            with transaction(ctx.session_factory) as session:
                policy = retry_policy(ctx.settings)
                rounds.fail_round(session, claimed, error=error[:2000], retryable=retryable, retry=policy)
        except rounds.LeaseLost:
            pass
        return RoundResult(claimed.round_id, claimed.fencing_token, request_ids, None, "failed",
                           error=error)  # fmt: skip
    ctx.emit("published", round_id=claimed.round_id, version=done.published.version)
    log.info("round %d published %s v%d; withdrew %s", claimed.round_id, model_name,
             done.published.version, done.withdrawn)  # fmt: skip
    from worker import certification  # a sampled round keeps a snapshot of its forget sets: before the purge

    certification.after_publish(ctx, claimed, done.published)
    after_publish(ctx, model_name, withdrawn=done.withdrawn)
    _compute_next_importance(claimed, done.next_importance)
    return RoundResult(
        claimed.round_id,
        claimed.fencing_token,
        request_ids,
        done.published.version,
        "published",
        done.withdrawn,
    )


def _compute_next_importance(
    claimed: rounds.ClaimedRound, next_importance: Callable[[], float] | None
) -> None:
    """The next request's full-data importance of the version just published, into the worker's
    cache: after publishing, so that no request waits for it. Best effort: when it fails (or another
    worker's round comes first), the next request computes it itself (the cache key is the weights'
    digest, so a stale or missing entry is never used)."""
    if next_importance is None:
        return
    try:
        seconds = next_importance()
    except Exception:
        log.warning("round %d: computing the next importance ahead failed; the next request will",
                    claimed.round_id, exc_info=True)  # fmt: skip
        return
    log.info("round %d: next request's importance computed ahead in %.2f s", claimed.round_id, seconds)


@dataclass(frozen=True)
class _Published:
    """What a published round leaves for the work after publishing."""

    published: rounds.PublishedVersion
    withdrawn: list[int]  # the versions the publish withdrew
    next_importance: Callable[[], float] | None  # the next request's importance, to compute ahead


def _run_and_publish(
    ctx: WorkerContext, claimed: rounds.ClaimedRound, store: ModelArtifacts, attempt: _Attempt
) -> _Published:
    """GC → engine → seal → publish; raises on any failure (the caller cleans up and fails)."""
    model_name = claimed.model_name
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, model_name)
        if model is None:
            raise PermanentRoundError(f"model {model_name} disappeared")
        view = consistency.DatabaseView.load(session, model)
        # the settings the round was claimed with: a reconfiguration applies from the next round
        workload_settings = dict(model.settings if claimed.settings is None else claimed.settings)
        model_row = model
    removed = store.gc_orphans(
        view.locations,
        min_age_seconds=ctx.worker_settings.gc_min_age_seconds,
        spare=lambda directory: consistency.is_foreign(directory, view),
    )
    removed_remote = store.gc_remote_orphans(
        view.locations,
        spare=lambda manifest: manifest is not None and consistency.is_foreign_manifest(manifest, view),
    )
    if removed or removed_remote:
        log.info("removed %d orphan directories of %s", len(removed) + len(removed_remote), model_name)
    if claimed.parent_location is None:
        raise PermanentRoundError(f"model {model_name} has no active version to unlearn from")
    name = version_dir_name(claimed.round_id, claimed.fencing_token)
    staging = attempt.staging = store.staging_dir(name)
    with _watchdog(ctx, claimed) as watchdog:
        with watchdog.interruptible():
            engine = _run_engine(
                ctx, claimed, model=model_row, workload_settings=workload_settings, staging=staging,
                watchdog=watchdog,
            )  # fmt: skip
        outcome = engine.evidence
        watchdog.check()
        ctx.emit("engine_done", round_id=claimed.round_id)
        with transaction(ctx.session_factory) as session:
            rounds.mark_verifying(session, claimed)
            rounds.record_progress(session, claimed, stage="publish", step=0, of=0)
        # the forgotten ids stay worker-side: not in the directory serving hosts download
        store.keep_state(staging, name)
        attempt.committed = store.commit(
            staging, name, parent_version=claimed.parent_version, requests=[r.id for r in claimed.requests],
            evidence=outcome, extra=_manifest_extra(ctx, claimed),
        )  # fmt: skip
        attempt.staging = None
        ctx.emit("committed", round_id=claimed.round_id, path=str(attempt.committed.path))
        watchdog.check()
        attempt.publishing = True
        with transaction(ctx.session_factory) as session:
            model = models_repo.get_model(session, model_name)
            assert model is not None
            withdraw = [
                v.version for v in versions_repo.list_versions(session, model.id) if v.status == "active"
            ]
            published = rounds.publish_round(
                session,
                claimed,
                location=attempt.committed.location,
                files=dict(attempt.committed.files),
                evidence=outcome,
                withdraw_versions=withdraw,
            )
    accepted = [doc.get("acceptance", {}) for doc in outcome.values()]
    if any("continuation" in a for a in accepted):
        metrics.ACCEPTANCE_CONTINUATIONS.labels(model_name).inc()
    if any(a.get("path") == "retrain" for a in accepted):
        metrics.ACCEPTANCE_FALLBACKS.labels(model_name).inc()
    if any(a.get("checked") and a.get("passed") is False for a in accepted):
        # never silent: the version is published (the exact path is the best there is), and counted
        metrics.ACCEPTANCE_FAILED.labels(model_name).inc()
    return _Published(published, withdraw, engine.next_importance)


def _manifest_extra(ctx: WorkerContext, claimed: rounds.ClaimedRound) -> dict[str, Any]:
    """What the manifest records about the attempt that wrote the version."""
    extra: dict[str, Any] = {key: getattr(claimed, key) for key in ("round_id", "fencing_token", "method")}
    extra["worker"] = ctx.worker_id
    return extra


def _watchdog(ctx: WorkerContext, claimed: rounds.ClaimedRound) -> RoundWatchdog:
    lease = ctx.settings.lease_seconds

    def renew() -> None:
        with transaction(ctx.session_factory) as session:
            rounds.renew_lease(session, claimed, lease_seconds=lease)

    # A short lease renewed often: a dead worker's round is taken over within one lease.
    return RoundWatchdog(
        renew=renew,
        interval=ctx.settings.lease_renew_interval,
        soft_limit=ctx.worker_settings.soft_time_limit,
        hard_limit=ctx.worker_settings.hard_time_limit,
        lease_lost_types=(rounds.LeaseLost,),
    )


@dataclass(frozen=True)
class EngineResult:
    evidence: dict[str, dict[str, Any]]  # per request id
    next_importance: Callable[[], float] | None  # RoundOutcome.next_importance


def _run_engine(
    ctx: WorkerContext,
    claimed: rounds.ClaimedRound,
    *,
    model: Model,
    workload_settings: dict[str, Any],
    staging: Path,
    watchdog: RoundWatchdog,
) -> EngineResult:
    from worker.unlearning.workload import deep_merge

    workload = context._load_workload(model)
    settings = dict(workload_settings)
    if claimed.method_config:  # the method's own settings block, merged over settings[method]
        settings = deep_merge(settings, {claimed.method: claimed.method_config})

    def on_progress(done: int, total: int, message: str) -> None:
        watchdog.check()
        ctx.emit("progress", round_id=claimed.round_id, done=done, total=total, message=message)

    def write_stage(stage: str, step: int, of: int) -> None:
        with transaction(ctx.session_factory) as session:
            rounds.record_progress(session, claimed, stage=stage, step=step, of=of)

    stages = ThrottledProgress(write_stage, tolerate=(SQLAlchemyError,))

    def on_stage(stage: str, step: int, of: int) -> None:
        watchdog.check()
        stages(stage, step, of)

    with contextlib.closing(stages):
        outcome = _engine_round(ctx, claimed, model, workload, settings, staging, on_progress, on_stage)
    return EngineResult({rid: dict(doc) for rid, doc in outcome.evidence.items()}, outcome.next_importance)


def _engine_round(
    ctx: WorkerContext,
    claimed: rounds.ClaimedRound,
    model: Model,
    workload: Workload,
    settings: dict[str, Any],
    staging: Path,
    on_progress: Callable[[int, int, str], None],
    on_stage: Callable[[str, int, int], None],
) -> RoundOutcome:
    from worker.unlearning.engine import run_round

    store = ctx.artifacts(claimed.model_name)
    assert claimed.parent_location is not None
    return run_round(
        workload,
        data_dir=ctx.data_dir(claimed.model_name),
        # from the object store when another machine wrote them (a no-op with the local store)
        base_dir=store.fetch_base(model.base_files),
        adapter_in=store.fetch_version(claimed.parent_location),
        adapter_out=staging,
        requests=[_spec(r) for r in claimed.requests],
        method=claimed.method,
        settings=settings,
        seed=ctx.worker_settings.seed,
        device=ctx.device,
        cache_dir=ctx.cache_dir(claimed.model_name),
        on_progress=on_progress,
        state_in=store.fetch_state(claimed.parent_location),
        on_stage=on_stage,
        references_dir=ctx.references_dir(claimed.model_name),
        defer_next_importance=True,  # run by _run_claimed once the version is published
    )
