"""MLflow reconciliation: finished jobs whose MLflow run is still open (the supervisor died, or MLflow was down)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.db.base import utcnow
from api.db.models import Job
from api.db.status import TERMINAL_VALUES


def find_unclosed_runs(session: Session, *, finished_before: dt.datetime, limit: int = 100) -> list[Job]:
    """Finished jobs whose MLflow run was never closed (the supervisor died, or MLflow was down)."""
    return list(session.scalars(select(Job).where(Job.status.in_(TERMINAL_VALUES), Job.mlflow_run_id.is_not(None),
                                                  Job.mlflow_closed_at.is_(None), Job.finished_at < finished_before)
                                .limit(limit)))


def mark_run_closed(session: Session, *, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(mlflow_closed_at=utcnow())
                    .execution_options(synchronize_session=False))
