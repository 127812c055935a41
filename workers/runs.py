"""MLflow run lifecycle against the ledger: open (or resume) a job's run nested under its pipeline's run, close it
with the status that matches the job, and close pipeline runs when their last job finishes.

Every MLflow failure is logged and swallowed: a job never fails because tracking is down. Closing is recorded in
the ledger (`mlflow_closed_at`), so the reaper can finish what a crashed or cut-off supervisor left open.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.db import jobs as repo
from api.db.models import Job
from api.db.session import session_scope
from workers.tracking import RUN_STATUS, Tracker, flatten

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The ledger no longer lists this supervisor's attempt as the running one."""


def open_job_run(*, tracker: Tracker, factory: sessionmaker[Session], job: Job, attempt: int,
                 inputs: dict[str, str], code_version: str) -> str | None:
    """The job's run id (created on the first attempt, set RUNNING again on a resume), or None without MLflow."""
    if tracker.uri is None:
        return None
    try:
        if job.mlflow_run_id:
            tracker.set_running(job.mlflow_run_id)
            tracker.set_tags(job.mlflow_run_id, {"attempt": str(attempt)})
            return job.mlflow_run_id
        parent = _pipeline_run(tracker=tracker, factory=factory, pipeline_id=job.pipeline_id)
        experiment_id = tracker.experiment_id(job.experiment)
        tags = {"job_id": job.id, "kind": job.kind, "method": job.method, "seed": str(job.seed),
                "spec_hash": job.spec_hash, "code_version": code_version, "attempt": str(attempt),
                "queue": job.queue}
        if job.pipeline_id:
            tags.update({"pipeline_id": job.pipeline_id, "stage": job.stage_name or job.kind})
        tags.update({f"input.{name}": parent_id for name, parent_id in inputs.items()})
        name = f"{job.stage_name or job.kind}-{job.method}-s{job.seed}-{job.spec_hash[:8]}"
        run_id = tracker.create_run(experiment_id, name=name, tags=tags, parent_run_id=parent)
        tracker.log_params(run_id, flatten(job.spec, "spec."))
    except Exception as e:  # noqa: BLE001 - tracking is best effort; the job runs without a run id
        log.warning("MLflow unavailable for job %s (%s): running without tracking", job.id, e)
        return None
    with session_scope(factory) as session:
        if not repo.set_mlflow_run(session, job_id=job.id, attempt=attempt, experiment_id=experiment_id,
                                   run_id=run_id):
            raise LeaseLost(job.id)
    return run_id


def _pipeline_run(*, tracker: Tracker, factory: sessionmaker[Session], pipeline_id: str | None) -> str | None:
    """The pipeline's parent run, created by whichever of its jobs starts first (a conditional UPDATE decides)."""
    if pipeline_id is None:
        return None
    with session_scope(factory) as session:
        pipeline = repo.get_pipeline(session, pipeline_id=pipeline_id)
        assert pipeline is not None
        if pipeline.mlflow_run_id:
            return pipeline.mlflow_run_id
        name, experiment = pipeline.name, pipeline.experiment
    experiment_id = tracker.experiment_id(experiment)
    run_id = tracker.create_run(experiment_id, name=name, tags={"pipeline_id": pipeline_id, "kind": "pipeline"})
    with session_scope(factory) as session:
        won = repo.claim_pipeline_run(session, pipeline_id=pipeline_id, experiment_id=experiment_id, run_id=run_id)
    if won:
        return run_id
    tracker.delete_run(run_id)  # another job of the pipeline created the parent run at the same moment
    with session_scope(factory) as session:
        pipeline = repo.get_pipeline(session, pipeline_id=pipeline_id)
        return pipeline.mlflow_run_id if pipeline else None


def close_job_run(*, tracker: Tracker, factory: sessionmaker[Session], job_id: str, run_id: str, status: str,
                  result: dict[str, Any] | None = None) -> bool:
    """Close a finished job's run with the matching status (and its result's references), then record it."""
    try:
        if result is not None:
            checkpoint = result.get("checkpoint") or {}
            tags = {"status": status}
            if checkpoint.get("path"):
                tags["checkpoint.uri"] = str(checkpoint["path"])
            if checkpoint.get("sha256"):
                tags["checkpoint.sha256"] = str(checkpoint["sha256"])
            if result.get("code_version"):
                tags["code_version"] = str(result["code_version"])
            if result.get("manifest_hash"):
                tags["data_manifest_hash"] = str(result["manifest_hash"])
            tracker.set_tags(run_id, tags)
            tracker.log_dict(run_id, result, "result.json")
        tracker.close(run_id, RUN_STATUS[status])
    except Exception as e:  # noqa: BLE001 - the reaper retries
        log.warning("could not close MLflow run %s of job %s (%s); the reaper will retry", run_id, job_id, e)
        return False
    with session_scope(factory) as session:
        repo.mark_run_closed(session, job_id=job_id)
    return True


def close_finished_pipelines(*, tracker: Tracker, factory: sessionmaker[Session],
                             pipeline_ids: Iterable[str] | None = None) -> int:
    """Close the parent run of every pipeline whose jobs have all finished: FINISHED if all succeeded, else
    FAILED (any failed) or KILLED (any cancelled)."""
    if tracker.uri is None:
        return 0
    closed = 0
    with session_scope(factory) as session:
        todo = [(p.id, p.mlflow_run_id) for p in repo.pipelines_to_close(session, pipeline_ids=pipeline_ids)]
    for pipeline_id, run_id in todo:
        with session_scope(factory) as session:
            if not repo.claim_pipeline_close(session, pipeline_id=pipeline_id):
                continue
            status = repo.pipeline_status(j.status for j in repo.pipeline_jobs(session, pipeline_id=pipeline_id))
        try:
            tracker.close(str(run_id), RUN_STATUS[status])
            closed += 1
        except Exception as e:  # noqa: BLE001 - reopen so the reaper retries
            log.warning("could not close pipeline run %s (%s)", run_id, e)
            with session_scope(factory) as session:
                repo.reopen_pipeline_close(session, pipeline_id=pipeline_id)
    return closed
