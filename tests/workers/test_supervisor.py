"""The supervisor against the fake engine child (tests/workers/fake_engine.py) and a real ledger (SQLite and
PostgreSQL): exit-code mapping, resume, duplicates, cancel, fencing, MLflow lifecycle, the reaper."""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.base import utcnow
from api.db.models import Job
from api.db.session import session_scope
from tests.ledger_fixtures import RecordingEnqueuer
from workers.reaper import reap
from workers.supervisor import Outcome, Supervisor

FAKE_ENGINE = str(Path(__file__).with_name("fake_engine.py"))


class FakeRunStore:
    """Records the MLflow calls the supervisor makes."""

    uri = "fake://mlflow"

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def experiment_id(self, name: str) -> str:
        return f"exp-{name}"

    def create_run(self, experiment_id: str, *, name: str, tags: dict[str, str],
                   parent_run_id: str | None = None) -> str:
        run_id = f"run-{len(self.runs) + 1}"
        self.runs[run_id] = {"name": name, "tags": dict(tags), "parent": parent_run_id, "status": "RUNNING",
                             "params": {}, "dicts": {}}
        return run_id

    def set_running(self, run_id: str) -> None:
        self.calls.append(("set_running", run_id))
        self.runs[run_id]["status"] = "RUNNING"

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.runs[run_id]["tags"].update(tags)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self.runs[run_id]["params"].update(params)

    def log_dict(self, run_id: str, data: dict[str, Any], name: str) -> None:
        self.runs[run_id]["dicts"][name] = data

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.runs[run_id].setdefault("metrics", {}).update(metrics)

    def close(self, run_id: str, status: str) -> None:
        self.runs[run_id]["status"] = status

    def delete_run(self, run_id: str) -> None:
        self.runs.pop(run_id)


@pytest.fixture
def fake_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"engine_command": [sys.executable, FAKE_ENGINE]})


@pytest.fixture
def run_store() -> FakeRunStore:
    return FakeRunStore()


@pytest.fixture
def supervisor(fake_settings: Settings, factory: sessionmaker[Session], enqueuer: RecordingEnqueuer,
               run_store: FakeRunStore) -> Supervisor:
    return Supervisor(settings=fake_settings, factory=factory, enqueuer=enqueuer, run_store=run_store, owner="test")


def make(factory: sessionmaker[Session], fake: dict[str, Any] | None = None, *, kind: str = "train",
         inputs: dict[str, str] | None = None, pipeline_id: str | None = None, max_attempts: int = 3) -> str:
    with session_scope(factory) as s:
        return repo.create(s, kind=kind, spec={"fake": fake or {}}, spec_hash="a" * 64, method="sgtm", seed=1,
                           experiment="sgtm", queue="cpu", gpus=1, max_attempts=max_attempts, inputs=inputs or {},
                           pipeline_id=pipeline_id, stage_name=kind if pipeline_id else None).id


