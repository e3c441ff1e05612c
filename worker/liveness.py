"""Liveness: the worker's heartbeat and the sweeper (the system's only one: the API runs none).

Every worker process runs a background thread (:class:`Heartbeat`) that records a heartbeat (state
``idle`` / ``busy``) and runs the sweep every ``LETHE_WORKER_HEARTBEAT_SECONDS``: wakes for models
with queued requests and no live lease, lost preparations and certifications. At most one wake per
model is outstanding: a Redis marker (shared with the API's dispatcher) is set when a wake is sent
and deleted when a worker starts it."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Callable

import redis
from celery import Celery

from service import rounds
from service.db.session import transaction
from service.db.types import utcnow
from service.dispatch import TASK_CERTIFY, TASK_PREPARE, TASK_WAKE, WAKE_MARKER, WAKE_MARKER_SECONDS
from service.repositories import models as models_repo
from service.settings import Settings
from worker import certification
from worker.context import WorkerContext

log = logging.getLogger(__name__)

WAKE_KEY = WAKE_MARKER  # shared with the API: at most one outstanding wake per model
PREPARE_KEY = "lethe:prepare:{model}"
CERTIFY_KEY = "lethe:certify:{id}"


def heartbeat_age(settings: Settings) -> float:
    """Seconds since a worker of this stack last beat (the age of its alive file); inf if none has.

    The file is ``LETHE_WORKER_ALIVE_FILE`` (default under ``$LETHE_HOME``), so that
    ``lethe worker --check`` never reports another stack's worker."""
    try:
        return time.time() - settings.resolved_worker_alive_file.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def models_to_wake(ctx: WorkerContext) -> list[str]:
    with transaction(ctx.session_factory) as session:
        return rounds.models_to_wake(session)


def heartbeat(ctx: WorkerContext, *, queues: list[str], state: str) -> None:
    with transaction(ctx.session_factory) as session:
        rounds.heartbeat(session, ctx.worker_id, hostname=ctx.hostname, queues=queues, state=state)


def models_to_prepare(ctx: WorkerContext, *, min_age_seconds: float = 60.0) -> list[str]:
    """Models still ``preparing`` a while after registration whose preparation no one runs here.

    The API sends ``lethe.prepare_model`` after registering a model; when that message was lost
    (broker down) or its worker died, the sweeper sends it again. A preparation in progress holds
    the model's prepare lock, beside the dataset store that every worker machine shares: a
    preparation running on another machine is not sent again (a second one would delete and rebuild
    the dataset store under the first).
    """
    from datetime import timedelta

    cutoff = utcnow() - timedelta(seconds=min_age_seconds)
    with transaction(ctx.session_factory) as session:
        names = [
            m.name
            for m in models_repo.list_models(session)
            if m.status == "preparing" and m.created_at <= cutoff
        ]
    idle: list[str] = []
    for name in names:
        lock = ctx.prepare_lock(name)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        idle.append(name)
    return idle


def ready_models(ctx: WorkerContext) -> list[str]:
    with transaction(ctx.session_factory) as session:
        return [m.name for m in models_repo.list_models(session) if m.status == "ready"]


def send_wake(
    app: Celery,
    broker: redis.Redis[bytes] | None,
    model_name: str,
    *,
    dedupe_seconds: int = WAKE_MARKER_SECONDS,
) -> bool:
    """Send ``lethe.wake_model`` unless a wake of the model is outstanding (queued, not started)."""
    if dedupe_seconds > 0 and not _once(broker, WAKE_KEY.format(model=model_name), dedupe_seconds):
        return False
    app.send_task(TASK_WAKE, args=[model_name])
    return True


def wake_started(broker: redis.Redis[bytes] | None, model_name: str) -> None:
    """A worker took the model's wake: it is no longer outstanding, the next one may be sent."""
    if broker is None:
        return
    try:
        broker.delete(WAKE_KEY.format(model=model_name))
    except redis.RedisError:
        log.debug("could not clear the wake marker of %s", model_name, exc_info=True)


def wake_again(app: Celery, model_name: str, broker: redis.Redis[bytes] | None = None) -> None:
    """Continue with the model's next round in a new message.

    A task runs at most one round (or one preparation), each bounded by the hard time limit, so no
    message stays unacknowledged longer than the broker's visibility timeout (hard limit + 600 s)
    and Redis never hands a message that is still being worked on to a second worker. When the
    broker is down the sweeper sends the wake later.
    """
    try:
        send_wake(app, broker, model_name)
    except Exception as exc:
        log.warning("could not send the next wake of %s (%s); the sweeper will", model_name, exc)


def sweep(app: Celery, ctx: WorkerContext, broker: redis.Redis[bytes] | None) -> list[str]:
    """Wake models with queued requests (or an expired round); re-send lost preparations."""
    sent: list[str] = []
    for model_name in models_to_wake(ctx):
        if send_wake(app, broker, model_name):
            sent.append(model_name)
    if sent:
        log.info("sweeper woke %s", sent)
    certification.requeue_stale(ctx)
    for certification_id in certification.requested(ctx, min_age_seconds=60.0):  # a lost message
        if _once(broker, CERTIFY_KEY.format(id=certification_id), 600):
            send_certify(app, certification_id)
    for model_name in models_to_prepare(ctx):
        if _once(broker, PREPARE_KEY.format(model=model_name), 600):
            app.send_task(TASK_PREPARE, args=[model_name])
            log.info("sweeper re-sent the preparation of %s", model_name)
    return sent


def send_certify(app: Celery, certification_id: int) -> None:
    """Send ``lethe.certify_version(certification_id)`` (routed to queue ``lethe.certify``)."""
    try:
        app.send_task(TASK_CERTIFY, args=[certification_id])
    except Exception:
        log.warning("could not send certification %d; the sweeper will", certification_id, exc_info=True)


def _once(broker: redis.Redis[bytes] | None, key: str, seconds: int) -> bool:
    """True at most once per ``seconds`` per key (always True without a Redis client)."""
    if broker is None:
        return True
    try:
        return bool(broker.set(key, "1", nx=True, ex=seconds))
    except redis.RedisError:
        return True


class Heartbeat:
    """Background thread: heartbeat + sweep every ``interval`` seconds."""

    def __init__(
        self, app: Celery, ctx: WorkerContext, *, interval: float, do_sweep: bool, busy: Callable[[], bool]
    ) -> None:
        self.app = app
        self.busy = busy
        self.ctx = ctx
        self.interval = interval
        self.do_sweep = do_sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lethe-heartbeat", daemon=True)
        url = ctx.settings.broker_url
        self.broker: redis.Redis[bytes] | None = None
        if url and url.startswith("redis"):
            self.broker = redis.Redis.from_url(url)

    def start(self) -> None:
        self._thread.start()

    def stop(self, state: str = "stopped") -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            heartbeat(self.ctx, queues=self.ctx.worker_settings.queues, state=state)
        except Exception:
            log.debug("final heartbeat failed", exc_info=True)

    def beat(self) -> None:
        state = "busy" if self.busy() else "idle"
        heartbeat(self.ctx, queues=self.ctx.worker_settings.queues, state=state)
        with contextlib.suppress(OSError):
            alive = self.ctx.settings.resolved_worker_alive_file
            alive.parent.mkdir(parents=True, exist_ok=True)
            alive.touch()
        if self.do_sweep:
            sweep(self.app, self.ctx, self.broker)

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:
                log.warning("heartbeat / sweep failed; retrying", exc_info=True)
            if self._stop.wait(self.interval):
                return
