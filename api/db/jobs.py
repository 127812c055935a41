"""Repository functions of the ledger: keyword-only, an explicit session, no commits (callers own transactions).

Every state change is a conditional UPDATE whose WHERE clause states the allowed source states (and, for the
holder of a lease, its `attempt`): zero rows updated means someone else moved the job first, and the caller backs
off instead of overwriting. That makes a redelivered Celery message, a late supervisor or a racing cancel harmless.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import and_, case, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from api.db.base import utcnow
from api.db.models import Job, JobEvent, JobInput, Pipeline, Sweep
from api.db.status import TERMINAL, JobStatus

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value
TERMINAL_VALUES = tuple(s.value for s in TERMINAL)

# A job seen as another job's parent. Built once: constructing an alias per query is costly in SQLAlchemy.
Parent = aliased(Job, name="parent")
Keyed = TypeVar("Keyed", Job, Pipeline, Sweep)  # the tables a submission with an Idempotency-Key creates


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class IllegalTransition(Exception):
    """The job's current state does not allow the requested change (e.g. cancelling a finished job)."""


def new_id() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------------------------------------------------
# Create and read


def create_pipeline(session: Session, *, name: str, experiment: str, idempotency_key: str | None = None,
                    request_hash: str | None = None, sweep_id: str | None = None,
                    cell_id: str | None = None) -> Pipeline:
    pipeline = Pipeline(id=new_id(), name=name, experiment=experiment, idempotency_key=idempotency_key,
                        request_hash=request_hash, created_at=utcnow(), sweep_id=sweep_id, cell_id=cell_id)
    session.add(pipeline)
    session.flush()
    return pipeline


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
    _event(session, job_id=job.id, attempt=0, type="status", data={"status": QUEUED})
    session.flush()
    return job


def get(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def get_many(session: Session, *, job_ids: Iterable[str]) -> list[Job]:
    ids = list(job_ids)
    return list(session.scalars(select(Job).where(Job.id.in_(ids)))) if ids else []


def get_by_idempotency_key(session: Session, *, table: type[Keyed], key: str) -> Keyed | None:
    """The job, pipeline or sweep submitted under `key` (the column is unique in each table)."""
    return session.scalar(select(table).where(table.idempotency_key == key))


def get_pipeline(session: Session, *, pipeline_id: str) -> Pipeline | None:
    return session.get(Pipeline, pipeline_id)


def release_key(session: Session, *, table: type[Job] | type[Pipeline] | type[Sweep], row_id: str) -> None:
    """Free an idempotency key (its time to live is over), so it can name a new submission."""
    session.execute(update(table).where(table.id == row_id).values(idempotency_key=None)
                    .execution_options(synchronize_session=False))


def pipeline_jobs(session: Session, *, pipeline_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.pipeline_id == pipeline_id)
                                .order_by(Job.created_at, Job.id)))


