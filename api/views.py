"""Rows to response bodies. Batched: a page of jobs costs three queries, not three per job."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from api.config import Settings
from api.db import jobs as repo
from api.db.models import Job, JobEvent, Pipeline
from api.db.sweeps import lineage
from api.schemas import CheckpointRef, EventRead, JobError, JobRead, MlflowRef, PipelineRead, Progress

API = "/api/v1"


def job_reads(session: Session, settings: Settings, jobs: Sequence[Job]) -> list[JobRead]:
    inputs: dict[str, dict[str, str]] = {}
    waiting: dict[str, list[str]] = {}
    for job_id, name, parent_id, status in repo.input_edges(session, job_ids=[j.id for j in jobs]):
        inputs.setdefault(job_id, {})[name] = parent_id
        if status != "succeeded":
            waiting.setdefault(job_id, []).append(parent_id)
    return [_job_read(settings, j, inputs.get(j.id, {}), waiting.get(j.id, [])) for j in jobs]


def job_read(session: Session, settings: Settings, job: Job) -> JobRead:
    return job_reads(session, settings, [job])[0]


def pipeline_read(session: Session, settings: Settings, pipeline: Pipeline) -> PipelineRead:
    found = lineage(session, pipeline_ids=[pipeline.id])  # its jobs and a sweep cell's shared stages
    return PipelineRead(
        id=pipeline.id, name=pipeline.name, experiment=pipeline.experiment, status=found.statuses()[pipeline.id],
        jobs=job_reads(session, settings, found.own[pipeline.id]), shared_stages=found.shared[pipeline.id],
        mlflow=_mlflow(settings, pipeline.mlflow_experiment_id, pipeline.mlflow_run_id),
        created_at=pipeline.created_at,
        links={"self": f"{API}/pipelines/{pipeline.id}", "cancel": f"{API}/pipelines/{pipeline.id}/cancel"})


def event_read(event: JobEvent) -> EventRead:
    return EventRead(id=event.id, job_id=event.job_id, attempt=event.attempt, type=event.type, step=event.step,
                     total=event.total, data=event.data, created_at=event.created_at)


def _job_read(settings: Settings, job: Job, inputs: dict[str, str], waiting: list[str]) -> JobRead:
    progress = None
    if job.progress_step is not None or job.progress_total is not None:
        fraction = None
        if job.progress_step is not None and job.progress_total:
            fraction = min(1.0, max(0.0, job.progress_step / job.progress_total))
        progress = Progress(step=job.progress_step, total=job.progress_total, fraction=fraction)
    error = None
    if job.error_type is not None and job.status != "succeeded":
        error = JobError(type=job.error_type, message=job.error_message, exit_code=job.exit_code)
    links = {"self": f"{API}/jobs/{job.id}", "events": f"{API}/jobs/{job.id}/events",
             "cancel": f"{API}/jobs/{job.id}/cancel", "logs": f"{API}/jobs/{job.id}/logs"}
    mlflow = _mlflow(settings, job.mlflow_experiment_id, job.mlflow_run_id)
    if mlflow and mlflow.url:
        links["mlflow"] = mlflow.url
    return JobRead(
        id=job.id, kind=job.kind, status=job.status, pipeline_id=job.pipeline_id, stage_name=job.stage_name,  # type: ignore[arg-type]
        spec=job.spec, spec_hash=job.spec_hash, method=job.method, seed=job.seed, experiment=job.experiment,
        queue=job.queue, gpus=job.gpus, inputs=inputs, waiting_on=sorted(waiting), attempt=job.attempt,
        max_attempts=job.max_attempts, lease_owner=job.lease_owner, heartbeat_at=job.heartbeat_at,
        cancel_requested_at=job.cancel_requested_at, progress=progress, last_metrics=job.last_metrics,
        summary=job.summary,
        checkpoint=CheckpointRef(uri=job.checkpoint_uri, sha256=job.checkpoint_sha256) if job.checkpoint_uri else None,
        code_version=job.code_version, mlflow=mlflow, error=error, created_at=job.created_at,
        updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
        workdir=str(settings.workdir(job.id)), links=links)


def _mlflow(settings: Settings, experiment_id: str | None, run_id: str | None) -> MlflowRef | None:
    if run_id is None:
        return None
    url = None
    if settings.mlflow_ui_url and experiment_id:
        url = f"{settings.mlflow_ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return MlflowRef(experiment_id=experiment_id, run_id=run_id, url=url)
