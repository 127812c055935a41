"""Submitting jobs and pipelines: validate, insert queued rows, commit, then ring the doorbell.

Idempotency: the key is a unique column. Concurrent requests with one key all try to insert; one wins, the others
hit the unique constraint, roll back and return the winner's job — so 50 retries create one job. The same key with a
different body is a 409. A key is free again `idempotency_ttl_s` after its first use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.config import Settings
from api.db import jobs as repo
from api.db.base import utcnow
from api.db.jobs import Keyed
from api.db.models import Job, Pipeline
from api.db.status import JobStatus
from api.errors import Conflict, InvalidRequest, Problem
from api.limits import limit_problems
from api.queue import Enqueuer
from api.schemas import JobCreate, PipelineCreate, is_uuid
from api.specs import ValidSpec, validate
from sgtm_engine.config import MODEL_PRODUCERS, StageKind, gpus_problems, input_role_problems, parse_stages
from sgtm_engine.errors import ConfigError

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Keyed)


def submit_job(session: Session, *, settings: Settings, body: JobCreate,
               idempotency_key: str | None) -> tuple[Job, bool]:
    """Returns (job, created). Commits."""
    def insert(request_hash: str) -> Job:
        valid = validate_within_limits(settings, body.kind, body.spec, ("body", "spec"))
        # the engine's stage rules, which parse_stages applies to a pipeline's (and a sweep's) stages
        problems = input_role_problems(body.kind, body.inputs) + gpus_problems(body.kind, body.gpus)
        if problems:
            raise InvalidRequest([p.nested(("body",), label="") for p in problems])
        parents = _check_parents(session, inputs=body.inputs, loc=("body", "inputs"))
        job_fields = _job_fields(settings, kind=body.kind, valid=valid, queue=body.queue, gpus=body.gpus,
                                 parents=list(parents.values()), loc=("body",))
        ready = all(p.status == JobStatus.SUCCEEDED for p in parents.values())
        return repo.create(session, inputs={name: p.id for name, p in parents.items()},
                           experiment=body.experiment or settings.mlflow_experiment, will_send=ready,
                           idempotency_key=idempotency_key, request_hash=request_hash, **job_fields)

    return submit_once(session, settings=settings, table=Job, key=idempotency_key,
                       body=body.model_dump(mode="json"), insert=insert)


def submit_pipeline(session: Session, *, settings: Settings, body: PipelineCreate,
                    idempotency_key: str | None) -> tuple[Pipeline, bool]:
    """Returns (pipeline, created). Commits."""
    def insert(request_hash: str) -> Pipeline:
        pipeline, _jobs = create_pipeline_rows(
            session, settings, name=body.name, experiment=body.experiment or settings.mlflow_experiment,
            plans=_pipeline_plans(session, settings, body), idempotency_key=idempotency_key, request_hash=request_hash)
        return pipeline

    return submit_once(session, settings=settings, table=Pipeline, key=idempotency_key,
                       body=body.model_dump(mode="json"), insert=insert)


def _pipeline_plans(session: Session, settings: Settings, body: PipelineCreate
                    ) -> list[tuple[Any, ValidSpec, dict[str, Any]]]:
    """The pipeline's stages as `create_pipeline_rows` takes them, checked: the engine's stage-list rules (the ones
    `sgtm run` applies to a recipe), each spec within the limits, each input an earlier stage or an existing job.
    Raises InvalidRequest with every problem."""
    try:
        parse_stages(body.model_dump(mode="json")["stages"], external=is_uuid)
    except ConfigError as e:
        raise InvalidRequest([p.nested(("body",), label="") for p in e.problems]) from None
    problems: list[Problem] = []
    names = {stage.name: i for i, stage in enumerate(body.stages)}
    plans: list[tuple[Any, ValidSpec, dict[str, Any]]] = []  # (stage, valid spec, {input: stage index | Job})
    for i, stage in enumerate(body.stages):
        loc = ("body", "stages", i)
        try:
            valid = validate_within_limits(settings, stage.kind, stage.spec, loc + ("spec",))
        except InvalidRequest as e:
            problems += e.problems
            continue
        resolved: dict[str, Any] = {}
        external: dict[str, str] = {}
        for name, ref in stage.inputs.items():
            if ref in names:  # an earlier stage: parse_stages refused later ones
                resolved[name] = names[ref]
            else:
                external[name] = ref
        try:
            resolved.update(_check_parents(session, inputs=external, loc=loc + ("inputs",)))
        except InvalidRequest as e:
            problems += e.problems
        plans.append((stage, valid, resolved))
    if problems:
        raise InvalidRequest(problems)
    return plans


def create_pipeline_rows(session: Session, settings: Settings, *, name: str, experiment: str,
                         plans: list[tuple[Any, ValidSpec, dict[str, Any]]], idempotency_key: str | None = None,
                         request_hash: str | None = None, sweep_id: str | None = None, cell_id: str | None = None,
                         shared: dict[str, Job | int] | None = None) -> tuple[Pipeline, list[Job]]:
    """Insert a pipeline and its stage jobs (no commit). `plans`: (stage with name/kind/queue/gpus, its valid spec,
    {input name: index of an earlier plan | an existing Job}); `shared`: a sweep cell's stages that another job
    computes, {stage name: an existing Job | the index of a plan}."""
    pipeline = repo.create_pipeline(session, name=name, experiment=experiment, idempotency_key=idempotency_key,
                                    request_hash=request_hash, sweep_id=sweep_id, cell_id=cell_id)
    created: list[Job] = []
    for stage, valid, resolved in plans:
        parents = [created[r] if isinstance(r, int) else r for r in resolved.values()]
        fields = _job_fields(settings, kind=stage.kind, valid=valid, queue=stage.queue, gpus=stage.gpus,
                             parents=parents, loc=("body", "stages", len(created)))
        ready = all(p.status == JobStatus.SUCCEEDED for p in parents)
        created.append(repo.create(session, inputs={n: p.id for n, p in zip(resolved, parents, strict=True)},
                                   experiment=experiment, pipeline_id=pipeline.id, stage_name=stage.name,
                                   will_send=ready, **fields))
    if shared:
        pipeline.shared_stages = {n: (created[j] if isinstance(j, int) else j).id for n, j in shared.items()}
    return pipeline, created


def send_after_commit(session: Session, *, enqueuer: Enqueuer, jobs: Iterable[Job]) -> list[str]:
    """Ring the bell for the submitted jobs that were inserted as sent (the ready ones), after their commit.
    A broker outage is logged, not raised: the job is safely queued, and marked unsent so the reaper sends it."""
    failed = []
    jobs = [job for job in jobs if job.enqueued_at is not None]  # the others wait for parents; their supervisor sends
    downstream = repo.with_parents(session, job_ids=[job.id for job in jobs])
    for job in jobs:
        try:
            enqueuer.send(job.id, job.queue, downstream=job.id in downstream)
        except Exception as e:  # noqa: BLE001 - any broker failure: the ledger already has the job
            log.warning("could not send job %s to the broker (%s); the reaper will retry", job.id, e)
            failed.append(job.id)
    if failed:
        repo.unmark_enqueued(session, job_ids=failed)
        session.commit()
    return failed


# ---------------------------------------------------------------------------------------------------------------------


def validate_within_limits(settings: Settings, kind: StageKind, data: dict[str, Any],
                           loc: tuple[str | int, ...]) -> ValidSpec:
    """A valid spec (`api.specs.validate`) within the operator's limits (`api.limits`), or InvalidRequest."""
    valid = validate(kind, data, loc)
    problems = limit_problems(settings, kind, valid.spec, loc)
    if problems:
        raise InvalidRequest(problems)
    return valid


