"""/api/v1/jobs: submit, read, list, cancel, stream a job's events (SSE) and read its engine log.

A job is named by its whole id or a unique prefix of at least 8 hex characters (api/ids.py)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy.orm import Session

from api import views
from api.config import Settings
from api.db import jobs as repo
from api.db.models import Job
from api.db.status import TERMINAL, JobStatus
from api.deps import READ_AUTH, AdmittedStream, AuthDep, EnqueuerDep, SessionDep, SettingsDep, StreamsDep
from api.errors import NotFound
from api.ids import find_by_id
from api.paging import CursorQuery, decode_cursor, encode_cursor
from api.schemas import UUID_PATTERN, EventRead, IdempotencyKey, JobCreate, JobPage, JobRead
from api.submissions import send_after_commit, submit_job
from sgtm_engine.config import StageKind

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], dependencies=READ_AUTH,
                   responses={401: {"description": "Missing or invalid bearer token"}})

ERRORS = {401: {"description": "Missing or invalid bearer token"},
          404: {"description": "No such job"},
          409: {"description": "The job's state does not allow this (e.g. cancelling a finished job)"},
          422: {"description": "Invalid request; `detail[].loc` names the field"},
          429: {"description": "Too many open event streams; retry after `Retry-After` seconds"}}
EVENTS_PER_READ = 500
SSE_MAX_S = 3600.0  # a stream ends after an hour; clients reconnect with Last-Event-ID


def existing_job(job_id: str, session: SessionDep) -> Job:
    return find_by_id(session, Job, job_id, what="job")  # a whole id or a unique prefix (api/ids.py)


ExistingJob = Annotated[Job, Depends(existing_job)]


@router.post("", status_code=202, response_model=JobRead, responses={k: ERRORS[k] for k in (401, 409, 422)})
def create_job(body: JobCreate, response: Response, session: SessionDep, settings: SettingsDep,
               enqueuer: EnqueuerDep, _principal: AuthDep,
               idempotency_key: Annotated[IdempotencyKey | None, Header()] = None) -> JobRead:
    """Submit one stage. 202 + `Location`; with `Idempotency-Key`, a retried request returns the same job."""
    job, created = submit_job(session, settings=settings, body=body, idempotency_key=idempotency_key)
    if created:
        send_after_commit(session, enqueuer=enqueuer, jobs=[job])
    response.headers["Location"] = f"{views.API}/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return views.job_read(session, settings, job)


@router.get("", response_model=JobPage, responses={422: ERRORS[422]})
def list_jobs(session: SessionDep, settings: SettingsDep,
              status: Annotated[list[JobStatus], Query(default_factory=list, description="Any of these; repeat the "
                                                                                     "parameter")],
              kind: Annotated[list[StageKind], Query(default_factory=list, description="Any of these; repeat the "
                                                                                   "parameter")],
              pipeline_id: Annotated[str | None, Query(pattern=UUID_PATTERN,
                                                       description="Only this pipeline's stages")] = None,
              limit: Annotated[int, Query(ge=1, le=200, description="Jobs per page")] = 50,
              cursor: CursorQuery = None) -> JobPage:
    """Newest first. Filter by status, kind and pipeline; page with `next_cursor`."""
    before = decode_cursor(cursor) if cursor else None
    rows = repo.list_jobs(session, status=[s.value for s in status], kind=[k.value for k in kind],
                          pipeline_id=pipeline_id, limit=limit + 1, before=before)
    page, more = rows[:limit], len(rows) > limit
    return JobPage(items=views.job_reads(session, settings, page),
                   next_cursor=encode_cursor(page[-1]) if more and page else None)


@router.get("/{job_id}", response_model=JobRead, responses={404: ERRORS[404]})
def get_job(job: ExistingJob, session: SessionDep, settings: SettingsDep) -> JobRead:
    """The ledger's row: status, progress, last metrics, summary, checkpoint, MLflow run."""
    return views.job_read(session, settings, job)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead,
             responses={k: ERRORS[k] for k in (401, 404, 409)})