def input_edges(session: Session, *, job_ids: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(job id, input name, parent id, parent status) for every input of the given jobs, in one query."""
    ids = list(job_ids)
    if not ids:
        return []
    rows = session.execute(select(JobInput.job_id, JobInput.name, JobInput.parent_id, Parent.status)
                           .join(Parent, Parent.id == JobInput.parent_id).where(JobInput.job_id.in_(ids)))
    return [(job_id, name, parent_id, status) for job_id, name, parent_id, status in rows]


def inputs_of(session: Session, *, job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """{job id: {input name: parent job id}}."""
    out: dict[str, dict[str, str]] = {}
    for job_id, name, parent_id, _status in input_edges(session, job_ids=job_ids):
        out.setdefault(job_id, {})[name] = parent_id
    return out


def waiting_on(session: Session, *, job_ids: Iterable[str]) -> dict[str, list[str]]:
    """{job id: parents that have not succeeded yet} for the given jobs."""
    out: dict[str, list[str]] = {}
    for job_id, _name, parent_id, status in input_edges(session, job_ids=job_ids):
        if status != SUCCEEDED:
            out.setdefault(job_id, []).append(parent_id)
    return out


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


# ---------------------------------------------------------------------------------------------------------------------
# Lease: claim, heartbeat, progress


def _parents_pending(job: Any) -> Any:
    """SQL: the job has an input whose parent has not succeeded (correlated on `job.id`)."""
    return exists().where(JobInput.job_id == job.id, JobInput.parent_id == Parent.id, Parent.status != SUCCEEDED)


def _has_parents(job: Any) -> Any:
    return exists().where(JobInput.job_id == job.id)


def with_parents(session: Session, *, job_ids: Iterable[str]) -> set[str]:
    """Which of these jobs read a parent's output (sent ahead of root jobs; api.queue)."""
    ids = list(job_ids)
    if not ids:
        return set()
    return set(session.scalars(select(JobInput.job_id).where(JobInput.job_id.in_(ids)).distinct()))


def claim(session: Session, *, job_id: str, owner: str) -> int | None:
    """queued → running for a ready job, bumping `attempt` (the fencing token). Returns the new attempt, or None
    when the job is not claimable: already claimed (a duplicate message), finished, cancelled or waiting on parents."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.cancel_requested_at.is_(None), ~_parents_pending(Job))
        .values(status=RUNNING, attempt=Job.attempt + 1, lease_owner=owner, heartbeat_at=now, updated_at=now,
                started_at=func.coalesce(Job.started_at, now), error_type=None, error_message=None, exit_code=None)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    attempt = session.scalar(select(Job.attempt).where(Job.id == job_id))
    assert attempt is not None
    _event(session, job_id=job_id, attempt=attempt, type="status", data={"status": RUNNING, "owner": owner})
    return attempt


@dataclasses.dataclass(frozen=True)
class Lease:
    held: bool
    """False: the job was requeued or finished by someone else; the holder must stop its child and walk away."""
    cancel_requested: bool


def _fenced(job_id: str, attempt: int) -> Any:
    return and_(Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING)


def heartbeat(session: Session, *, job_id: str, attempt: int) -> Lease:
    """Renew the lease and read the cancel flag in one round trip."""
    now = utcnow()
    result = session.execute(update(Job).where(_fenced(job_id, attempt)).values(heartbeat_at=now)
                             .returning(Job.cancel_requested_at).execution_options(synchronize_session=False))
    row = result.first()
    return Lease(held=row is not None, cancel_requested=row is not None and row[0] is not None)


def record_progress(session: Session, *, job_id: str, attempt: int, step: int | None, total: int | None,
                    metrics: dict[str, Any] | None, events: Sequence[dict[str, Any]]) -> bool:
    """Write the latest progress (and renew the heartbeat) plus the events since the last write. Fenced."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
    if step is not None:
        values["progress_step"] = step
    if total is not None:
        values["progress_total"] = total
    if metrics:
        values["last_metrics"] = metrics
    result = session.execute(update(Job).where(_fenced(job_id, attempt)).values(**values)
                             .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    for ev in events:
        _event(session, job_id=job_id, attempt=attempt, type=str(ev.get("type", "progress"))[:16],
               step=_int_or_none(ev.get("step")), total=_int_or_none(ev.get("total")), data=ev)
    return True


def add_event(session: Session, *, job_id: str, attempt: int, type: str, data: dict[str, Any] | None = None) -> None:
    _event(session, job_id=job_id, attempt=attempt, type=type, data=data)


def set_mlflow_run(session: Session, *, job_id: str, attempt: int, experiment_id: str, run_id: str) -> bool:
    result = session.execute(update(Job).where(_fenced(job_id, attempt))
                             .values(mlflow_experiment_id=experiment_id, mlflow_run_id=run_id, mlflow_closed_at=None)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


# ---------------------------------------------------------------------------------------------------------------------
# Final states and requeue (fenced by attempt)


def mark_succeeded(session: Session, *, job_id: str, attempt: int, result: dict[str, Any]) -> bool:
    checkpoint = result.get("checkpoint") or {}
    path = checkpoint.get("path")
    values = {
        "summary": result.get("summary"), "result": result,
        # the stage's final metrics replace the last progress metrics (even when it reports none)
        "last_metrics": result["metrics"] if isinstance(result.get("metrics"), dict) else None,
        "checkpoint_uri": f"file://{path}" if path and not str(path).startswith(("file:", "s3:", "gs:")) else path,
        "checkpoint_sha256": checkpoint.get("sha256"),
        "code_version": str(result["code_version"])[:64] if result.get("code_version") else None,
        "exit_code": 0,
    }
    return _finish(session, job_id=job_id, attempt=attempt, status=SUCCEEDED, values=values)


def mark_failed(session: Session, *, job_id: str, attempt: int, error_type: str, error_message: str,
                exit_code: int | None = None) -> bool:
    values = {"error_type": error_type[:64], "error_message": error_message[-8000:], "exit_code": exit_code}
    return _finish(session, job_id=job_id, attempt=attempt, status=FAILED, values=values)


def mark_cancelled(session: Session, *, job_id: str, attempt: int, exit_code: int | None = None) -> bool:
    values = {"error_type": "cancelled", "error_message": "cancelled on request", "exit_code": exit_code}
    return _finish(session, job_id=job_id, attempt=attempt, status=CANCELLED, values=values)


def _finish(session: Session, *, job_id: str, attempt: int, status: str, values: dict[str, Any]) -> bool:
    now = utcnow()
    result = session.execute(update(Job).where(_fenced(job_id, attempt))
                             .values(status=status, finished_at=now, updated_at=now, lease_owner=None, **values)
                             .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _event(session, job_id=job_id, attempt=attempt, type="status",
           data={"status": status, "error_type": values.get("error_type"), "exit_code": values.get("exit_code")})
    return True


def requeue(session: Session, *, job_id: str, attempt: int, reason: str) -> bool:
    """running → queued: the next claim resumes from the job's last checkpoint (same workdir)."""
    now = utcnow()
    result = session.execute(update(Job).where(_fenced(job_id, attempt))
                             .values(status=QUEUED, lease_owner=None, updated_at=now, enqueued_at=None,
                                     enqueue_count=0, error_type="requeued", error_message=reason[-8000:])
                             .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _event(session, job_id=job_id, attempt=attempt, type="status", data={"status": QUEUED, "reason": reason})
    return True


def request_cancel(session: Session, *, job_id: str) -> Job:
    """Cancel a job: a queued job is cancelled at once; a running one gets `cancel_requested_at`, which its
    supervisor reads with its next heartbeat. Cancelling a cancelled job is a no-op; a finished one is a 409."""
    now = utcnow()
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED)
                             .values(status=CANCELLED, cancel_requested_at=now, finished_at=now, updated_at=now,
                                     error_type="cancelled", error_message="cancelled before it started")
                             .execution_options(synchronize_session=False))
    if result.rowcount == 1:  # type: ignore[attr-defined]
        _event(session, job_id=job_id, attempt=0, type="status", data={"status": CANCELLED})
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
                _event(session, job_id=job_id, attempt=0, type="status", data={"status": status})
                settled.append(job_id)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch: which jobs to send, and when


def ready_jobs(session: Session, *, job_ids: Iterable[str] | None = None, parent_id: str | None = None,
               queues: Sequence[str] = (), limit: int = 100) -> list[Job]:
    """Queued, not cancelled, every parent succeeded: a claim would succeed now. Jobs with parents come first, then
    the oldest: the order the embedded executor runs them in (whole sweep cells first, as api.queue explains)."""
    stmt = select(Job).where(Job.status == QUEUED, Job.cancel_requested_at.is_(None), ~_parents_pending(Job))
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(list(job_ids)))
    if parent_id is not None:
        stmt = stmt.where(Job.id.in_(select(JobInput.job_id).where(JobInput.parent_id == parent_id)))
    if queues:
        stmt = stmt.where(Job.queue.in_(list(queues)))
    downstream_first = case((_has_parents(Job), 0), else_=1)
    return list(session.scalars(stmt.order_by(downstream_first, Job.created_at, Job.id).limit(limit)))


def mark_enqueued(session: Session, *, job_ids: Iterable[str]) -> None:
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids), Job.status == QUEUED)
                        .values(enqueued_at=utcnow(), enqueue_count=Job.enqueue_count + 1)
                        .execution_options(synchronize_session=False))


