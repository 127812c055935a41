"""/api/v1/pipelines: several stages in one request (a chain or a sweep), one MLflow parent run."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from api import views
from api.db import jobs as repo
from api.db.models import Pipeline
from api.db.status import ACTIVE
from api.deps import READ_AUTH, AuthDep, EnqueuerDep, SessionDep, SettingsDep
from api.ids import find_by_id
from api.routes.jobs import ERRORS
from api.schemas import IdempotencyKey, PipelineCreate, PipelineRead
from api.submissions import send_after_commit, submit_pipeline

router = APIRouter(prefix="/api/v1/pipelines", tags=["pipelines"], dependencies=READ_AUTH,
                   responses={401: {"description": "Missing or invalid bearer token"}})


@router.post("", status_code=202, response_model=PipelineRead, responses={k: ERRORS[k] for k in (401, 409, 422)})
def create_pipeline(body: PipelineCreate, response: Response, session: SessionDep, settings: SettingsDep,
                    enqueuer: EnqueuerDep, _principal: AuthDep,
                    idempotency_key: Annotated[IdempotencyKey | None, Header()] = None) -> PipelineRead:
    """Submit a chain (train → ablate → evaluate/attack) or a sweep. Stages without parents start at once; the
    others when all their parents have succeeded."""
    pipeline, created = submit_pipeline(session, settings=settings, body=body, idempotency_key=idempotency_key)
    if created:
        send_after_commit(session, enqueuer=enqueuer, jobs=repo.pipeline_jobs(session, pipeline_id=pipeline.id))
    response.headers["Location"] = f"{views.API}/pipelines/{pipeline.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return views.pipeline_read(session, settings, pipeline)


@router.get("/{pipeline_id}", response_model=PipelineRead, responses={404: {"description": "No such pipeline"}})
def get_pipeline(pipeline_id: str, session: SessionDep, settings: SettingsDep) -> PipelineRead:
    pipeline = find_by_id(session, Pipeline, pipeline_id, what="pipeline")
    return views.pipeline_read(session, settings, pipeline)


@router.post("/{pipeline_id}/cancel", status_code=202, response_model=PipelineRead,
             responses={401: ERRORS[401], 404: {"description": "No such pipeline"}})
def cancel_pipeline(pipeline_id: str, session: SessionDep, settings: SettingsDep,
                    _principal: AuthDep) -> PipelineRead:
    """Cancel every queued or running stage; finished stages keep their state."""
    pipeline = find_by_id(session, Pipeline, pipeline_id, what="pipeline")
    for job in repo.pipeline_jobs(session, pipeline_id=pipeline.id):
        if job.status in ACTIVE:
            repo.request_cancel(session, job_id=job.id)
    session.commit()
    return views.pipeline_read(session, settings, pipeline)
