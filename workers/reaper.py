"""The reaper (beat runs it every `reap_interval_s`; the embedded executor when idle). It repairs what crashes leave:

1. running jobs whose heartbeat is stale (a lost worker, a killed supervisor): succeeded if their workdir holds
   the finished stage's result.json (the final write was lost), else requeued — they resume from their last
   checkpoint — or cancelled if a cancel was pending, or failed when out of attempts;
2. queued jobs whose parent failed or was cancelled: settled the same way;
3. ready jobs nobody claimed (a message lost, or never sent): sent again, with a doubling wait;
4. MLflow runs of finished jobs and pipelines still open: closed with the matching status; finished sweeps get
   their report logged and their parent run closed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.base import utcnow
from api.db.session import session_scope
from api.queue import Enqueuer
from sgtm_engine.folders import RESULT
from workers.results import read_json_object
from workers.run_store import RunStore
from workers.runs import close_finished_pipelines, close_finished_sweeps, close_job_run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReapReport:
    requeued: list[str] = dataclasses.field(default_factory=list)
    recovered: list[str] = dataclasses.field(default_factory=list)
    """Stale jobs whose stage had finished (result.json in the workdir): marked succeeded from that result."""
    failed: list[str] = dataclasses.field(default_factory=list)
    cancelled: list[str] = dataclasses.field(default_factory=list)
    settled: list[str] = dataclasses.field(default_factory=list)
    resent: list[str] = dataclasses.field(default_factory=list)
    runs_closed: int = 0


def reap(*, settings: Settings, factory: sessionmaker[Session], enqueuer: Enqueuer, run_store: RunStore,
         stale_after_s: float | None = None) -> ReapReport:
    report = ReapReport()
    now = utcnow()
    stale = now - dt.timedelta(seconds=settings.stale_after_s if stale_after_s is None else stale_after_s)

    with session_scope(factory) as session:
        candidates = repo.find_stale(session, older_than=stale)
    for job_id, attempt in candidates:
        result = read_json_object(settings.workdir(job_id) / RESULT)
        with session_scope(factory) as session:
            if result is not None:  # the stage finished; only its final state was lost: record it, never re-run
                status = "succeeded" if repo.mark_succeeded(session, job_id=job_id, attempt=attempt,
                                                            result=result) else None
            else:
                status = repo.reap_stale(session, job_id=job_id, attempt=attempt)
        if status is None:
            continue
        log.warning("reaper: job %s attempt %d had a stale heartbeat → %s", job_id, attempt, status)
        {"queued": report.requeued, "failed": report.failed, "cancelled": report.cancelled,
         "succeeded": report.recovered}[status].append(job_id)

    with session_scope(factory) as session:
        report.settled = repo.settle_orphans(session)
        requeued = {j.id: j.queue for j in repo.ready_jobs(session, job_ids=report.requeued)}
        due = [(j.id, j.queue) for j in repo.find_unsent(session, resend_after_s=settings.resend_after_s)]
    due = _not_waiting(enqueuer, due)
    with session_scope(factory) as session:
        downstream = repo.with_parents(session, job_ids=[*requeued, *(job_id for job_id, _ in due)])
    for job_id, queue in list(requeued.items()) + [d for d in due if d[0] not in requeued]:
        try:
            enqueuer.send(job_id, queue, downstream=job_id in downstream)
        except Exception as e:  # noqa: BLE001 - next round
            log.warning("reaper: could not send job %s (%s)", job_id, e)
            continue
        with session_scope(factory) as session:
            repo.mark_enqueued(session, job_ids=[job_id])
        if job_id not in requeued:
            report.resent.append(job_id)

    if run_store.uri is not None:
        closed_before = now - dt.timedelta(seconds=settings.reconcile_after_s)
        with session_scope(factory) as session:
            unclosed = [(j.id, j.mlflow_run_id, j.status, j.result)
                        for j in repo.find_unclosed_runs(session, finished_before=closed_before)]
        for job_id, run_id, status, result in unclosed:
            if run_id and close_job_run(run_store=run_store, factory=factory, job_id=job_id, run_id=run_id,
                                        status=status, result=result):
                report.runs_closed += 1
        report.runs_closed += close_finished_pipelines(run_store=run_store, factory=factory)
        report.runs_closed += close_finished_sweeps(run_store=run_store, factory=factory)
    return report


def _not_waiting(enqueuer: Enqueuer, due: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop the jobs whose message is still in the broker's queue: they wait behind a backlog, nothing was lost."""
    waiting: set[str] = set()
    for queue in sorted({queue for _, queue in due}):
        try:
            waiting |= enqueuer.waiting(queue)
        except Exception as e:  # noqa: BLE001 - the broker cannot be read: re-send (duplicates are no-ops)
            log.warning("reaper: could not read queue %s (%s); re-sending its due jobs", queue, e)
    return [(job_id, queue) for job_id, queue in due if job_id not in waiting]