def unmark_enqueued(session: Session, *, job_ids: Iterable[str]) -> None:
    """The send after the commit failed: make the jobs look never sent, so the reaper sends them soon."""
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids), Job.status == QUEUED)
                        .values(enqueued_at=None, enqueue_count=0).execution_options(synchronize_session=False))


def find_unsent(session: Session, *, resend_after_s: float, limit: int = 100) -> list[Job]:
    """Ready jobs whose message may be lost: never sent (a crash between commit and send) and older than a moment,
    or sent long ago. The wait doubles with each resend (capped at 64×) so a long backlog is not flooded."""
    now = utcnow()
    candidates = ready_jobs(session, limit=limit * 4)
    due = []
    for job in candidates:
        if job.enqueued_at is None:
            if job.updated_at < now - dt.timedelta(seconds=min(resend_after_s, 30.0)):
                due.append(job)
        elif job.enqueued_at < now - dt.timedelta(seconds=resend_after_s * 2 ** min(job.enqueue_count - 1, 6)):
            due.append(job)
    return due[:limit]


def find_stale(session: Session, *, older_than: dt.datetime, limit: int = 100) -> list[tuple[str, int]]:
    """(id, attempt) of running jobs whose supervisor stopped heartbeating: a lost worker or a killed process."""
    rows = session.execute(select(Job.id, Job.attempt).where(Job.status == RUNNING, Job.heartbeat_at < older_than)
                           .limit(limit))
    return [(job_id, attempt) for job_id, attempt in rows]


