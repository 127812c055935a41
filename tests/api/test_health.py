"""`/ready` tells the truth: not ready while the embedded executor is dead (a real `python -m workers.local`,
killed with SIGKILL) or while the ledger's disk is below its free-space floor."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from api.liveness import write_executor_heartbeat
from api.main import create_app
from tests.integration.compose import ServiceProcess
from tests.ledger_fixtures import RecordingEnqueuer


@pytest.fixture
def client(settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    with TestClient(create_app(settings, enqueuer=enqueuer)) as c:
        yield c


def _wait_ready(client: TestClient, ready: bool, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/ready")
        if (r.status_code == 200) == ready or time.monotonic() > deadline:
            assert (r.status_code == 200) == ready, r.json()
            return r.json()["checks"]  # type: ignore[no-any-return]
        time.sleep(0.2)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_ready_follows_the_embedded_executor(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    checks = _wait_ready(client, ready=False)
    assert checks["executor"].startswith("not running") and checks["database"] == "ok"
    env = {"SGTM_DATABASE_URL": settings.ledger_url, "SGTM_DATA_ROOT": str(settings.data_root),
           "SGTM_TRACKING": "false", "SGTM_HEARTBEAT_INTERVAL_S": "0.2"}
    executor = ServiceProcess("executor", [sys.executable, "-m", "workers.local"], env, tmp_path)
    try:
        _wait_ready(client, ready=True)
        os.kill(executor.pid, signal.SIGKILL)
        executor.proc.wait(10)
        checks = _wait_ready(client, ready=False)
        assert f"pid {executor.pid}" in checks["executor"] and "gone" in checks["executor"]
    finally:
        executor.stop()


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_a_full_ledger_disk_is_not_ready(settings: Settings, enqueuer: RecordingEnqueuer) -> None:
    settings.data_root.mkdir(parents=True, exist_ok=True)
    write_executor_heartbeat(settings.data_root)
    with TestClient(create_app(settings, enqueuer=enqueuer)) as client:
        assert client.get("/ready").status_code == 200
    full = settings.model_copy(update={"min_free_disk_mb": 2**40})  # more than any disk has free
    with TestClient(create_app(full, enqueuer=enqueuer)) as client:
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["checks"]["ledger_writable"].startswith("disk full")
