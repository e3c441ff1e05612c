"""The Celery app of the worker.

Tasks are addressed by name (``lethe.wake_model``, ``lethe.prepare_model``, ``lethe.sweep``,
``lethe.heartbeat``); the API sends them by name with ids only (``service/dispatch.py``), so it
never imports this module. Messages only *wake* workers: the database is the source of truth, so
a lost, duplicated or late message costs nothing (a wake with nothing to claim is a no-op, and the
sweeper re-sends wakes for models with queued requests and no live lease).

Reliability settings (see docs/operations.md):

- ``task_acks_late`` + ``worker_prefetch_multiplier=1``: a worker holds one message at a time and
  acknowledges it after the task returned;
- ``task_reject_on_worker_lost``: a message whose worker died is requeued. The attempt cap lives
  in the database (``service.rounds.claim_round(max_attempts=...)``), not in Celery's redelivery
  count, so a poison request fails after ``LETHE_MAX_ATTEMPTS`` crashes instead of looping;
- Redis ``visibility_timeout`` longer than any task: a task runs one round (``lethe.wake_model``
  then sends the next wake) or one preparation, each bounded by the hard time limit, and the
  timeout is that limit + 600 s;
- the solo pool (CUDA is not fork-safe; one process per GPU). Celery's ``task_time_limit`` and
  ``task_soft_time_limit`` are enforced by the prefork pool only, so with solo the
  :class:`worker.watchdog.RoundWatchdog` thread enforces them (soft: raise in the task thread
  while the engine runs; hard: exit the process, the round is resumed under a new fencing token);
  the Celery limits are set as well for anyone running the prefork pool.

Configuration happens in :func:`configure` at worker start-up (``lethe worker``), never at import;
this module never imports ``worker.tasks`` (the tasks import the app).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from service.dispatch import TASK_CERTIFY, TASK_HEARTBEAT, TASK_PREPARE, TASK_SWEEP, TASK_WAKE
from service.settings import Settings
from worker.config import CERTIFY_QUEUE, GPU_QUEUE, WorkerSettings

#: the tasks of queue ``lethe-gpu``; certification (``TASK_CERTIFY``) has its own queue
TASK_NAMES = (TASK_WAKE, TASK_PREPARE, TASK_SWEEP, TASK_HEARTBEAT)

__all__ = ["TASK_CERTIFY", "TASK_HEARTBEAT", "TASK_NAMES", "TASK_PREPARE", "TASK_SWEEP", "TASK_WAKE", "app"]

#: the worker's app; its tasks are defined on it at module level in ``worker/tasks.py``
app = Celery("lethe", set_as_current=False)


def celery_config(settings: Settings, worker_settings: WorkerSettings) -> dict[str, Any]:
    """The Celery configuration of a worker (and of any client that wants the same routing)."""
    if not settings.broker_url:
        raise ValueError("LETHE_BROKER_URL is not set: a worker needs a broker (redis://...)")
    gpu_exchange = Exchange(GPU_QUEUE, type="direct")
    return {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": worker_settings.hard_time_limit,
        "task_soft_time_limit": worker_settings.soft_time_limit,
        "broker_transport_options": {
            "visibility_timeout": worker_settings.visibility_timeout,
            "socket_timeout": 10,
            "socket_connect_timeout": 10,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": GPU_QUEUE,
        "task_queues": [
            Queue(GPU_QUEUE, gpu_exchange, routing_key=GPU_QUEUE),
            Queue(CERTIFY_QUEUE, Exchange(CERTIFY_QUEUE, type="direct"), routing_key=CERTIFY_QUEUE),
        ],
        "task_routes": {
            **{name: {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE} for name in TASK_NAMES},
            TASK_CERTIFY: {"queue": CERTIFY_QUEUE, "routing_key": CERTIFY_QUEUE},
        },
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "worker_enable_remote_control": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def configure(settings: Settings, worker_settings: WorkerSettings, *, celery: Celery = app) -> Celery:
    """Configure ``celery`` (default: the module's app); the caller starts the tasks' process
    (:func:`worker.tasks.register`)."""
    celery.conf.update(celery_config(settings, worker_settings))
    return celery
