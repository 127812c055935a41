"""Ledger tables: sweeps and their cells, pipelines, jobs, the inputs that link a stage to its parents, and throttled
job events.

Table models are not API schemas (`api.schemas` has those). Columns hold each job's control plane:
status, attempt (the fencing token), lease owner, heartbeat, cancel request, idempotency key.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from api.db.base import Base, UTCDateTime, utcnow
from api.db.status import JobStatus

ID = String(36)  # uuid4 text
EventId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only
_STATUSES = ", ".join(f"'{s.value}'" for s in JobStatus)


class Sweep(Base):
    """A grid of pipelines (cells) submitted together: one MLflow parent run over the cells' pipeline runs."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_created_at_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    experiment: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The normalized sweep document (variants, grid, seeds, seed paths; the base lives in the cells' pipelines)."""
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    """Set when every cell had finished and the report was logged; cleared when the sweep is resumed."""
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    """Set by a cancel, cleared by a resume. A pipeline shared with other sweeps is cancelled only once every sweep
    that uses it is cancelled (cancelling one sweep never stops another's cells)."""
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SweepCell(Base):
    """One cell of a sweep and the pipeline that currently answers for it: one this sweep created, or, when the
    same cell (same `cell_id`) already succeeded or is running, the pipeline of an earlier submission."""

    __tablename__ = "sweep_cells"

    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    cell_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    variant: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    pipeline_id: Mapped[str] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"), index=True)


class Pipeline(Base):
    """A group of stages submitted together (a train → ablate → evaluate chain, or a sweep): one MLflow parent run."""

    __tablename__ = "pipelines"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    experiment: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sweep_id: Mapped[str | None] = mapped_column(ID, index=True)
    """The sweep that created this pipeline (no foreign key: SQLite cannot add one to an existing table; a later
    sweep may reuse the pipeline through `sweep_cells`)."""
    cell_id: Mapped[str | None] = mapped_column(String(64), index=True)
    """The sweep cell this pipeline runs (`sgtm_engine.sweep`): the dedupe key across sweeps."""
    shared_stages: Mapped[dict[str, str] | None] = mapped_column(JSON)
    """{stage name: job id} of the cell's stages that run once for several cells, in another cell's pipeline
    (`api.sweeps`); its other stages are this pipeline's own jobs."""


class Job(Base):
    """One stage run. The row is the truth about the job; Celery only carries its id."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        CheckConstraint("attempt >= 0", name="attempt"),
        Index("ix_jobs_status_queue", "status", "queue"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    pipeline_id: Mapped[str | None] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"), index=True)
    stage_name: Mapped[str | None] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    experiment: Mapped[str] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(16))
    gpus: Mapped[int] = mapped_column(Integer, default=1)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    progress_step: Mapped[int | None] = mapped_column(BigInteger)
    progress_total: Mapped[int | None] = mapped_column(BigInteger)
    last_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    code_version: Mapped[str | None] = mapped_column(String(64))

    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)

    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))

    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    enqueue_count: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class JobInput(Base):
    """An edge of the stage graph: job `job_id` reads the output of `parent_id` under the name `name` (`model`)."""

    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    parent_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)


class JobEvent(Base):
    """A throttled progress record or a state change, streamed by `GET /jobs/{id}/events` (its id is the SSE id)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(16))
    step: Mapped[int | None] = mapped_column(BigInteger)
    total: Mapped[int | None] = mapped_column(BigInteger)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
