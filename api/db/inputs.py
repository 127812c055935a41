"""Job inputs: the edges from a job to the parents whose outputs it reads, and SQL predicates over them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

from api.db.models import Job, JobInput
from api.db.status import SUCCEEDED

# A job seen as another job's parent. Built once: constructing an alias per query is costly in SQLAlchemy.
Parent = aliased(Job, name="parent")


def parents_pending(job: Any) -> Any:
    """SQL: the job has an input whose parent has not succeeded (correlated on `job.id`)."""
    return exists().where(JobInput.job_id == job.id, JobInput.parent_id == Parent.id, Parent.status != SUCCEEDED)


def has_parents(job: Any) -> Any:
    return exists().where(JobInput.job_id == job.id)


def with_parents(session: Session, *, job_ids: Iterable[str]) -> set[str]:
    """Which of these jobs read a parent's output (sent ahead of root jobs; api.queue)."""
    ids = list(job_ids)
    if not ids:
        return set()
    return set(session.scalars(select(JobInput.job_id).where(JobInput.job_id.in_(ids)).distinct()))


def input_edges(session: Session, *, job_ids: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(job id, input name, parent id, parent status) for every input of the given jobs, a query per 500 jobs (SQLite
    caps a statement's parameters)."""
    ids = list(job_ids)
    out: list[tuple[str, str, str, str]] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        rows = session.execute(select(JobInput.job_id, JobInput.name, JobInput.parent_id, Parent.status)
                               .join(Parent, Parent.id == JobInput.parent_id).where(JobInput.job_id.in_(chunk)))
        out += [(job_id, name, parent_id, status) for job_id, name, parent_id, status in rows]
    return out


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
