"""Task and queue names, ``FileDigest``, canonical JSON and fsync are defined once (issue 10, part 8).

Defect: the task and queue names were spelled in ``service/dispatch.py``, ``worker/celery_app.py``
and ``worker/config.py``; ``FileDigest`` in ``service/rounds.py`` and ``worker/artifacts.py`` (with a
conversion between the two); canonical JSON in three modules; ``os.fsync`` of an open file in four.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service import dispatch, fileio, rounds
from worker import artifacts, celery_app, config

ROOT = Path(__file__).resolve().parents[2]
#: the service and the worker, not the ML core (``worker/unlearning`` writes its own files)
SOURCES = sorted(
    p for p in [*(ROOT / "service").rglob("*.py"), *(ROOT / "worker").glob("*.py")] if p.is_file()
)


def _spelled_in(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [str(p.relative_to(ROOT)) for p in SOURCES if regex.search(p.read_text())]


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (
            r"[\"']lethe\.(wake_model|prepare_model|sweep|heartbeat|certify_version|certify)[\"']",
            "service/dispatch.py",
        ),
        (r"[\"']lethe-gpu[\"']", "service/dispatch.py"),
        (r"os\.fsync\(", "service/fileio.py"),
        (r"json\.dumps\([^)]*separators=\(\",\", ?\":\"\)", "service/fileio.py"),
        (r"class FileDigest\b", "service/fileio.py"),
    ],
)
def test_spelled_once(pattern: str, home: str) -> None:
    assert _spelled_in(pattern) == [home]


def test_one_object_under_every_name() -> None:
    assert rounds.FileDigest is fileio.FileDigest
    assert type(artifacts.sha256_file(Path(__file__))) is fileio.FileDigest
    assert (celery_app.TASK_WAKE, celery_app.TASK_CERTIFY) == (dispatch.TASK_WAKE, dispatch.TASK_CERTIFY)
    assert (config.GPU_QUEUE, config.CERTIFY_QUEUE) == (dispatch.QUEUE, dispatch.CERTIFY_QUEUE)
    assert artifacts.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_the_worker_runs_no_sql_of_its_own() -> None:
    """Defect: ``worker/pipeline.py``, ``worker/certification.py`` and ``worker/demo.py`` built
    their own queries; the worker's SQL lives in ``service/repositories``."""
    worker = [p for p in SOURCES if p.parent.name == "worker"]
    assert len(worker) > 10
    sql = re.compile(r"\bselect\(|\bsession\.(execute|scalars?)\(|from sqlalchemy import .*\bselect\b")
    assert [str(p.relative_to(ROOT)) for p in worker if sql.search(p.read_text())] == []
