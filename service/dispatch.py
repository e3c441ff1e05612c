"""A torch-free Celery *client*: wakes workers by task name, ids only, after commit.

The messages only wake workers; the database is the source of truth. Sending never raises: when
the broker is down or not configured, the sweeper (``models_to_wake``) sends the wake-up again
later, so a lost message loses nothing and a duplicate doubles nothing.

- Requests never wait on the broker: the API calls :meth:`Dispatcher.wake_soon` /
  :meth:`Dispatcher.prepare_soon`, which only note the model; one background thread publishes
  (many submissions for one model between two sends become one message).
- At most one outstanding wake per model: a Redis marker (``lethe:wake:<model>``, ``SET NX`` with a
  time to live) is taken before a wake is sent, and the worker deletes it when it starts the wake.
  The worker's own wakes (``worker.tasks``) use the same marker.
- One log line per broker outage, not per request: after a failure the dispatcher does not touch
  the broker for ``retry_seconds`` (the sweeper resends what was not sent).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import redis
from celery import Celery

from service.background import BackgroundThread

log = logging.getLogger(__name__)

# Task and queue names: defined here only (the worker imports them; the API never imports the worker).
QUEUE = "lethe-gpu"
TASK_WAKE = "lethe.wake_model"
TASK_PREPARE = "lethe.prepare_model"
#: sent by the worker only (its sweeper and heartbeat)
TASK_SWEEP = "lethe.sweep"
TASK_HEARTBEAT = "lethe.heartbeat"
#: Set while a wake of the model is queued and not yet started by a worker.
WAKE_MARKER = "lethe:wake:{model}"
#: A marker outlives a lost message by at most this long; then the sweeper sends a new wake.
WAKE_MARKER_SECONDS = 300
#: Certification runs on its own queue (low priority, spare GPUs): ``lethe.certify_version(id)``.
CERTIFY_QUEUE = "lethe.certify"
TASK_CERTIFY = "lethe.certify_version"

BrokerState = Literal["ok", "unreachable", "not configured"]


@dataclass
class Dispatcher:
    """Sends ``lethe.wake_model`` / ``lethe.prepare_model`` to queue ``lethe-gpu``."""

    broker_url: str | None
    timeout_seconds: float = 2.0
    retry_seconds: float = 5.0
    marker_seconds: int = WAKE_MARKER_SECONDS
    _app: Celery | None = field(default=None, init=False, repr=False)
    _markers: redis.Redis[bytes] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _down: bool = field(default=False, init=False, repr=False)
    _quiet_until: float = field(default=0.0, init=False, repr=False)
    _pending: dict[tuple[str, str], None] = field(default_factory=dict, init=False, repr=False)
    _busy: int = field(default=0, init=False, repr=False)
    _background: BackgroundThread = field(
        default_factory=lambda: BackgroundThread("lethe-dispatch"), init=False, repr=False
    )

    @property
    def _wakeup(self) -> threading.Condition:
        return self._background.wakeup

    @property
    def enabled(self) -> bool:
        return bool(self.broker_url)

    def _celery(self) -> Celery:
        with self._lock:
            if self._app is None:
                app = Celery("lethe-dispatch", broker=self.broker_url, set_as_current=False)
                app.conf.update(
                    broker_connection_timeout=self.timeout_seconds,
                    broker_connection_retry_on_startup=False,
                    broker_connection_max_retries=0,
                    broker_transport_options={
                        "socket_connect_timeout": self.timeout_seconds,
                        "socket_timeout": self.timeout_seconds,
                        "max_retries": 0,
                    },
                    task_default_queue=QUEUE,
                    task_serializer="json",
                    accept_content=["json"],
                )
                self._app = app
            return self._app

    def _marker_client(self) -> redis.Redis[bytes] | None:
        """A Redis client for the wake markers (None when the broker is not Redis)."""
        with self._lock:
            if (
                self._markers is None
                and self.broker_url
                and self.broker_url.startswith(("redis://", "rediss://"))
            ):
                self._markers = redis.Redis.from_url(
                    self.broker_url,
                    socket_timeout=self.timeout_seconds,
                    socket_connect_timeout=self.timeout_seconds,
                )
            return self._markers

    # --- sending (blocks up to the timeout: the sweeper, the CLI and the publisher thread) ---

    def send(self, task: str, model_name: str) -> bool:
        """Send ``task(model_name)``; False when it could not be sent (logged once per outage)."""
        if not self.broker_url:
            log.debug("no broker configured: %s(%s) not sent; the sweeper will retry", task, model_name)
            return False
        if self._in_outage():
            return False
        try:
            self._celery().send_task(task, args=[model_name], queue=QUEUE, retry=False)
        except Exception as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return True

    def certify(self, certification_id: int) -> bool:
        """Send ``lethe.certify_version(certification_id)`` to queue ``lethe.certify``; False (logged)
        when it could not be sent — the worker's sweeper re-sends requested certifications."""
        if not self.broker_url:
            log.debug("no broker configured: certification %d not sent", certification_id)
            return False
        try:
            self._celery().send_task(TASK_CERTIFY, args=[certification_id], queue=CERTIFY_QUEUE, retry=False)
        except Exception:
            log.warning(
                "could not send certification %d; the sweeper will retry", certification_id, exc_info=True
            )
            return False
        return True

    def wake(self, model_name: str) -> bool:
        """Send a wake unless one is outstanding for the model; True when a message was sent."""
        if not self.broker_url:
            return self.send(TASK_WAKE, model_name)
        if self._in_outage():
            return False
        markers = self._marker_client()
        key = WAKE_MARKER.format(model=model_name)
        if markers is not None:
            try:
                if not markers.set(key, "1", nx=True, ex=self.marker_seconds):
                    return False  # a wake is queued and no worker started it yet
            except redis.RedisError as exc:
                self._failed(exc)
                return False
        if self.send(TASK_WAKE, model_name):
            return True
        if markers is not None:
            try:
                markers.delete(key)  # nothing is outstanding: let the sweeper send it later
            except redis.RedisError:
                log.debug("could not clear the wake marker of %s", model_name, exc_info=True)
        return False

    def prepare(self, model_name: str) -> bool:
        return self.send(TASK_PREPARE, model_name)

    def _in_outage(self) -> bool:
        with self._lock:
            return self._down and time.monotonic() < self._quiet_until

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first = not self._down
            self._down = True
            self._quiet_until = time.monotonic() + self.retry_seconds
        if first:
            log.warning(
                "broker unreachable (%s: %s); wake-ups are sent again by the sweeper once it is back",
                type(exc).__name__, exc,
            )  # fmt: skip
        else:
            log.debug("broker still unreachable: %s", exc)

    def _succeeded(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            log.info("broker reachable again")

    # --- off the request path ---

    def wake_soon(self, model_name: str) -> None:
        """Note that the model needs a wake; the publisher thread sends it. Never blocks."""
        self._post(TASK_WAKE, model_name)

    def prepare_soon(self, model_name: str) -> None:
        self._post(TASK_PREPARE, model_name)

    def _post(self, task: str, model_name: str) -> None:
        if not self.broker_url:
            return
        with self._wakeup:
            if self._background.closing:
                return
            self._pending[(task, model_name)] = None
            self._background.start(self._publish)
            self._wakeup.notify_all()

    def _publish(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._background.closing:
                    self._wakeup.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._busy += 1
            try:
                for task, model_name in batch:
                    if task == TASK_WAKE:
                        self.wake(model_name)
                    else:
                        self.send(task, model_name)
            except Exception:
                log.exception("the dispatch thread failed to send %s", batch)
            finally:
                with self._wakeup:
                    self._busy -= 1
                    self._wakeup.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything noted was handed to the broker (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._wakeup:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wakeup.wait(left)
        return True

    def broker_state(self) -> BrokerState:
        if not self.broker_url:
            return "not configured"
        try:
            with self._celery().connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=max(1, round(self.timeout_seconds)))
        except Exception:
            return "unreachable"
        return "ok"

    def close(self) -> None:
        """Send what is still noted (bounded by the timeouts), then release the connections."""
        self._background.close(timeout=2 * self.timeout_seconds + 1)
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None
            if self._markers is not None:
                self._markers.close()
                self._markers = None
