"""Celery tasks, defined at module level on the worker's app (``worker.celery_app.app``), by name.

:func:`register` (at worker start-up) gives them their settings and connects the process's hooks.

- ``lethe.wake_model(model_name)``: reconcile, run the model's next round, and send another wake
  when a round ran (one round per message: see :func:`wake_again`);
- ``lethe.prepare_model(model_name)``: dataset, base, v1, register (status ``ready``);
- ``lethe.certify_version(certification_id)`` (queue ``lethe.certify``): certify a published version
  off the request path (``worker/certification.py``);
- ``lethe.sweep()``: send ``lethe.wake_model`` for every model with queued requests and no live lease
  (and re-send certifications still requested a minute later);
- ``lethe.heartbeat()``: record this worker's heartbeat now.

Every worker process also sends the due webhook deliveries in a thread of its own
(``service.webhooks.sender.SenderThread``): never in a round's thread, never on the API's request path.

Every worker process also runs the heartbeat thread (``worker.liveness.Heartbeat``, started when
the worker is ready): heartbeat and sweep every ``LETHE_WORKER_HEARTBEAT_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
from contextvars import Token
from typing import Any, ClassVar

import redis
from celery import signals

from service import logs
from service.settings import Settings
from service.webhooks.sender import Sender, SenderThread
from worker import certification, liveness, preparation, round_job
from worker.celery_app import TASK_CERTIFY, TASK_HEARTBEAT, TASK_PREPARE, TASK_SWEEP, TASK_WAKE, app
from worker.cleanup import reconcile
from worker.config import WorkerSettings
from worker.context import WorkerContext
from worker.liveness import Heartbeat, send_certify, sweep, wake_again, wake_started

log = logging.getLogger(__name__)


class _State:
    settings: Settings | None = None
    worker_settings: WorkerSettings | None = None
    ctx: WorkerContext | None = None
    busy = 0
    lock = threading.Lock()
    heartbeat: Heartbeat | None = None
    webhooks: SenderThread | None = None
    log_tokens: ClassVar[dict[str, Token[dict[str, Any]]]] = {}


class _Busy:
    def __enter__(self) -> None:
        with _State.lock:
            _State.busy += 1

    def __exit__(self, *exc: object) -> None:
        with _State.lock:
            _State.busy -= 1


def _ctx() -> WorkerContext:
    """The process's worker context, created on first use from the settings given to :func:`register`."""
    if _State.ctx is None:
        if _State.settings is None or _State.worker_settings is None:
            raise RuntimeError("worker tasks are not registered (call worker.tasks.register)")
        _State.ctx = WorkerContext.create(_State.settings, _State.worker_settings)
    return _State.ctx


def _broker() -> redis.Redis[bytes] | None:
    return _State.heartbeat.broker if _State.heartbeat else None


@app.task(name=TASK_WAKE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def wake_model(model_name: str) -> dict[str, Any]:
    broker = _broker()
    wake_started(broker, model_name)
    with logs.bound(model=model_name), _Busy():
        results = round_job.wake_model(_ctx(), model_name, max_rounds=1)
    if results and results[-1].status != "lease_lost":
        wake_again(app, model_name, broker)
    for certification_id in certification.requested(_ctx(), model_name=model_name):  # sampled rounds
        send_certify(app, certification_id)
    return {"rounds": [r.round_id for r in results], "versions": [r.version for r in results]}


@app.task(name=TASK_PREPARE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def prepare_model(model_name: str) -> dict[str, Any]:
    with logs.bound(model=model_name), _Busy():
        published = preparation.prepare_model(_ctx(), model_name)
    if published is not None:
        wake_again(app, model_name, _broker())  # requests accepted while the model was preparing
    return {"version": published.version if published else None}


@app.task(name=TASK_CERTIFY, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def certify_version(certification_id: int) -> dict[str, Any]:
    with logs.bound(certification_id=certification_id), _Busy():
        status = certification.run_certification(_ctx(), certification_id)
    return {"certification": certification_id, "status": status}


@app.task(name=TASK_SWEEP, ignore_result=True)
def sweep_task() -> list[str]:
    return sweep(app, _ctx(), _broker())


@app.task(name=TASK_HEARTBEAT, ignore_result=True)
def heartbeat_task() -> None:
    ctx = _ctx()
    liveness.heartbeat(ctx, queues=ctx.worker_settings.queues, state="busy" if _State.busy else "idle")


# every log line of a task carries its Celery task id (solo pool: one task at a time, one thread)
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    _State.log_tokens[task_id or ""] = logs.bind(task_id=task_id, task=getattr(task, "name", None))


def _unbind_task(task_id: str | None = None, **_: Any) -> None:
    token = _State.log_tokens.pop(task_id or "", None)
    if token is not None:
        logs.unbind(token)


def _on_ready(**_: Any) -> None:
    c = _ctx()
    worker_settings = c.worker_settings
    log.info("worker %s ready on %s (device %s)", c.worker_id, worker_settings.queues, c.device)
    for model_name in liveness.ready_models(c):
        reconcile(c, model_name)
    # warm up: import torch, peft and the ML core now rather than in the first round (no CUDA
    # initialisation happens on import)
    import worker.unlearning.engine
    import worker.unlearning.methods  # noqa: F401

    hb = Heartbeat(
        app,
        c,
        interval=worker_settings.heartbeat_seconds,
        do_sweep=worker_settings.sweep,
        busy=lambda: _State.busy > 0,
    )
    _State.heartbeat = hb
    hb.start()
    # webhook deliveries: their own thread, so a slow receiver delays neither rounds nor heartbeats
    _State.webhooks = SenderThread(
        Sender(c.session_factory, c.settings), interval=c.settings.webhook_poll_seconds
    )
    _State.webhooks.start()


def _on_shutdown(**_: Any) -> None:
    if _State.heartbeat is not None:
        _State.heartbeat.stop()
    if _State.webhooks is not None:
        _State.webhooks.stop()


def register(settings: Settings, worker_settings: WorkerSettings) -> None:
    """Start-up of a worker process: the settings of its context and the hooks of its lifecycle.

    The tasks themselves are defined on :data:`worker.celery_app.app` when this module is imported.
    """
    _State.settings = settings
    _State.worker_settings = worker_settings
    signals.task_prerun.connect(_bind_task, weak=False)
    signals.task_postrun.connect(_unbind_task, weak=False)
    signals.worker_ready.connect(_on_ready, weak=False)
    signals.worker_shutdown.connect(_on_shutdown, weak=False)
