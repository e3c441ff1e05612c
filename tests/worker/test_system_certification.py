"""Certification through the real stack (issue 8 part 5): API process, Celery worker process, Redis.

With ``LETHE_CERTIFY_SHARE=1`` the round's certification is sampled, sent on queue
``lethe.certify`` and run by the worker off the request path: the request completes first, then the
version gets its certification (listed in the admin model view), the request an evidence row and a
chained event. An on-demand certification through the endpoint, after the purge, ends incomplete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker.system import MODEL, System, prepare_template, running_system

pytestmark = [pytest.mark.redis, pytest.mark.timeout(400)]

DONE = {"certified", "flagged", "incomplete", "failed"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_template(tmp_path_factory.mktemp("lethe-template") / "home")


def _certification(system: System, version: int) -> dict[str, Any] | None:
    resp = system.http.get(f"{system.api}/v1/admin/models/{MODEL}")
    assert resp.status_code == 200, resp.text
    found: dict[str, Any] | None = {v["version"]: v for v in resp.json()["versions"]}[version][
        "certification"
    ]
    return found


def test_sampled_round_is_certified_by_the_worker_then_on_demand(
    template: Path, tmp_path: Path, redis_server_url: str
) -> None:
    with running_system(
        template, tmp_path / "home", redis_server_url, env={"LETHE_CERTIFY_SHARE": "1"}
    ) as system:
        request_id = system.submit({"kind": "client", "client_id": "c1"})
        body = system.wait(request_id, {"completed", "failed"})
        assert body["status"] == "completed", system.logs()
        system.wait_until(lambda: (c := _certification(system, 2)) is not None and c["status"] in DONE, 180)
        cert = _certification(system, 2)
        assert cert is not None
        assert cert["trigger"] == "sampled"
        assert cert["status"] in {"certified", "flagged"}, system.logs()  # from the snapshot: complete
        evidence = system.http.get(f"{system.api}/v1/forget-requests/{request_id}/evidence").json()
        assert [e["payload"]["kind"] for e in evidence] == ["client", "certification"]
        assert evidence[1]["payload"]["uis"]["value"] is not None
        events = [
            e["type"] for e in system.http.get(f"{system.api}/v1/forget-requests/{request_id}/events").json()
        ]
        assert events[-1] in {"certified", "flagged"}
        assert not (system.data_dir / "certification" / "round-1").exists()  # snapshot deleted

        resp = system.http.post(f"{system.api}/v1/admin/models/{MODEL}/versions/2/certify")
        assert resp.status_code == 202, resp.text
        on_demand = resp.json()["id"]
        system.wait_until(
            lambda: (
                (c := _certification(system, 2)) is not None and c["id"] == on_demand and c["status"] in DONE
            ),
            180,
        )
        cert = _certification(system, 2)
        assert cert is not None
        assert cert["status"] == "incomplete", (
            system.logs()
        )  # purged, no snapshot: forget-set terms unavailable
        assert system.http.get(f"{system.api}/v1/admin/audit/verify").json()["ok"] is True