def row(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = repo.get(s, job_id=job_id)
        assert job is not None
        return job


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_success_records_result_events_and_closes_the_run(supervisor: Supervisor, factory: sessionmaker[Session],
                                                          run_store: FakeRunStore, enqueuer: RecordingEnqueuer,
                                                          fake_settings: Settings) -> None:
    parent = make(factory, {"steps": 4})
    child = make(factory, kind="ablate", inputs={"model": parent})
    assert supervisor.run(parent) == Outcome.SUCCEEDED
    job = row(factory, parent)
    assert job.status == "succeeded" and job.attempt == 1 and job.exit_code == 0
    assert job.summary == {"steps": 4, "resumed_from": 0, "inputs": []}
    assert job.checkpoint_uri and job.checkpoint_uri.endswith("checkpoints/step-4.ck") and job.checkpoint_sha256
    assert (job.progress_step, job.progress_total, job.last_metrics) == (4, 4, {"train/loss": 0.25})
    with factory() as s:
        types = [e.type for e in repo.events_after(s, job_id=parent)]
    assert types[:3] == ["status", "status", "spawned"] and "checkpoint" in types and types[-1] == "status"
    run = run_store.runs[job.mlflow_run_id or ""]
    assert run["status"] == "FINISHED" and run["tags"]["job_id"] == parent and run["tags"]["sgtm.method"] == "sgtm"
    assert run["tags"]["checkpoint.sha256"] == job.checkpoint_sha256
    assert run["dicts"]["result.json"]["kind"] == "train"
    assert run["params"] == {"spec.fake.steps": "4"}  # the spec, flattened as the engine does
    assert job.mlflow_closed_at is not None
    argv = json.loads((fake_settings.workdir(parent) / "argv-1.json").read_text())
    assert argv[:3] == ["run-stage", "--kind", "train"] and argv[argv.index("--mlflow-run-id") + 1] == run_id(job)
    assert enqueuer.job_ids == [child]  # the child became ready and was sent
    assert supervisor.run(child) == Outcome.SUCCEEDED
    child_argv = json.loads((fake_settings.workdir(child) / "argv-1.json").read_text())
    assert f"model={fake_settings.workdir(parent)}" in child_argv


def run_id(job: Job) -> str:
    assert job.mlflow_run_id is not None
    return job.mlflow_run_id


def test_a_duplicate_message_runs_the_job_once(supervisor: Supervisor, factory: sessionmaker[Session],
                                               fake_settings: Settings) -> None:
    job_id = make(factory, {"steps": 10, "sleep": 0.05})
    other = Supervisor(settings=fake_settings, factory=factory, enqueuer=RecordingEnqueuer(), run_store=FakeRunStore(),
                       owner="other")
    first, out1 = in_thread(supervisor.run, job_id)
    second, out2 = in_thread(other.run, job_id)
    first.join(30)
    second.join(30)
    assert sorted([out1[0], out2[0]]) == sorted([Outcome.SUCCEEDED, Outcome.SKIPPED])
    assert supervisor.run(job_id) == Outcome.SKIPPED  # and a late redelivery after the end
    assert len(list(fake_settings.workdir(job_id).glob("argv-*.json"))) == 1
    assert row(factory, job_id).attempt == 1


def test_final_failure_codes_fail_the_job_and_its_descendants(supervisor: Supervisor, factory: sessionmaker[Session],
                                                              run_store: FakeRunStore) -> None:
    job_id = make(factory, {"exit_code": 3})
    child = make(factory, kind="ablate", inputs={"model": job_id})
    assert supervisor.run(job_id) == Outcome.FAILED
    job = row(factory, job_id)
    assert (job.status, job.error_type, job.exit_code) == ("failed", "data_error", 3)
    assert "fake engine failing with 3" in (job.error_message or "")
    assert run_store.runs[run_id(job)]["status"] == "FAILED"
    assert row(factory, child).status == "failed" and row(factory, child).error_type == "upstream_failed"


def test_unexpected_errors_are_retried_then_fail(supervisor: Supervisor, factory: sessionmaker[Session],
                                                 enqueuer: RecordingEnqueuer, run_store: FakeRunStore) -> None:
    job_id = make(factory, {"exit_code": 1}, max_attempts=2)
    assert supervisor.run(job_id) == Outcome.REQUEUED
    assert row(factory, job_id).status == "queued" and enqueuer.job_ids == [job_id]
    assert supervisor.run(job_id) == Outcome.FAILED
    job = row(factory, job_id)
    assert (job.attempt, job.error_type) == (2, "retries_exhausted")
    assert len(run_store.runs) == 1  # one MLflow run across attempts


def test_a_killed_child_is_requeued_and_resumes_from_its_checkpoint(supervisor: Supervisor,
                                                                   factory: sessionmaker[Session],
                                                                   run_store: FakeRunStore) -> None:
    job_id = make(factory, {"steps": 6, "crash_at": 5, "checkpoint_every": 2})
    assert supervisor.run(job_id) == Outcome.REQUEUED
    job = row(factory, job_id)
    assert job.status == "queued" and "SIGKILL" in (job.error_message or "")
    assert supervisor.run(job_id) == Outcome.SUCCEEDED
    job = row(factory, job_id)
    assert job.attempt == 2 and job.summary and job.summary["resumed_from"] == 4
    assert len(run_store.runs) == 1 and ("set_running", run_id(job)) in run_store.calls
    with factory() as s:
        spawned = [e.data for e in repo.events_after(s, job_id=job_id) if e.type == "spawned"]
    assert [d["resume"] for d in spawned if d] == [False, True]


def test_cancel_stops_the_child_and_marks_cancelled(supervisor: Supervisor, factory: sessionmaker[Session],
                                                    run_store: FakeRunStore) -> None:
    job_id = make(factory, {"steps": 200, "sleep": 0.05})
    thread, out = in_thread(supervisor.run, job_id)
    wait_for(lambda: (row(factory, job_id).progress_step or 0) >= 2)
    with session_scope(factory) as s:
        repo.request_cancel(s, job_id=job_id)
    asked = time.monotonic()
    thread.join(15)
    assert out == [Outcome.CANCELLED] and time.monotonic() - asked < 5
    job = row(factory, job_id)
    assert (job.status, job.exit_code) == ("cancelled", 5)
    assert run_store.runs[run_id(job)]["status"] == "KILLED"


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(supervisor: Supervisor,
                                                           factory: sessionmaker[Session]) -> None:
    job_id = make(factory, {"steps": 400, "sleep": 0.05, "ignore_sigterm": True})
    thread, out = in_thread(supervisor.run, job_id)
    wait_for(lambda: (row(factory, job_id).progress_step or 0) >= 1)
    with session_scope(factory) as s:
        repo.request_cancel(s, job_id=job_id)
    asked = time.monotonic()
    thread.join(15)
    assert out == [Outcome.CANCELLED]
    assert 2.0 <= time.monotonic() - asked < 6  # cancel_grace_s = 2 in the test settings
    assert row(factory, job_id).exit_code == -9


def test_a_supervisor_that_lost_its_lease_kills_its_child_and_writes_nothing(
        supervisor: Supervisor, factory: sessionmaker[Session]) -> None:
    job_id = make(factory, {"steps": 400, "sleep": 0.05})
    thread, out = in_thread(supervisor.run, job_id)
    wait_for(lambda: (row(factory, job_id).progress_step or 0) >= 1)
    with session_scope(factory) as s:  # what the reaper and a second worker would do
        assert repo.requeue(s, job_id=job_id, attempt=1, reason="test")
        assert repo.claim(s, job_id=job_id, owner="someone-else") == 2
    thread.join(10)
    assert out == [Outcome.LOST]
    job = row(factory, job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("running", 2, "someone-else")


def test_exit_zero_without_result_is_a_failure(supervisor: Supervisor, factory: sessionmaker[Session]) -> None:
    job_id = make(factory, {"no_result": True})
    assert supervisor.run(job_id) == Outcome.FAILED
    assert row(factory, job_id).error_type == "result_missing"


def test_worker_shutdown_requeues_without_resending(fake_settings: Settings, factory: sessionmaker[Session],
                                                    enqueuer: RecordingEnqueuer) -> None:
    stop = threading.Event()
    sup = Supervisor(settings=fake_settings, factory=factory, enqueuer=enqueuer, run_store=FakeRunStore(),
                     owner="t", shutdown=stop)
    job_id = make(factory, {"steps": 400, "sleep": 0.05}, max_attempts=1)
    thread, out = in_thread(sup.run, job_id)
    wait_for(lambda: (row(factory, job_id).progress_step or 0) >= 1)
    stop.set()
    thread.join(10)
    assert out == [Outcome.REQUEUED] and row(factory, job_id).status == "queued" and enqueuer.sent == []


def test_pipeline_runs_nest_under_one_parent_that_closes_with_the_last_job(
        supervisor: Supervisor, factory: sessionmaker[Session], run_store: FakeRunStore) -> None:
    with session_scope(factory) as s:
        pipeline_id = repo.create_pipeline(s, name="chain", experiment="sgtm").id
    train = make(factory, {"steps": 2}, pipeline_id=pipeline_id)
    ablate = make(factory, {"steps": 1, "final_metrics": {"eval/forget/loss": 7.5, "eval/forget/Geografía/loss": 7.0}},
                  kind="ablate", inputs={"model": train}, pipeline_id=pipeline_id)
    assert supervisor.run(train) == Outcome.SUCCEEDED
    with factory() as s:
        pipeline = repo.get_pipeline(s, pipeline_id=pipeline_id)
        assert pipeline is not None and pipeline.mlflow_run_id is not None
        parent_run = pipeline.mlflow_run_id
    assert run_store.runs[parent_run]["status"] == "RUNNING"
    assert supervisor.run(ablate) == Outcome.SUCCEEDED
    assert run_store.runs[parent_run]["status"] == "FINISHED"
    # the parent run carries its stages' split-level numbers (not per category), as `sgtm run`'s does
    stage = row(factory, ablate).stage_name or ablate
    assert run_store.runs[parent_run]["metrics"] == {f"{stage}/eval/forget/loss": 7.5}
    assert {run_store.runs[run_id(row(factory, j))]["parent"] for j in (train, ablate)} == {parent_run}
    assert run_store.runs[run_id(row(factory, ablate))]["tags"]["input.model"] == train


def test_reaper_requeues_stale_jobs_resends_and_reconciles_runs(supervisor: Supervisor, fake_settings: Settings,
                                                                factory: sessionmaker[Session],
                                                                enqueuer: RecordingEnqueuer,
                                                                run_store: FakeRunStore) -> None:
    lost = make(factory, {"steps": 3})
    with session_scope(factory) as s:  # a worker claimed it, then died without a trace
        repo.claim(s, job_id=lost, owner="dead")
        s.execute(update(Job).where(Job.id == lost).values(heartbeat_at=utcnow() - dt.timedelta(seconds=30)))
    report = reap(settings=fake_settings, factory=factory, enqueuer=enqueuer, run_store=run_store)
    assert report.requeued == [lost] and enqueuer.job_ids == [lost]
    assert supervisor.run(lost) == Outcome.SUCCEEDED and row(factory, lost).attempt == 2

    orphan = make(factory, {"steps": 1})
    assert supervisor.run(orphan) == Outcome.SUCCEEDED
    rid = run_id(row(factory, orphan))
    run_store.runs[rid]["status"] = "RUNNING"  # as if the supervisor died before closing it
    with session_scope(factory) as s:
        s.execute(update(Job).where(Job.id == orphan).values(
            mlflow_closed_at=None, finished_at=utcnow() - dt.timedelta(seconds=60)))
    report = reap(settings=fake_settings, factory=factory, enqueuer=enqueuer, run_store=run_store)
    assert report.runs_closed == 1 and run_store.runs[rid]["status"] == "FINISHED"
    assert row(factory, orphan).mlflow_closed_at is not None


def test_a_config_error_reports_the_engines_own_explanation(supervisor: Supervisor, fake_settings: Settings,
                                                           factory: sessionmaker[Session]) -> None:
    job_id = make(factory, {"exit_code": 2})
    workdir = fake_settings.workdir(job_id)
    workdir.mkdir(parents=True)
    (workdir / "error.json").write_text('{"type": "Stale", "message": "from an earlier attempt"}')
    assert supervisor.run(job_id) == Outcome.FAILED
    job = row(factory, job_id)
    assert job.error_type == "config_error" and "Stale" not in (job.error_message or "")
    assert "fake engine failing with 2" in (job.error_message or "")  # no error.json this time: the log's tail


def test_the_engines_error_json_becomes_the_error_message(supervisor: Supervisor,
                                                          factory: sessionmaker[Session]) -> None:
    job_id = make(factory, {"exit_code": 2, "error_json": True})
    assert supervisor.run(job_id) == Outcome.FAILED
    assert row(factory, job_id).error_message == "ConfigError: steps=0: must be >= 1\n  - lr=-1: > 0"