def _check_parents(session: Session, *, inputs: dict[str, str], loc: tuple[str | int, ...]) -> dict[str, Job]:
    """Existing-job inputs (whose roles the engine's rules already checked) must name jobs that exist, produce what
    the input needs, and have not failed."""
    problems: list[Problem] = []
    found: dict[str, Job] = {}
    for name, job_id in inputs.items():
        job = repo.get(session, job_id=job_id) if is_uuid(job_id) else None
        if job is None:
            problems.append(Problem(loc + (name,), f"inputs.{name}={job_id!r}: no such job (nor an earlier stage "
                                                   "of this pipeline)", job_id))
        elif name == "model" and job.kind not in MODEL_PRODUCERS:
            problems.append(Problem(loc + (name,), f"inputs.{name}={job_id!r}: that job is a {job.kind} stage and "
                                                   "produces no model", job_id))
        elif job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            problems.append(Problem(loc + (name,), f"inputs.{name}={job_id!r}: that job {job.status}; resubmit it "
                                                   "first", job_id))
        else:
            found[name] = job
    if problems:
        raise InvalidRequest(problems)
    return found


def _job_fields(settings: Settings, *, kind: StageKind, valid: ValidSpec, queue: str | None, gpus: int,
                parents: list[Job], loc: tuple[str | int, ...]) -> dict[str, Any]:
    resolved_queue = queue or ("cpu" if valid.wants_cpu else settings.default_queue)
    if resolved_queue == "cpu" and gpus > 1:
        raise InvalidRequest([Problem(loc + ("gpus",), f"gpus={gpus}: a cpu-queue job runs as one process; "
                                                        "use queue 'gpu' or gpus=1", gpus)])
    inherited = parents[0] if parents else None
    return {
        "kind": kind.value, "spec": valid.spec, "spec_hash": valid.hash,
        "method": valid.method or (inherited.method if inherited else kind.value),
        "seed": valid.seed if valid.seed is not None else (inherited.seed if inherited else None),
        "queue": resolved_queue, "gpus": gpus, "max_attempts": settings.max_attempts,
    }


def submit_once(session: Session, *, settings: Settings, table: type[K], key: str | None, body: Any,
                insert: Callable[[str], K]) -> tuple[K, bool]:
    """A submission under an Idempotency-Key `key` (or none): returns (its row, whether this request created it).
    An earlier submission under the key is returned as it is (`replay`); else `insert(request hash)` validates the
    request and adds its rows, and this commits them. A concurrent request with the same key that commits first
    makes this one's insert hit the key's unique constraint: it rolls back and returns the winner's row."""
    request_hash = _hash(body)
    existing = replay(session, settings=settings, table=table, key=key, request_hash=request_hash)
    if existing is not None:
        return existing, False
    try:
        row = insert(request_hash)
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = replay(session, settings=settings, table=table, key=key, request_hash=request_hash)
        if existing is None:
            raise
        return existing, False
    return row, True


def replay(session: Session, *, settings: Settings, table: type[Keyed], key: str | None,
           request_hash: str) -> Keyed | None:
    """The earlier submission (job, pipeline or sweep) under an Idempotency-Key, if it is still live: same body →
    returned again; different body → 409; past its time to live → the key is released and None returned."""
    if key is None:
        return None
    row = repo.get_by_idempotency_key(session, table=table, key=key)
    if row is not None and row.created_at < _ttl_cutoff(settings):
        repo.release_key(session, table=table, row_id=row.id)
        return None
    if row is not None and row.request_hash != request_hash:
        raise Conflict(f"Idempotency-Key {key!r} was used for a different request ({table.__name__.lower()} "
                       f"{row.id}); use a new key for a new submission")
    return row


def _ttl_cutoff(settings: Settings) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=settings.idempotency_ttl_s)


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
