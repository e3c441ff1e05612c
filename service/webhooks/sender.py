"""Sends due webhook deliveries: claim (short transaction), POST (no transaction held), record.

Runs in a worker's own thread (:class:`SenderThread`), never on the API's request path and never
in a round's thread. Every worker may run one: a delivery is claimed by moving its due time past
the send's timeout (compare and set), so two senders do not send it at once, and one whose sender
died becomes due again. A receiver that does not answer 2xx is retried with exponential backoff
(``LETHE_WEBHOOK_RETRY_BASE_SECONDS`` doubling, equal jitter, at most
``LETHE_WEBHOOK_RETRY_MAX_SECONDS``) until ``LETHE_WEBHOOK_MAX_ATTEMPTS``; then it is ``failed``
(``POST .../replay`` queues it again). Delivery is at least once: receivers deduplicate on
``webhook-id``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from cryptography.exceptions import InvalidTag
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import transaction
from service.db.types import utcnow
from service.fileio import canonical_json
from service.repositories import webhooks as webhooks_repo
from service.rounds import RetryPolicy
from service.settings import Settings
from service.webhooks.addresses import AddressRefused, check_resolved
from service.webhooks.signing import SecretBox, signature

log = logging.getLogger(__name__)
USER_AGENT = "Lethe-Webhooks/1"


@dataclass(frozen=True)
class _Job:
    delivery_id: str
    url: str
    secret: str | None
    body: bytes


@dataclass(frozen=True)
class Outcome:
    delivery_id: str
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def body_bytes(payload: object) -> bytes:
    return canonical_json(payload, allow_nan=True).encode("utf-8")


class Sender:
    def __init__(
        self,
        factory: sessionmaker[Session],
        settings: Settings,
        *,
        client: httpx.Client | None = None,
        box: SecretBox | None = None,
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.box = box or SecretBox.from_settings(settings)
        self.client = client or httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
        )
        self.retry = RetryPolicy(
            max_attempts=settings.webhook_max_attempts,
            base_seconds=settings.webhook_retry_base_seconds,
            max_seconds=settings.webhook_retry_max_seconds,
        )

    def close(self) -> None:
        self.client.close()

    def run_once(self, *, now: datetime | None = None, limit: int = 20) -> list[Outcome]:
        """Send the deliveries due at ``now`` (at most ``limit``); their outcomes."""
        now = now or utcnow()
        outcomes = []
        for job in self._claim(now, limit):
            outcome, duration_ms = self._send(job)
            self._record(outcome, duration_ms=duration_ms)
            outcomes.append(outcome)
        return outcomes

    def _claim(self, now: datetime, limit: int) -> list[_Job]:
        until = now + timedelta(seconds=self.settings.webhook_timeout_seconds + 60)
        jobs = []
        with transaction(self.factory) as session:
            for row in webhooks_repo.due(session, now=now, limit=limit):
                if not webhooks_repo.claim(session, row, until=until):
                    continue
                hook = webhooks_repo.get(session, row.webhook_id)
                assert hook is not None  # a delivery is deleted with its webhook
                try:
                    secret: str | None = self.box.open(hook.secret_ciphertext, webhook_id=hook.id)
                except (InvalidTag, ValueError):
                    secret = None
                jobs.append(_Job(row.id, hook.url, secret, body_bytes(row.payload)))
        return jobs

    def _send(self, job: _Job) -> tuple[Outcome, int]:
        started = time.monotonic()
        if job.secret is None:
            error = "the signing secret cannot be decrypted (was LETHE_WEBHOOK_SECRET_KEY changed?)"
            return Outcome(job.delivery_id, None, error), 0
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": job.delivery_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(job.secret, job.delivery_id, timestamp, job.body),
        }
        try:
            if not self.settings.webhook_allow_private_addresses:
                check_resolved(job.url)
            # stream: the receiver's answer body is never read (it may be large)
            with self.client.stream("POST", job.url, content=job.body, headers=headers) as response:
                outcome = Outcome(job.delivery_id, response.status_code, None)
        except AddressRefused as exc:
            outcome = Outcome(job.delivery_id, None, f"refused: {exc}")
        except httpx.HTTPError as exc:
            outcome = Outcome(job.delivery_id, None, f"{type(exc).__name__}: {exc}"[:500])
        return outcome, int((time.monotonic() - started) * 1000)

    def _record(self, outcome: Outcome, *, duration_ms: int) -> None:
        now = utcnow()
        with transaction(self.factory) as session:
            row = webhooks_repo.get_delivery(session, outcome.delivery_id)
            if row is None:  # its webhook was deleted meanwhile
                return
            error = outcome.error
            if error is None and not outcome.ok:
                error = f"HTTP {outcome.status_code}"
            webhooks_repo.add_attempt(
                session,
                delivery_id=row.id,
                at=now,
                status_code=outcome.status_code,
                error=error,
                duration_ms=duration_ms,
            )
            if outcome.ok:
                row.status, row.delivered_at, row.next_attempt_at = "delivered", now, None
                log.info("webhook delivery %s delivered", row.id)
                return
            row.attempts += 1
            if row.attempts >= self.retry.max_attempts:
                row.status, row.next_attempt_at = "failed", None
                log.warning("webhook delivery %s failed after %d attempts: %s", row.id, row.attempts, error)
            else:
                row.next_attempt_at = now + timedelta(seconds=self.retry.delay(row.attempts))
                log.info("webhook delivery %s attempt %d failed (%s); retrying", row.id, row.attempts, error)


class SenderThread:
    """A daemon thread that runs :meth:`Sender.run_once` every ``LETHE_WEBHOOK_POLL_SECONDS``."""

    batch = 20

    def __init__(self, sender: Sender, *, interval: float) -> None:
        self.sender = sender
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lethe-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.sender.settings.webhook_timeout_seconds + 5)
        self.sender.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # a full batch: more may be due, go on at once; else wait (no busy loop on failures)
                busy = len(self.sender.run_once(limit=self.batch)) >= self.batch
            except Exception:
                log.warning("webhook delivery failed; retrying", exc_info=True)
                busy = False
            if not busy and self._stop.wait(self.interval):
                return
