"""Celery tasks, kept thin: deserialize the job id, hand it to the supervisor (or run the reaper)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.db import jobs as repo
from api.db.session import make_engine, make_session_factory
from api.queue import REAP_TASK, RUN_JOB_TASK
from workers.celery_app import app, settings
from workers.context import WorkerContext, build_worker_context
from workers.reaper import reap
from workers.supervisor import Outcome

log = logging.getLogger(__name__)


@functools.cache
def _context() -> WorkerContext:
    # Built in the pool process on first use (never at import, never in the parent before the fork).
    return build_worker_context(settings)


@functools.cache
def _ledger() -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.ledger_url))


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    """Supervise one job. Returns the outcome for the worker log only; the ledger has the truth.

    A message for a job that cannot run now (cancelled, finished, a duplicate, waiting on parents) is acked after
    one indexed query, before the supervisor and its MLflow client are built: a backlog of stale messages costs
    milliseconds each, not seconds."""
    with _ledger()() as session:
        claimable = bool(repo.ready_jobs(session, job_ids=[job_id], limit=1))
    if not claimable:
        log.info("job %s not claimable (cancelled, finished, a duplicate or waiting); acking", job_id)
        return Outcome.SKIPPED.value
    return _context().supervisor.run(job_id).value


@app.task(name=REAP_TASK, acks_late=False, ignore_result=True)
def reap_stale_jobs() -> dict[str, Any]:
    ctx = _context()
    report = reap(settings=ctx.settings, factory=ctx.factory, enqueuer=ctx.enqueuer, run_store=ctx.run_store)
    return dataclasses.asdict(report)
