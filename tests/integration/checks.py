"""Assertions shared by the integration tests: waiting on jobs, and checking that the ledger, result.json and MLflow
tell the same story."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from sgtm_engine.tracking import metric_key

TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_for_jobs(client: httpx.Client, job_ids: list[str], timeout: float, logs: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, Any] = {}
    while time.monotonic() < deadline:
        jobs = {j: client.get(f"/api/v1/jobs/{j}").json() for j in job_ids}
        if all(job["status"] in TERMINAL for job in jobs.values()):
            return jobs
        time.sleep(1.0)
    states = {j: (job["status"], job.get("progress"), job.get("error")) for j, job in jobs.items()}
    raise AssertionError(f"jobs not finished after {timeout:.0f}s: {states}\n{logs() if logs else ''}")


def wait_for(predicate: Any, timeout: float, what: str, logs: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f}s\n{logs() if logs else ''}")


def ledger_rows(ledger_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(ledger_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def job_events(ledger_url: str, job_id: str) -> list[dict[str, Any]]:
    rows = ledger_rows(ledger_url, "SELECT type, attempt, step, data FROM job_events WHERE job_id = :j ORDER BY id",
                       j=job_id)
    for row in rows:
        if isinstance(row["data"], str):
            row["data"] = json.loads(row["data"])
    return rows


def check_pipeline_agrees(*, client: httpx.Client, pipeline_id: str, ledger_url: str, mlflow_uri: str,
                          data_root: Path) -> None:
    """Every job succeeded; the DB row, the workdir's result.json and the MLflow run agree; runs nest under the
    pipeline's parent run, which is FINISHED; training metrics have steps."""
    from mlflow.tracking import MlflowClient

    pipeline = client.get(f"/api/v1/pipelines/{pipeline_id}").json()
    assert pipeline["status"] == "succeeded", pipeline
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    parent_run = pipeline["mlflow"]["run_id"]
    # The ledger is the truth and commits first; the supervisor closes the MLflow runs right after (the reaper
    # reconciles any it missed). So a client that saw 'succeeded' may look a moment before the runs are closed.
    runs = [parent_run] + [job["mlflow"]["run_id"] for job in pipeline["jobs"]]
    deadline = time.monotonic() + 30
    while any(mlflow.get_run(r).info.status != "FINISHED" for r in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
    parent = mlflow.get_run(parent_run)
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline_id"] == pipeline_id, parent.info
    for job in pipeline["jobs"]:
        assert job["status"] == "succeeded", job
        result = json.loads((data_root / "jobs" / job["id"] / "result.json").read_text())
        row = ledger_rows(ledger_url, "SELECT * FROM jobs WHERE id = :j", j=job["id"])[0]
        summary = row["summary"] if not isinstance(row["summary"], str) else json.loads(row["summary"])
        assert summary == json.loads(json.dumps(result["summary"])), job["stage_name"]
        assert job["last_metrics"] == json.loads(json.dumps(result["metrics"])), (job["stage_name"],
                                                                                  job["last_metrics"])
        run = mlflow.get_run(job["mlflow"]["run_id"])
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent_run
        assert (tags["job_id"], tags["sgtm.kind"], tags["sgtm.spec_hash"]) == (job["id"], job["kind"], job["spec_hash"])
        assert tags["sgtm.method"] == job["method"] and tags["sgtm.seed"] == str(job["seed"])
        for key, value in result["metrics"].items():
            if isinstance(value, float) and math.isfinite(value):
                logged = metric_key(key)  # MLflow allows fewer characters than category names use
                assert logged in run.data.metrics, (job["stage_name"], logged, sorted(run.data.metrics)[:10])
                assert math.isclose(run.data.metrics[logged], value, rel_tol=1e-6, abs_tol=1e-9), key
        if result.get("checkpoint"):
            assert tags["checkpoint.sha256"] == result["checkpoint"]["sha256"] == row["checkpoint_sha256"]
            assert job["checkpoint"]["uri"].endswith(result["checkpoint"]["path"])
        if job["kind"] == "train":
            history = mlflow.get_metric_history(run.info.run_id, "train/loss")
            assert history and all(m.step > 0 for m in history), "training metrics must carry their step"
            assert max(m.step for m in history) <= job["progress"]["total"]
