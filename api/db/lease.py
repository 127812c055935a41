"""The lease of a running job: claim, heartbeat, progress, final states, requeue and the reaping of stale leases.

Every write is fenced by `attempt` (the fencing token the claim hands out): zero rows updated means someone else
moved the job first, and the caller backs off instead of overwriting.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from api.db.base import utcnow
from api.db.events import add_event
from api.db.inputs import parents_pending
from api.db.models import Job
from api.db.status import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED


def claim(session: Session, *, job_id: str, owner: str) -> int | None:
    """queued → running for a ready job, bumping `attempt` (the fencing token). Returns the new attempt, or None
    when the job is not claimable: already claimed (a duplicate message), finished, cancelled or waiting on parents."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.cancel_requested_at.is_(None), ~parents_pending(Job))
        .values(status=RUNNING, attempt=Job.attempt + 1, lease_owner=owner, heartbeat_at=now, updated_at=now,
                started_at=func.coalesce(Job.started_at, now), error_type=None, error_message=None, exit_code=None)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    attempt = session.scalar(select(Job.attempt).where(Job.id == job_id))
    assert attempt is not None
    add_event(session, job_id=job_id, attempt=attempt, type="status", data={"status": RUNNING, "owner": owner})
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
        add_event(session, job_id=job_id, attempt=attempt, type=str(ev.get("type", "progress"))[:16],
               step=_int_or_none(ev.get("step")), total=_int_or_none(ev.get("total")), data=ev)
    return True


def set_mlflow_run(session: Session, *, job_id: str, attempt: int, experiment_id: str, run_id: str) -> bool:
    result = session.execute(update(Job).where(_fenced(job_id, attempt))
                             .values(mlflow_experiment_id=experiment_id, mlflow_run_id=run_id, mlflow_closed_at=None)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


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
    add_event(session, job_id=job_id, attempt=attempt, type="status",
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
    add_event(session, job_id=job_id, attempt=attempt, type="status", data={"status": QUEUED, "reason": reason})
    return True


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


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if abs(value) < 2**62 else None
