"""Liveness (`/health`: the process answers) and readiness (`/ready`: the ledger answers, schema at head, the ledger
can be written, and in embedded mode the executor is alive)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError

from api.deps import SessionDep, SettingsDep
from api.liveness import executor_check, ledger_writable_check
from api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
def ready(request: Request, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    expected = request.app.state.schema_head
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
        try:
            version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError):  # no alembic_version table (SELECT 1 just worked)
            session.rollback()
            version = None
        if version is None:
            checks["schema"] = "not migrated: run `alembic upgrade head`"
        elif expected is not None and version != expected:
            checks["schema"] = f"at {version}, expected {expected}: run migrations"
        else:
            checks["schema"] = "ok"
        checks["ledger_writable"] = ledger_writable_check(settings, session)
    except SQLAlchemyError as e:
        checks["database"] = f"unavailable ({e.__class__.__name__})"
    if settings.mode == "embedded":
        checks["executor"] = executor_check(settings)
    ok = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ok else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
