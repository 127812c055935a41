"""Celery tasks, kept thin: deserialize the job id, hand it to the supervisor (or run the reaper)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from api.queue import REAP_TASK, RUN_JOB_TASK
from workers.celery_app import app, settings
from workers.context import WorkerContext, build_worker_context
from workers.reaper import reap

log = logging.getLogger(__name__)


@functools.cache
def _context() -> WorkerContext:
    # Built in the pool process on first use (never at import, never in the parent before the fork).
    return build_worker_context(settings)


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    """Supervise one job. Returns the outcome for the worker log only; the ledger has the truth."""
    return _context().supervisor.run(job_id).value


@app.task(name=REAP_TASK, acks_late=False, ignore_result=True)
def reap_stale_jobs() -> dict[str, Any]:
    ctx = _context()
    report = reap(settings=ctx.settings, factory=ctx.factory, enqueuer=ctx.enqueuer, run_store=ctx.run_store)
    return dataclasses.asdict(report)
