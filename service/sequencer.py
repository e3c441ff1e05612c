"""The API's background sequencer: links submissions' pending events into the hash chain.

A submission commits its events pending (``service.repositories.events.add_pending``) and notes
it here; one thread per API process then chains what is pending, at most every ``gather_seconds``
(under load, one short transaction chains many submissions), and at least every
``interval_seconds`` (events of another process that stopped before chaining them). Between
processes the chain lock is only *tried*: when another sequencer holds it, this one tries again
shortly after instead of queueing behind it.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from service.background import BackgroundThread
from service.db.session import transaction
from service.repositories import events as events_repo

log = logging.getLogger(__name__)
THREAD_NAME = "lethe-chain-sequencer"


class ChainSequencer:
    def __init__(
        self, sessions: sessionmaker[Session], *, interval_seconds: float, gather_seconds: float = 0.2
    ) -> None:
        self.sessions = sessions
        self.interval_seconds = interval_seconds
        self.gather_seconds = gather_seconds
        self._noted = False
        self._background = BackgroundThread(THREAD_NAME)
        self._wakeup = self._background.wakeup

    def start(self) -> None:
        """Start the thread (``interval_seconds`` 0: none; appends and readers still chain)."""
        if self.interval_seconds > 0:
            self._background.start(self._run)

    def note(self) -> None:
        """A submission committed pending events: chain them soon. Never blocks on the database."""
        with self._wakeup:
            self._noted = True
            self._wakeup.notify_all()

    def run_once(self) -> int | None:
        """Chain what is pending: how many events, or None when another sequencer held the lock."""
        chained = 0
        while True:
            with transaction(self.sessions) as session:
                if not events_repo.has_pending(session):
                    return chained
                count = events_repo.chain_pending(session, wait=False)
            if count is None:
                return None if chained == 0 else chained
            chained += count
            if count < events_repo.CHAIN_BATCH:
                return chained

    def _run(self) -> None:
        while True:
            with self._wakeup:
                if not self._noted and not self._background.closing:
                    self._wakeup.wait(self.interval_seconds)
                if self._background.closing:
                    return
                self._noted = False
            try:
                if self.run_once() is None:
                    self.note()  # the holder may not see what committed after its read: again soon
            except Exception:
                log.exception("the chain sequencer failed; it tries again in %s s", self.interval_seconds)
                time.sleep(self.interval_seconds)
            time.sleep(self.gather_seconds)  # let submissions gather: one transaction chains many

    def close(self) -> None:
        self._background.close(timeout=10)