def reap_stale(session: Session, *, job_id: str, attempt: int) -> str | None:
    """Settle one stale running job: cancelled if a cancel was requested, failed if out of attempts, else queued.
    Returns the new status, or None if the job moved meanwhile."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != RUNNING or job.attempt != attempt:
        return None
    if job.cancel_requested_at is not None:
        return CANCELLED if mark_cancelled(session, job_id=job_id, attempt=attempt) else None
    if attempt >= job.max_attempts:
        ok = mark_failed(session, job_id=job_id, attempt=attempt, error_type="lost",
                         error_message=f"the worker stopped heartbeating on attempt {attempt} of {job.max_attempts}")
        return FAILED if ok else None
    ok = requeue(session, job_id=job_id, attempt=attempt, reason="worker lost (stale heartbeat); resuming")
    return QUEUED if ok else None


# ---------------------------------------------------------------------------------------------------------------------
# MLflow reconciliation


def find_unclosed_runs(session: Session, *, finished_before: dt.datetime, limit: int = 100) -> list[Job]:
    """Finished jobs whose MLflow run was never closed (the supervisor died, or MLflow was down)."""
    return list(session.scalars(select(Job).where(Job.status.in_(TERMINAL_VALUES), Job.mlflow_run_id.is_not(None),
                                                  Job.mlflow_closed_at.is_(None), Job.finished_at < finished_before)
                                .limit(limit)))


def mark_run_closed(session: Session, *, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(mlflow_closed_at=utcnow())
                    .execution_options(synchronize_session=False))


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


def pipeline_status(statuses: Iterable[str]) -> str:
    """A pipeline's status derived from its jobs: active while any job is, then failed > cancelled > succeeded."""
    values = set(statuses)
    for status in (RUNNING, QUEUED, FAILED, CANCELLED):
        if status in values:
            return status
    return SUCCEEDED


# ---------------------------------------------------------------------------------------------------------------------
# Events


def events_after(session: Session, *, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                .order_by(JobEvent.id).limit(limit)))


def _event(session: Session, *, job_id: str, attempt: int, type: str, step: int | None = None,
           total: int | None = None, data: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, attempt=attempt, type=type, step=step, total=total, data=data,
                         created_at=utcnow()))


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if abs(value) < 2**62 else None
