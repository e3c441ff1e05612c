"""The HMAC key of external ids in the event chain (issue 9 item 12)."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import SecretStr

from service import digests
from service.settings import Settings


def test_first_use_creates_one_complete_private_key_under_concurrency(tmp_path: Path) -> None:
    """Concurrent first uses agree on one key and never read a half-written file (an empty key
    file answered 500 to concurrent submissions before the key was linked into place whole)."""
    settings = Settings(home=tmp_path / "home")
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: digests.load_key(settings), range(64)))
    assert len(set(keys)) == 1
    assert len(keys[0]) == 64
    path = tmp_path / "home" / digests.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [digests.KEY_FILE]  # no temporary files left
    assert digests.load_key(settings) == keys[0]


def test_configured_key_wins_and_digests_are_keyed(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", event_digest_key=SecretStr("s3cret"))
    assert digests.load_key(settings) == b"s3cret"
    assert not (tmp_path / "home").exists()
    assert digests.keyed_digest(b"a", "DSR-1") != digests.keyed_digest(b"b", "DSR-1")
