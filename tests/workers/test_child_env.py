"""The engine child starts with an explicit, minimal environment: none of the service's secrets reach it."""

from __future__ import annotations

import json
import sys

import pytest
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from tests.ledger_fixtures import RecordingEnqueuer
from tests.workers.test_supervisor import FAKE_ENGINE, FakeRunStore, make
from workers.supervisor import Outcome, Supervisor

SECRETS = {
    "SGTM_API_TOKENS": "token-that-must-not-leak-0123456789",
    "SGTM_DATABASE_URL": "postgresql+psycopg://sgtm:db-password@postgres:5432/sgtm",
    "SGTM_BROKER_URL": "redis://:broker-password@redis:6379/0",
    "DATABASE_URL": "postgresql://app:other-password@db/app",
    "AWS_SECRET_ACCESS_KEY": "not-for-the-child",
    "HF_TOKEN": "hf_not_for_the_child",
}


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_the_engine_child_gets_no_service_secrets(settings: Settings, factory: sessionmaker[Session],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**SECRETS, "CUDA_VISIBLE_DEVICES": "3", "OBJECT_STORE_KEY": "operator-allowed"}.items():
        monkeypatch.setenv(key, value)
    configured = settings.model_copy(update={"engine_command": [sys.executable, FAKE_ENGINE],
                                             "engine_env_passthrough": ["OBJECT_STORE_KEY"]})
    supervisor = Supervisor(settings=configured, factory=factory, enqueuer=RecordingEnqueuer(),
                            run_store=FakeRunStore(), owner="test")
    job_id = make(factory, {"steps": 1, "dump_env": True})
    assert supervisor.run(job_id) == Outcome.SUCCEEDED
    env = json.loads((configured.workdir(job_id) / "env.json").read_text())
    leaked = {k for k, v in env.items()
              if k in SECRETS or k.startswith("SGTM_") or any(s in v for s in SECRETS.values())}
    assert not leaked
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["OBJECT_STORE_KEY"] == "operator-allowed"
    assert env["PATH"] and env["PYTHONUNBUFFERED"] == "1"
