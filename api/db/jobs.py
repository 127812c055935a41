"""Repository functions of the ledger: keyword-only, an explicit session, no commits (callers own transactions).

The ledger's repositories, one module each: this one (jobs: create, read, list, cancel), `api.db.lease` (claim,
heartbeat, progress, final states, requeue), `api.db.dispatch` (ready jobs and their messages), `api.db.pipelines`,
`api.db.inputs` (parent edges), `api.db.events` and `api.db.mlflow_runs`; their names are re-exported here, so
`from api.db import jobs as repo` reaches every job-level operation.

Every state change is a conditional UPDATE whose WHERE clause states the allowed source states (and, for the
holder of a lease, its `attempt`): zero rows updated means someone else moved the job first, and the caller backs
off instead of overwriting. That makes a redelivered Celery message, a late supervisor or a racing cancel harmless.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from api.db.base import new_id, utcnow
from api.db.dispatch import find_unsent, mark_enqueued, ready_jobs, unmark_enqueued
from api.db.events import add_event, events_after
from api.db.inputs import Parent, input_edges, inputs_of, waiting_on, with_parents
from api.db.lease import (
    Lease,
    claim,
    find_stale,
    heartbeat,
    mark_cancelled,
    mark_failed,
    mark_succeeded,
    reap_stale,
    record_progress,
    requeue,
    set_mlflow_run,
)
from api.db.mlflow_runs import find_unclosed_runs, mark_run_closed
from api.db.models import Job, JobInput, Pipeline, Sweep
from api.db.pipelines import (
    claim_pipeline_close,
    claim_pipeline_run,
    create_pipeline,
    get_pipeline,
    pipeline_jobs,
    pipeline_status,
    pipelines_to_close,
    reopen_pipeline_close,
)
from api.db.status import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL_VALUES

__all__ = [
    "CANCELLED", "FAILED", "QUEUED", "RUNNING", "SUCCEEDED", "TERMINAL_VALUES", "IllegalTransition", "JobNotFound",
    "Keyed", "Lease", "add_event", "claim", "claim_pipeline_close", "claim_pipeline_run", "create", "create_pipeline",
    "events_after", "find_stale", "find_unclosed_runs", "find_unsent", "get", "get_by_idempotency_key", "get_many",
    "get_pipeline", "heartbeat", "input_edges", "inputs_of", "list_jobs", "mark_cancelled", "mark_enqueued",
    "mark_failed", "mark_run_closed", "mark_succeeded", "new_id", "pipeline_jobs", "pipeline_status",
    "pipelines_to_close", "ready_jobs", "reap_stale", "record_progress", "release_key", "reopen_pipeline_close",
    "request_cancel", "requeue", "set_mlflow_run", "settle_orphans", "unmark_enqueued", "waiting_on",
    "with_parents",
]

Keyed = TypeVar("Keyed", Job, Pipeline, Sweep)  # the tables a submission with an Idempotency-Key creates


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class IllegalTransition(Exception):
    """The job's current state does not allow the requested change (e.g. cancelling a finished job)."""


def create(session: Session, *, kind: str, spec: dict[str, Any], spec_hash: str, method: str, seed: int | None,
           experiment: str, queue: str, gpus: int, max_attempts: int, inputs: Mapping[str, str],
           pipeline_id: str | None = None, stage_name: str | None = None, idempotency_key: str | None = None,
           request_hash: str | None = None, job_id: str | None = None, will_send: bool = False) -> Job:
    """Insert a queued job and its input edges. Raises IntegrityError on a duplicate idempotency key.

    `will_send`: the caller sends the job's message right after the commit, so it is recorded as sent in the same
    transaction (one commit per submission); `unmark_enqueued` undoes that if the send fails."""
    now = utcnow()
    job = Job(id=job_id or new_id(), kind=kind, spec=spec, spec_hash=spec_hash, method=method, seed=seed,
              experiment=experiment, queue=queue, gpus=gpus, max_attempts=max_attempts, pipeline_id=pipeline_id,
              stage_name=stage_name, idempotency_key=idempotency_key, request_hash=request_hash,
              status=QUEUED, attempt=0, enqueue_count=1 if will_send else 0, enqueued_at=now if will_send else None,
              created_at=now, updated_at=now)
    session.add(job)
    session.flush()  # the job row must exist before edges and events reference it
    session.add_all(JobInput(job_id=job.id, name=name, parent_id=parent) for name, parent in inputs.items())
    add_event(session, job_id=job.id, attempt=0, type="status", data={"status": QUEUED})
    session.flush()
    return job


