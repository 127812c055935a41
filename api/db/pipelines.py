"""Pipelines: a list of stages submitted together, their jobs, derived status and MLflow parent run."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from api.db.base import new_id, utcnow
from api.db.models import Job, Pipeline
from api.db.status import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED


def create_pipeline(session: Session, *, name: str, experiment: str, idempotency_key: str | None = None,
                    request_hash: str | None = None, sweep_id: str | None = None,
                    cell_id: str | None = None) -> Pipeline:
    pipeline = Pipeline(id=new_id(), name=name, experiment=experiment, idempotency_key=idempotency_key,
                        request_hash=request_hash, created_at=utcnow(), sweep_id=sweep_id, cell_id=cell_id)
    session.add(pipeline)
    session.flush()
    return pipeline


def get_pipeline(session: Session, *, pipeline_id: str) -> Pipeline | None:
    return session.get(Pipeline, pipeline_id)


def pipeline_jobs(session: Session, *, pipeline_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.pipeline_id == pipeline_id)
                                .order_by(Job.created_at, Job.id)))


def pipeline_status(statuses: Iterable[str]) -> str:
    """A pipeline's status derived from its jobs: active while any job is, then failed > cancelled > succeeded."""
    values = set(statuses)
    for status in (RUNNING, QUEUED, FAILED, CANCELLED):
        if status in values:
            return status
    return SUCCEEDED


def claim_pipeline_run(session: Session, *, pipeline_id: str, experiment_id: str, run_id: str) -> bool:
    """Record the pipeline's parent run unless another supervisor recorded one first."""
    result = session.execute(update(Pipeline).where(Pipeline.id == pipeline_id, Pipeline.mlflow_run_id.is_(None))
                             .values(mlflow_experiment_id=experiment_id, mlflow_run_id=run_id)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def pipelines_to_close(session: Session, *, pipeline_ids: Iterable[str] | None = None) -> list[Pipeline]:
    """Pipelines with an open parent run whose jobs have all finished."""
    active = exists().where(Job.pipeline_id == Pipeline.id, Job.status.in_([QUEUED, RUNNING]))
    stmt = select(Pipeline).where(Pipeline.mlflow_run_id.is_not(None), Pipeline.mlflow_closed_at.is_(None), ~active)
    if pipeline_ids is not None:
        stmt = stmt.where(Pipeline.id.in_(list(pipeline_ids)))
    return list(session.scalars(stmt))


def claim_pipeline_close(session: Session, *, pipeline_id: str) -> bool:
    result = session.execute(update(Pipeline).where(Pipeline.id == pipeline_id, Pipeline.mlflow_closed_at.is_(None))
                             .values(mlflow_closed_at=utcnow()).execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def reopen_pipeline_close(session: Session, *, pipeline_id: str) -> None:
    session.execute(update(Pipeline).where(Pipeline.id == pipeline_id).values(mlflow_closed_at=None)
                    .execution_options(synchronize_session=False))
