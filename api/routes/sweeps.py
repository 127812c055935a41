"""/api/v1/sweeps: submit a grid of pipelines (deduped by cell), read it, cancel or resume it, and its report."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import FileResponse

from api import reports
from api.db import sweeps as sweep_repo
from api.db.models import Sweep
from api.deps import READ_AUTH, AuthDep, EnqueuerDep, SessionDep, SettingsDep
from api.errors import NotFound
from api.ids import find_by_id
from api.paging import CursorQuery, decode_cursor, encode_cursor
from api.routes.jobs import ERRORS
from api.schemas import IdempotencyKey, SweepCreate, SweepPage, SweepRead
from api.submissions import send_after_commit
from api.sweeps import cancel_sweep, resume_sweep, submit_sweep, sweep_read, sweep_summary

router = APIRouter(prefix="/api/v1/sweeps", tags=["sweeps"], dependencies=READ_AUTH,
                   responses={401: {"description": "Missing or invalid bearer token"}})
NOT_FOUND = {404: {"description": "No such sweep"}}
FIGURE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def existing_sweep(sweep_id: str, session: SessionDep) -> Sweep:
    return find_by_id(session, Sweep, sweep_id, what="sweep")


ExistingSweep = Annotated[Sweep, Depends(existing_sweep)]


@router.post("", status_code=202, response_model=SweepRead, responses={k: ERRORS[k] for k in (401, 409, 422)})
def create_sweep(body: SweepCreate, response: Response, session: SessionDep, settings: SettingsDep,
                 enqueuer: EnqueuerDep, _principal: AuthDep,
                 idempotency_key: Annotated[IdempotencyKey | None, Header()] = None) -> SweepRead:
    """Expand the sweep into cells and give each a pipeline: cells that already succeeded (in any sweep) are
    reused, running ones attached, failed or cancelled ones (and new ones) run."""
    sweep, created, jobs = submit_sweep(session, settings=settings, body=body, idempotency_key=idempotency_key)
    if created:
        send_after_commit(session, enqueuer=enqueuer, jobs=jobs)
    response.headers["Location"] = f"/api/v1/sweeps/{sweep.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return sweep_read(session, settings, sweep)


@router.get("", response_model=SweepPage, responses={422: ERRORS[422]})
def list_sweeps(session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=200, description="Sweeps per page")] = 20,
                cursor: CursorQuery = None) -> SweepPage:
    """Newest first; page with `next_cursor`."""
    before = decode_cursor(cursor) if cursor else None
    rows = sweep_repo.list_sweeps(session, limit=limit + 1, before=before)
    page, more = rows[:limit], len(rows) > limit
    return SweepPage(items=[sweep_summary(session, s) for s in page],
                     next_cursor=encode_cursor(page[-1]) if more and page else None)


@router.get("/{sweep_id}", response_model=SweepRead, responses=NOT_FOUND)
def get_sweep(sweep: ExistingSweep, session: SessionDep, settings: SettingsDep) -> SweepRead:
    """Every cell with its status, pipeline and jobs; counts of cells by status."""
    return sweep_read(session, settings, sweep)


@router.post("/{sweep_id}/cancel", status_code=202, response_model=SweepRead,
             responses={401: ERRORS[401], **NOT_FOUND})
def cancel(_principal: AuthDep, sweep: ExistingSweep, session: SessionDep, settings: SettingsDep) -> SweepRead:
    """Cancel every queued or running job of every cell; finished cells keep their state. A cell whose pipeline
    another (not cancelled) sweep also uses keeps running for that sweep: it stops once every sweep using it is
    cancelled. `cancelled_at` is set until a resume."""
    cancel_sweep(session, sweep=sweep)
    return sweep_read(session, settings, sweep)


@router.post("/{sweep_id}/resume", status_code=202, response_model=SweepRead,
             responses={401: ERRORS[401], **NOT_FOUND})
def resume(_principal: AuthDep, sweep: ExistingSweep, session: SessionDep, settings: SettingsDep,
           enqueuer: EnqueuerDep) -> SweepRead:
    """Run again only the cells that failed or were cancelled; succeeded and running cells are left alone."""
    jobs = resume_sweep(session, settings=settings, sweep=sweep)
    send_after_commit(session, enqueuer=enqueuer, jobs=jobs)
    return sweep_read(session, settings, sweep)


@router.get("/{sweep_id}/report", responses={**NOT_FOUND, 503: {"description": "Reports are not installed"}})
def get_report(sweep: ExistingSweep, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """Tables aggregated over seeds (mean ± std, n per group) from the ledger's job results, as JSON, with the
    markdown rendering and the names of the figures (`/report/{figure}.png`). Cells not yet finished are left out
    of the aggregates (their status is listed)."""
    records = sweep_repo.report_records(session, sweep_id=sweep.id)
    return reports.render(settings, sweep.id, records).body()


@router.get("/{sweep_id}/report/{figure}.png", response_class=FileResponse,
            responses={**NOT_FOUND, 200: {"content": {"image/png": {}}},
                       503: {"description": "Reports are not installed"}})
def get_figure(sweep: ExistingSweep, figure: str, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """One figure of the report, as PNG."""
    if not FIGURE.match(figure) or ".." in figure:
        raise NotFound(f"figure {figure[:64]!r} does not exist")
    records = sweep_repo.report_records(session, sweep_id=sweep.id)
    rendered = reports.render(settings, sweep.id, records)
    path = rendered.figure(figure)
    if path is None:
        raise NotFound(f"figure {figure!r} does not exist; this report has {rendered.figures()}")
    return FileResponse(path, media_type="image/png")
