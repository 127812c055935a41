"""Faults against the deployed stack (real PostgreSQL, Redis, Celery workers, beat, MLflow, the real engine child):
duplicate delivery, kill -9 of the engine child, loss of the whole supervising process, cancel + worker restart,
a burst of identical submissions, and a database outage as a job finishes."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, text

from api.config import Settings
from api.queue import CeleryEnqueuer
from tests.conftest import PG_ADMIN_URL
from tests.integration.checks import TERMINAL, job_events, ledger_rows, wait_for, wait_for_jobs
from tests.integration.conftest import Stack, tiny_train

pytestmark = pytest.mark.integration


def _submit(client: httpx.Client, spec: dict[str, object], **headers: str) -> dict[str, object]:
    r = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec}, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def _ring(stack: Stack, job_id: str) -> None:
    """Send a second `run_job` message for the job, as Redis would on a visibility-timeout redelivery."""
    settings = Settings(broker_url=stack.env["SGTM_BROKER_URL"], queue_prefix=stack.env["SGTM_QUEUE_PREFIX"],
                        _env_file=None)
    CeleryEnqueuer(settings).send(job_id, "gpu")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _spawned(stack: Stack, job_id: str) -> list[dict[str, object]]:
    return [e for e in job_events(stack.ledger_url, job_id) if e["type"] == "spawned"]


#: Long enough that a kill sent after the first checkpoint lands mid-training on a fast, idle machine (a child that
#: had already finished would leave a result the next attempt adopts instead of resuming).
STEPS_TO_OUTLAST_A_KILL = 300


def _checkpointed(stack: Stack, job_id: str) -> bool:
    return any(e["type"] == "checkpoint" for e in job_events(stack.ledger_url, job_id))


def test_a_message_delivered_twice_runs_the_job_once(stack: Stack) -> None:
    second = stack.start("worker-gpu", "worker-2", SGTM_WORKER_QUEUES="gpu,cpu")  # `--scale worker-gpu=2`
    try:
        time.sleep(3)  # let the second worker subscribe
        with stack.client() as client:
            job = _submit(client, tiny_train(steps=10))
            _ring(stack, str(job["id"]))
            done = wait_for_jobs(client, [str(job["id"])], timeout=300, logs=stack.logs)[str(job["id"])]
        assert done["status"] == "succeeded" and done["attempt"] == 1
        assert len(_spawned(stack, str(job["id"]))) == 1
        workdir = stack.data_root / "jobs" / str(job["id"])
        assert [p.name for p in (workdir / "logs").iterdir()] == ["attempt-1.log"]
        wait_for(lambda: "not claimable" in (stack.processes["worker"].log_tail(50_000) + second.log_tail(50_000)),
                 30, "the duplicate to be acked as a no-op", stack.logs)
    finally:
        second.stop()


def test_kill_9_of_the_engine_child_requeues_and_resumes_from_its_checkpoint(stack: Stack) -> None:
    with stack.client() as client:
        job_id = str(_submit(client, tiny_train(steps=STEPS_TO_OUTLAST_A_KILL))["id"])
        wait_for(lambda: _checkpointed(stack, job_id), 240, "a first checkpoint", stack.logs)
        pid = int(_spawned(stack, job_id)[0]["data"]["pid"])  # type: ignore[index]
        os.kill(pid, signal.SIGKILL)
        done = wait_for_jobs(client, [job_id], timeout=300, logs=stack.logs)[job_id]
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    events = job_events(stack.ledger_url, job_id)
    assert [e["data"]["resume"] for e in events if e["type"] == "spawned"] == [False, True]
    resumed = [e for e in events if e["type"] == "resumed"]
    assert resumed and resumed[0]["attempt"] == 2 and resumed[0]["step"] >= 5
    assert done["summary"]["steps"] == STEPS_TO_OUTLAST_A_KILL


def test_a_lost_worker_is_reaped_and_the_job_resumes(stack: Stack) -> None:
    """kill -9 of the supervising Celery process: its engine child stops (its stdin lifeline closed), the heartbeat goes
    stale, beat's reaper requeues the job, a worker claims it (attempt 2) and the engine resumes."""
    with stack.client() as client:
        job_id = str(_submit(client, tiny_train(steps=STEPS_TO_OUTLAST_A_KILL))["id"])
        wait_for(lambda: _checkpointed(stack, job_id), 240, "a first checkpoint", stack.logs)
        row = ledger_rows(stack.ledger_url, "SELECT lease_owner FROM jobs WHERE id = :j", j=job_id)[0]
        supervisor_pid = int(row["lease_owner"].rsplit(":", 1)[1])
        child_pid = int(_spawned(stack, job_id)[0]["data"]["pid"])  # type: ignore[index]
        os.kill(supervisor_pid, signal.SIGKILL)
        wait_for(lambda: not _alive(child_pid), 10, "the engine child to die with its supervisor")
        done = wait_for_jobs(client, [job_id], timeout=300, logs=stack.logs)[job_id]
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    events = job_events(stack.ledger_url, job_id)
    requeues = [e for e in events if e["type"] == "status" and e["data"]["status"] == "queued" and e["attempt"] == 1]
    assert requeues and "stale heartbeat" in requeues[0]["data"]["reason"]
    assert any(e["type"] == "resumed" and e["attempt"] == 2 for e in events)


