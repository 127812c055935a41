"""Job events: the append-only log behind `GET /jobs/{id}/events` (status changes and the engine's events)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.base import utcnow
from api.db.models import JobEvent


def add_event(session: Session, *, job_id: str, attempt: int, type: str, step: int | None = None,
              total: int | None = None, data: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, attempt=attempt, type=type, step=step, total=total, data=data,
                         created_at=utcnow()))


def events_after(session: Session, *, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                .order_by(JobEvent.id).limit(limit)))