def get(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def get_many(session: Session, *, job_ids: Iterable[str]) -> list[Job]:
    ids = list(job_ids)
    return [job for i in range(0, len(ids), 500)  # bounded IN lists: SQLite caps a statement's parameters
            for job in session.scalars(select(Job).where(Job.id.in_(ids[i:i + 500])))]


def get_by_idempotency_key(session: Session, *, table: type[Keyed], key: str) -> Keyed | None:
    """The job, pipeline or sweep submitted under `key` (the column is unique in each table)."""
    return session.scalar(select(table).where(table.idempotency_key == key))


def release_key(session: Session, *, table: type[Job] | type[Pipeline] | type[Sweep], row_id: str) -> None:
    """Free an idempotency key (its time to live is over), so it can name a new submission."""
    session.execute(update(table).where(table.id == row_id).values(idempotency_key=None)
                    .execution_options(synchronize_session=False))


def list_jobs(session: Session, *, status: Sequence[str] = (), kind: Sequence[str] = (),
              pipeline_id: str | None = None, limit: int = 50,
              before: tuple[dt.datetime, str] | None = None) -> list[Job]:
    """Newest first, keyset-paginated on (created_at, id): stable while new jobs arrive."""
    stmt = select(Job)
    if status:
        stmt = stmt.where(Job.status.in_(list(status)))
    if kind:
        stmt = stmt.where(Job.kind.in_(list(kind)))
    if pipeline_id is not None:
        stmt = stmt.where(Job.pipeline_id == pipeline_id)
    if before is not None:
        created, job_id = before
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def request_cancel(session: Session, *, job_id: str) -> Job:
    """Cancel a job: a queued job is cancelled at once; a running one gets `cancel_requested_at`, which its
    supervisor reads with its next heartbeat. Cancelling a cancelled job is a no-op; a finished one is a 409."""
    now = utcnow()
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED)
                             .values(status=CANCELLED, cancel_requested_at=now, finished_at=now, updated_at=now,
                                     error_type="cancelled", error_message="cancelled before it started")
                             .execution_options(synchronize_session=False))
    if result.rowcount == 1:  # type: ignore[attr-defined]
        add_event(session, job_id=job_id, attempt=0, type="status", data={"status": CANCELLED})
        settle_orphans(session)
    else:
        session.execute(update(Job).where(Job.id == job_id, Job.status == RUNNING,
                                          Job.cancel_requested_at.is_(None))
                        .values(cancel_requested_at=now, updated_at=now)
                        .execution_options(synchronize_session=False))
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(job_id)
    if job.status in (SUCCEEDED, FAILED):
        raise IllegalTransition(f"job {job_id} already {job.status}; only queued or running jobs can be cancelled")
    return job


def settle_orphans(session: Session) -> list[str]:
    """Queued jobs whose parent failed or was cancelled can never run: fail (or cancel) them, down the whole chain."""
    settled: list[str] = []
    while True:
        rows = session.execute(
            select(Job.id, func.max(Parent.status))
            .join(JobInput, JobInput.job_id == Job.id).join(Parent, Parent.id == JobInput.parent_id)
            .where(Job.status == QUEUED, Parent.status.in_([FAILED, CANCELLED]))
            .group_by(Job.id)).all()
        if not rows:
            return settled
        for job_id, parent_status in rows:
            # max() over {'cancelled', 'failed'} is 'failed': an upstream failure outranks a cancel
            status = FAILED if parent_status == FAILED else CANCELLED
            now = utcnow()
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.status == QUEUED)
                .values(status=status, finished_at=now, updated_at=now, error_type=f"upstream_{parent_status}",
                        error_message=f"a parent job was {parent_status}; this stage cannot run")
                .execution_options(synchronize_session=False))
            if result.rowcount == 1:  # type: ignore[attr-defined]
                add_event(session, job_id=job_id, attempt=0, type="status", data={"status": status})
                settled.append(job_id)