def cancel_job(_principal: AuthDep, job: ExistingJob, session: SessionDep, settings: SettingsDep) -> JobRead:
    """Queued: cancelled at once. Running: the supervisor sends SIGTERM within a heartbeat, SIGKILL after the
    grace period. Finished: 409. The cancel is stored in the ledger, so it survives worker restarts."""
    updated = repo.request_cancel(session, job_id=job.id)
    session.commit()
    return views.job_read(session, settings, updated)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={k: ERRORS[k] for k in (401, 404, 429)})
async def stream_events(job_id: str, slot: AdmittedStream, streams: StreamsDep, settings: SettingsDep,
                        after: Annotated[int, Query(ge=0, le=2**62, description="Send events after this id")] = 0,
                        follow: Annotated[bool, Query(description="Keep streaming until the job finishes")] = True,
                        last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,18}$")] = None,
                        ) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: `status` (state changes) and the engine's `progress`/`eval`/`checkpoint`/… events,
    each with its ledger id (resume with `Last-Event-ID` or `after`), then one `done` event carrying the job.
    Open streams are capped per token and in total (429 with `Retry-After` beyond); a stream ends after an hour."""
    try:
        cursor = max(after, int(last_event_id or 0))
        deadline = time.monotonic() + SSE_MAX_S
        while True:
            events, final = await streams.read(functools.partial(_events_since, settings, slot.job_id, cursor))
            for event in events:
                cursor = event.id
                yield ServerSentEvent(id=str(event.id), event=event.type, data=event)
            if len(events) >= EVENTS_PER_READ:
                continue  # a backlog: drain it before checking for the end
            remaining = deadline - time.monotonic()
            if final is not None or not follow or remaining <= 0:
                if final is not None:
                    yield ServerSentEvent(event="done", data=final)
                return
            await streams.wait_for_news(slot.job_id, after=cursor, timeout=remaining)
    finally:
        slot.release()


def _events_since(settings: Settings, job_id: str, cursor: int, session: Session) -> tuple[list[EventRead],
                                                                                          JobRead | None]:
    """The job's events after `cursor` and, once it has finished, the job itself (for the `done` event)."""
    events = repo.events_after(session, job_id=job_id, after=cursor, limit=EVENTS_PER_READ)
    current = repo.get(session, job_id=job_id)
    final = views.job_read(session, settings, current) if current is not None and current.status in TERMINAL \
        else None
    return [views.event_read(e) for e in events], final


# ---------------------------------------------------------------------------------------------------------------------
# The engine child's log

LOG_TAIL_DEFAULT = 64 * 1024
LOG_TAIL_MAX = 8 * 1024 * 1024


@router.get("/{job_id}/logs", response_class=PlainTextResponse, responses={k: ERRORS[k] for k in (401, 404)})
def job_logs(job: ExistingJob, settings: SettingsDep, _principal: AuthDep,
             attempt: Annotated[int | None, Query(ge=1, le=10_000, description="Default: the latest")] = None,
             tail: Annotated[int, Query(ge=1, le=LOG_TAIL_MAX, description="Bytes from the end")] = LOG_TAIL_DEFAULT,
             ) -> PlainTextResponse:
    """The engine child's output (stdout and stderr) of one attempt, its last `tail` bytes; headers name the attempt
    and the whole log's size. A token is needed even where reads are open: a log shows tracebacks and paths."""
    n = attempt or job.attempt
    # job.id comes from the ledger (a UUID), never from the request, so the path stays inside the jobs folder
    path = settings.workdir(job.id) / "logs" / f"attempt-{n}.log"
    if n < 1 or not path.is_file():
        raise NotFound(f"job {job.id}: no log for attempt {n} " + ("(it has not started yet)" if job.attempt < 1
                                                                   else f"(attempts so far: {job.attempt})"))
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail))
        text = f.read().decode("utf-8", errors="replace")
    return PlainTextResponse(text, headers={"X-Log-Attempt": str(n), "X-Log-Size": str(size)})
