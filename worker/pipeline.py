"""The worker's jobs under their former names (``worker.pipeline``), for callers and tests.

Each job has its own module: the round (:mod:`worker.round_job`: claim → engine → seal → publish),
cleanup after publishing (:mod:`worker.cleanup`: withdrawn files, purge, reconcile), preparation
(:mod:`worker.preparation`: a model's base and v1) and liveness (:mod:`worker.liveness`: heartbeat,
what the sweeper asks). What they share is :mod:`worker.context`.
"""

from __future__ import annotations

from worker.cleanup import after_publish, delete_withdrawn_files, purge_completed, reconcile
from worker.context import PermanentRoundError, WorkerContext, model_lock
from worker.liveness import heartbeat, models_to_prepare, models_to_wake, ready_models
from worker.preparation import prepare_model
from worker.round_job import RoundResult, check_consistency, claim, retry_policy, run_one_round, wake_model

__all__ = [
    "PermanentRoundError",
    "RoundResult",
    "WorkerContext",
    "after_publish",
    "check_consistency",
    "claim",
    "delete_withdrawn_files",
    "heartbeat",
    "model_lock",
    "models_to_prepare",
    "models_to_wake",
    "prepare_model",
    "purge_completed",
    "ready_models",
    "reconcile",
    "retry_policy",
    "run_one_round",
    "wake_model",
]