def test_cancel_stops_the_child_within_10s_and_stays_cancelled_after_a_worker_restart(stack: Stack) -> None:
    with stack.client() as client:
        job_id = str(_submit(client, tiny_train(steps=5000))["id"])
        wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}").json()["progress"], 240, "progress", stack.logs)
        child_pid = int(_spawned(stack, job_id)[0]["data"]["pid"])  # type: ignore[index]
        asked = time.monotonic()
        r = client.post(f"/api/v1/jobs/{job_id}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested_at"]
        wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "cancelled", 10,
                 "cancelled within 10 s", stack.logs)
        wait_for(lambda: not _alive(child_pid), 10 - (time.monotonic() - asked), "the child to exit")
        assert time.monotonic() - asked < 10

        stack.processes["worker"].stop()
        stack.start("worker-gpu", "worker", SGTM_WORKER_QUEUES="gpu,cpu")
        _ring(stack, job_id)  # a stale message for it arrives after the restart
        time.sleep(8)  # a restarted worker, several reaper rounds
        job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["attempt"] == 1
    assert len(_spawned(stack, job_id)) == 1
    from mlflow.tracking import MlflowClient

    assert MlflowClient(stack.mlflow_uri).get_run(job["mlflow"]["run_id"]).info.status == "KILLED"


def test_50_concurrent_submissions_with_one_idempotency_key_create_one_job(stack: Stack) -> None:
    key = f"burst-{time.time_ns()}"
    body = {"kind": "train", "spec": tiny_train(steps=10)}
    with stack.client() as client, ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: client.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key}),
                                  range(50)))
        assert {r.status_code for r in responses} == {202}, {r.status_code: r.text for r in responses}
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        rows = ledger_rows(stack.ledger_url, "SELECT count(*) AS n FROM jobs WHERE idempotency_key = :k", k=key)
        assert rows[0]["n"] == 1
        client.post(f"/api/v1/jobs/{ids.pop()}/cancel")  # it need not run


def test_a_database_outage_as_the_job_finishes_keeps_its_result(stack: Stack) -> None:
    """The ledger's database refuses every connection (ALLOW_CONNECTIONS false, sessions terminated) from the moment
    the engine has written result.json until 10 s later: the supervisor's final write waits the outage out, and the
    job succeeds on its first attempt, run once."""
    database = stack.ledger_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with stack.client() as client:
        job_id = str(_submit(client, tiny_train(steps=10))["id"])
        result = stack.data_root / "jobs" / job_id / "result.json"
        wait_for(result.exists, 300, "the engine's result.json", stack.logs)
        try:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false'))
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": database})
            time.sleep(10)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true'))
            admin.dispose()

        def finished() -> dict[str, object] | None:
            r = client.get(f"/api/v1/jobs/{job_id}")
            return r.json() if r.status_code == 200 and r.json()["status"] in TERMINAL else None

        done = wait_for(finished, 120, "the job to finish", stack.logs)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    assert len(_spawned(stack, job_id)) == 1
    assert "ledger unavailable writing succeeded" in stack.processes["worker"].log_tail(200_000)
