"""What the app holds for its lifetime, and the FastAPI dependencies that hand it out."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service import digests
from service.api.etag_cache import LatestEtags
from service.api.throttle import AuthFailures
from service.db.session import transaction
from service.dispatch import Dispatcher
from service.sequencer import ChainSequencer
from service.settings import Settings
from service.storage import ArtifactStore, make_store


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    dispatcher: Dispatcher
    auth_failures: AuthFailures
    #: health checks' own connections: they never queue behind request work for the pool
    probe_engine: Engine | None = None
    #: chains submissions' pending events after their commit (None: the next append or reader does)
    sequencer: ChainSequencer | None = None
    #: ETags of the latest adapter per model, for cheap 304s (checked against the database)
    latest_etags: LatestEtags = field(default_factory=LatestEtags)
    _digest_key: bytes | None = None
    _cursor_key: bytes | None = None
    _store: ArtifactStore | None = None

    def store(self) -> ArtifactStore:
        """The artifact store the serving routes read (built once, on first use)."""
        if self._store is None:
            self._store = make_store(self.settings)
        return self._store

    def digest_key(self) -> bytes:
        """The HMAC key of external ids in the event chain (read or created once)."""
        if self._digest_key is None:
            self._digest_key = digests.load_key(self.settings)
        return self._digest_key

    def cursor_key(self) -> bytes:
        """The HMAC key of page cursors (``cursors.Listing``): derived from the digest key, a server
        secret every API process of the deployment shares, so any of them honours a cursor another
        gave; a key of its own, so a cursor's tag says nothing about an external id's digest."""
        if self._cursor_key is None:
            self._cursor_key = hmac.new(self.digest_key(), b"lethe page cursors", hashlib.sha256).digest()
        return self._cursor_key

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """The request boundary's unit of work: commit on success, roll back on error."""
        with transaction(self.sessions) as session:
            yield session

    @contextmanager
    def reads(self) -> Iterator[Session]:
        """Look-ups outside a transaction, for reads that need no snapshot across statements (the
        API key, a conditional GET's check): on PostgreSQL an autocommit connection saves the BEGIN
        and COMMIT round trips. SQLite (in-process, no round trips) uses a normal transaction."""
        if self.engine.dialect.name != "postgresql":
            with self.transaction() as session:
                yield session
            return
        with self.engine.connect() as conn:
            autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
            with self.sessions(bind=autocommit) as session:
                yield session


def get_state(request: Request) -> AppState:
    state = request.app.state.lethe
    assert isinstance(state, AppState)
    return state


State = Annotated[AppState, Depends(get_state)]
