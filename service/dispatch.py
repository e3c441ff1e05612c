"""A torch-free Celery *client*: wakes workers by task name, ids only, after commit.

The messages only wake workers; the database is the source of truth. Sending never raises: when
the broker is down or not configured, the failure is logged and the sweeper (``models_to_wake``)
sends the wake-up again later, so a lost message loses nothing and a duplicate doubles nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Literal

from celery import Celery

log = logging.getLogger(__name__)

QUEUE = "lethe-gpu"
TASK_WAKE = "lethe.wake_model"
TASK_PREPARE = "lethe.prepare_model"
#: Certification runs on its own queue (low priority, spare GPUs): ``lethe.certify_version(id)``.
CERTIFY_QUEUE = "lethe.certify"
TASK_CERTIFY = "lethe.certify_version"

BrokerState = Literal["ok", "unreachable", "not configured"]


@dataclass
class Dispatcher:
    """Sends ``lethe.wake_model`` / ``lethe.prepare_model`` to queue ``lethe-gpu``."""

    broker_url: str | None
    timeout_seconds: float = 2.0
    _app: Celery | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.broker_url)

    def _celery(self) -> Celery:
        with self._lock:
            return self._celery_locked()

    def _celery_locked(self) -> Celery:
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

    def send(self, task: str, model_name: str) -> bool:
        """Send ``task(model_name)``; False (logged) when it could not be sent."""
        if not self.broker_url:
            log.debug("no broker configured: %s(%s) not sent; the sweeper will retry", task, model_name)
            return False
        try:
            self._celery().send_task(task, args=[model_name], queue=QUEUE, retry=False)
        except Exception:
            log.warning("could not send %s(%s); the sweeper will retry", task, model_name, exc_info=True)
            return False
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
        return self.send(TASK_WAKE, model_name)

    def prepare(self, model_name: str) -> bool:
        return self.send(TASK_PREPARE, model_name)

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
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None
