"""Dispatch: which queued jobs are ready to run, and which of them need their message sent (again)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from api.db.base import utcnow
from api.db.inputs import has_parents, parents_pending
from api.db.models import Job, JobInput
from api.db.status import QUEUED


def ready_jobs(session: Session, *, job_ids: Iterable[str] | None = None, parent_id: str | None = None,
               queues: Sequence[str] = (), limit: int = 100) -> list[Job]:
    """Queued, not cancelled, every parent succeeded: a claim would succeed now. Jobs with parents come first, then
    the oldest: the order the embedded executor runs them in (whole sweep cells first, as api.queue explains)."""
    stmt = select(Job).where(Job.status == QUEUED, Job.cancel_requested_at.is_(None), ~parents_pending(Job))
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(list(job_ids)))
    if parent_id is not None:
        stmt = stmt.where(Job.id.in_(select(JobInput.job_id).where(JobInput.parent_id == parent_id)))
    if queues:
        stmt = stmt.where(Job.queue.in_(list(queues)))
    downstream_first = case((has_parents(Job), 0), else_=1)
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
