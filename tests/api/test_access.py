"""Who may do what: every /api/v1 read needs a token unless the operator opens reads (SGTM_OPEN_READS); writes
always do, and a write on a missing id checks the token before saying 404."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from api.main import create_app
from tests.ledger_fixtures import TOKEN, RecordingEnqueuer

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MISSING = "00000000-0000-4000-8000-000000000000"
READS = ["/api/v1/jobs", f"/api/v1/jobs/{MISSING}", f"/api/v1/jobs/{MISSING}/events?follow=false",
         f"/api/v1/pipelines/{MISSING}", "/api/v1/sweeps", f"/api/v1/sweeps/{MISSING}",
         f"/api/v1/sweeps/{MISSING}/report"]
WRITES_ON_MISSING = [f"/api/v1/jobs/{MISSING}/cancel", f"/api/v1/pipelines/{MISSING}/cancel",
                     f"/api/v1/sweeps/{MISSING}/cancel", f"/api/v1/sweeps/{MISSING}/resume"]


@pytest.fixture(params=[False, True], ids=["closed-reads", "open-reads"])
def client(request: pytest.FixtureRequest, settings: Settings,
           enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    configured = settings.model_copy(update={"open_reads": request.param})
    with TestClient(create_app(configured, enqueuer=enqueuer)) as c:
        yield c


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_reads_need_a_token_unless_opened(client: TestClient) -> None:
    opened = client.app.state.settings.open_reads  # type: ignore[attr-defined]
    for path in READS:
        anonymous = client.get(path)
        if opened:
            assert anonymous.status_code != 401, path
        else:
            assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer", path
        assert client.get(path, headers=AUTH).status_code in (200, 404), path
    assert client.get("/health").status_code == 200  # liveness and the docs stay open
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_writes_on_a_missing_id_check_the_token_before_404(client: TestClient) -> None:
    for path in WRITES_ON_MISSING:
        assert client.post(path).status_code == 401, path
        assert client.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.post(path, headers=AUTH).status_code == 404, path
