"""A finished result is never lost or re-run: the final-state write outlasts a ledger outage at job end, and a
result whose final state was lost (the supervisor died, or gave up) is recovered from the workdir's result.json by
the reaper and by the next claim. Against the fake engine child and a real ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.base import utcnow
from api.db.models import Job
from api.db.session import session_scope
from tests.ledger_fixtures import RecordingEnqueuer
from tests.workers.test_supervisor import FAKE_ENGINE, FakeRunStore, make, row
from workers.reaper import reap
from workers.supervisor import Outcome, Supervisor


class LedgerOutage:
    """The session factory the workers use, with a switch that makes every new session fail to connect."""

    def __init__(self, factory: sessionmaker[Session]):
        self.factory = factory
        self.down = False
        self.refused = 0

    def __call__(self) -> Session:
        if self.down:
            self.refused += 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("the ledger is restarting"))
        return self.factory()


@pytest.fixture
def fake_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"engine_command": [sys.executable, FAKE_ENGINE]})


def _spawned(factory: sessionmaker[Session], job_id: str) -> int:
    with factory() as s:
        return sum(e.type == "spawned" for e in repo.events_after(s, job_id=job_id))


def test_a_ledger_outage_at_job_end_keeps_the_finished_result(fake_settings: Settings,
                                                              factory: sessionmaker[Session]) -> None:
    outage = LedgerOutage(factory)
    supervisor = Supervisor(settings=fake_settings, factory=outage, enqueuer=RecordingEnqueuer(),  # type: ignore[arg-type]
                            run_store=FakeRunStore(), owner="test")
    job_id = make(factory, {"steps": 6, "sleep": 0.05}, max_attempts=1)  # no retry would save it
    result = fake_settings.workdir(job_id) / "result.json"

    def outage_when_the_engine_finishes() -> None:
        deadline = time.monotonic() + 60
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        outage.down = True
        time.sleep(3.0)
        outage.down = False

    thread = threading.Thread(target=outage_when_the_engine_finishes, daemon=True)
    thread.start()
    assert supervisor.run(job_id) == Outcome.SUCCEEDED
    thread.join()
    assert outage.refused > 0  # the outage did hit the final write
    job = row(factory, job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.summary == {"steps": 6, "resumed_from": 0,
                                                                               "inputs": []}
    assert _spawned(factory, job_id) == 1


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_the_reaper_records_a_finished_result_whose_final_write_was_lost(
        fake_settings: Settings, factory: sessionmaker[Session], enqueuer: RecordingEnqueuer,
        max_attempts: int) -> None:
    job_id = make(factory, {"steps": 3}, max_attempts=max_attempts)
    supervisor = Supervisor(settings=fake_settings, factory=factory, enqueuer=enqueuer, run_store=FakeRunStore(),
                            owner="test")
    assert supervisor.run(job_id) == Outcome.SUCCEEDED
    finished = row(factory, job_id).result
    _as_if_the_final_write_was_lost(factory, job_id)
    report = reap(settings=fake_settings, factory=factory, enqueuer=enqueuer, run_store=FakeRunStore())
    assert report.recovered == [job_id] and not report.requeued and not report.failed
    job = row(factory, job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.result == finished
    assert _spawned(factory, job_id) == 1


def test_a_claim_adopts_a_finished_result_instead_of_running_again(fake_settings: Settings,
                                                                    factory: sessionmaker[Session],
                                                                    enqueuer: RecordingEnqueuer) -> None:
    run_store = FakeRunStore()
    supervisor = Supervisor(settings=fake_settings, factory=factory, enqueuer=enqueuer, run_store=run_store, owner="t")
    job_id = make(factory, {"steps": 3})
    child = make(factory, kind="ablate", inputs={"model": job_id})
    assert supervisor.run(job_id) == Outcome.SUCCEEDED
    run_id = row(factory, job_id).mlflow_run_id
    _as_if_the_final_write_was_lost(factory, job_id)
    with session_scope(factory) as s:  # an older reaper requeued it: the job is waiting for a worker again
        repo.requeue(s, job_id=job_id, attempt=1, reason="worker lost (stale heartbeat); resuming")
    enqueuer.sent.clear()
    assert supervisor.run(job_id) == Outcome.SUCCEEDED
    job = row(factory, job_id)
    assert job.status == "succeeded" and job.attempt == 2 and job.mlflow_run_id == run_id
    assert _spawned(factory, job_id) == 1  # the engine did not run again
    assert len(run_store.runs) == 1 and run_store.runs[run_id or ""]["status"] == "FINISHED"
    assert enqueuer.job_ids == [child]


def _as_if_the_final_write_was_lost(factory: sessionmaker[Session], job_id: str) -> None:
    """Back to `running` with a stale heartbeat: the row as it stands when the supervisor's final write failed."""
    values: dict[str, Any] = {"status": "running", "finished_at": None, "result": None, "summary": None,
                              "lease_owner": "gone", "heartbeat_at": utcnow() - dt.timedelta(seconds=60)}
    with session_scope(factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
