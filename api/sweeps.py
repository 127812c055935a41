"""Submitting, resuming and cancelling sweeps; reading them back. The expansion itself is `sgtm_engine.sweep`.

Dedupe, the rule this module exists for: a cell is identified by its `cell_id` (the hash of its resolved pipeline and
seed). On every submission and resume, for each cell, the newest pipeline that ran that cell id (in any sweep) is
looked up:
- succeeded → reused (the cell points at it; nothing runs);
- queued or running → attached (the cell points at it; nothing is duplicated);
- failed, cancelled, or none → a fresh pipeline is created for that cell only.
Submissions are serialized (a PostgreSQL advisory lock; SQLite serializes writers), so two submissions sharing a cell
never both start it. A resubmitted sweep is a new sweep row (its own record and MLflow parent run) over the same
pipelines; `resume` applies the same rule in place to an existing sweep.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.config import Settings
from api.db import jobs as repo
from api.db import sweeps as sweep_repo
from api.db.jobs import CANCELLED, FAILED
from api.db.models import Job, Pipeline, Sweep
from api.db.status import ACTIVE
from api.errors import InvalidRequest, Problem
from api.schemas import JobError, MlflowRef, StageCreate, SweepCellRead, SweepCreate, SweepRead, SweepSummary
from api.specs import ValidSpec, check_strings, validate
from api.submissions import create_pipeline_rows, submit_once, validate_within_limits
from sgtm_engine.config import StageKind
from sgtm_engine.sweep import Cell, SweepError, SweepPlan, parse_sweep

log = logging.getLogger(__name__)

API = "/api/v1"
RERUN = (FAILED, CANCELLED)
Plan = tuple[StageCreate, ValidSpec, dict[str, Any]]


# ---------------------------------------------------------------------------------------------------------------------
# Submit, resume, cancel


def submit_sweep(session: Session, *, settings: Settings, body: SweepCreate,
                 idempotency_key: str | None) -> tuple[Sweep, bool, list[Job]]:
    """Returns (sweep, created, jobs created). Commits."""
    data = body.model_dump(mode="json", exclude_none=True)
    created: list[Job] = []

    def insert(request_hash: str) -> Sweep:
        definition = _parse(settings, data)
        plans = {cell.cell_id: _cell_plans(settings, cell) for cell in definition.cells}
        experiment = body.experiment or settings.mlflow_experiment
        sweep_repo.lock_submissions(session)
        sweep = sweep_repo.create_sweep(session, name=body.name, experiment=experiment,
                                        spec=definition.to_dict() | {"base": data["base"]},
                                        idempotency_key=idempotency_key, request_hash=request_hash)
        latest = sweep_repo.latest_pipelines(session, cell_ids=plans)
        status = sweep_repo.statuses(sweep_repo.jobs_of(session, pipeline_ids=[p.id for p in latest.values()]))
        for cell in definition.cells:
            previous = latest.get(cell.cell_id)
            if previous is not None and status[previous.id] not in RERUN:
                pipeline_id = previous.id
            else:
                pipeline, jobs = create_pipeline_rows(
                    session, settings, name=_pipeline_name(body.name, cell.position), experiment=experiment,
                    plans=plans[cell.cell_id], sweep_id=sweep.id, cell_id=cell.cell_id)
                pipeline_id = pipeline.id
                created.extend(jobs)
            sweep_repo.add_cell(session, sweep_id=sweep.id, cell_id=cell.cell_id, position=cell.position,
                                variant=cell.variant, params=cell.params, seed=cell.seed, pipeline_id=pipeline_id)
        return sweep

    sweep, is_new = submit_once(session, settings=settings, table=Sweep, key=idempotency_key, body=data,
                                insert=insert)
    if not is_new:
        return sweep, False, []  # an earlier or concurrent submission's sweep: its jobs were rung for already
    log.info("sweep %s: %d new jobs", sweep.id, len(created))
    return sweep, True, created


def _parse(settings: Settings, data: dict[str, Any]) -> SweepPlan:
    """The sweep document expanded into cells; InvalidRequest with every problem, located in the body."""
    problems: list[Problem] = []
    for key in ("base", "variants", "grid"):
        if key in data:
            problems += check_strings(data[key], ("body", key))
    if problems:
        raise InvalidRequest(problems)
    try:
        return parse_sweep(data, max_cells=settings.max_sweep_cells)
    except SweepError as e:
        raise InvalidRequest([p.nested(("body",), label="") for p in e.problems]) from None


def resume_sweep(session: Session, *, settings: Settings, sweep: Sweep) -> list[Job]:
    """Give every failed or cancelled cell a fresh pipeline (or the newer pipeline another sweep started for the same
    cell). Succeeded and active cells are left alone. Commits; returns the jobs created."""
    sweep_repo.lock_submissions(session)
    sweep_repo.set_cancelled(session, sweep=sweep, cancelled=False)  # live again: shared pipelines count it
    cells = sweep_repo.cells(session, sweep_id=sweep.id)
    latest = sweep_repo.latest_pipelines(session, cell_ids=[c.cell_id for c in cells])
    jobs = sweep_repo.jobs_of(session, pipeline_ids=[c.pipeline_id for c in cells] + [p.id for p in latest.values()])
    status = sweep_repo.statuses(jobs)
    created: list[Job] = []
    changed = False
    for cell in cells:
        newest = latest.get(cell.cell_id)
        if newest is not None and newest.id != cell.pipeline_id and status[newest.id] not in RERUN:
            sweep_repo.set_cell_pipeline(session, sweep_id=sweep.id, cell_id=cell.cell_id, pipeline_id=newest.id)
            changed = True
        elif status[cell.pipeline_id] in RERUN:
            pipeline, new_jobs = create_pipeline_rows(
                session, settings, name=_pipeline_name(sweep.name, cell.position), experiment=sweep.experiment,
                plans=_plans_from_jobs(session, jobs[cell.pipeline_id]), sweep_id=sweep.id, cell_id=cell.cell_id)
            sweep_repo.set_cell_pipeline(session, sweep_id=sweep.id, cell_id=cell.cell_id, pipeline_id=pipeline.id)
            created += new_jobs
            changed = True
    if changed:
        sweep_repo.reopen_sweep(session, sweep_id=sweep.id)  # the report is rendered again when the cells finish
    session.commit()
    return created


def cancel_sweep(session: Session, *, sweep: Sweep) -> int:
    """Cancel every queued or running job of this sweep's cells, except in pipelines that another sweep, not itself
    cancelled, also points at (running cells attached by a later submission, say): those keep running for it, and
    stop when the last sweep using them is cancelled. Commits; returns how many jobs were asked to stop."""
    sweep_repo.lock_submissions(session)  # a concurrent submission cannot attach to a pipeline being cancelled
    sweep_repo.set_cancelled(session, sweep=sweep, cancelled=True)
    cells = sweep_repo.cells(session, sweep_id=sweep.id)
    mine = [c.pipeline_id for c in cells]
    kept = sweep_repo.pipelines_kept_by_others(session, sweep_id=sweep.id, pipeline_ids=mine)
    jobs = sweep_repo.jobs_of(session, pipeline_ids=[p for p in mine if p not in kept])
    n = 0
    for pipeline_jobs in jobs.values():
        for job in pipeline_jobs:
            if job.status in ACTIVE:
                repo.request_cancel(session, job_id=job.id)
                n += 1
    session.commit()
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Read


def sweep_read(session: Session, settings: Settings, sweep: Sweep) -> SweepRead:
    cells = sweep_repo.cells(session, sweep_id=sweep.id)
    jobs = sweep_repo.jobs_of(session, pipeline_ids=[c.pipeline_id for c in cells])
    status = sweep_repo.statuses(jobs)
    reads = []
    pipelines_created_here = _created_by(session, sweep.id, [c.pipeline_id for c in cells])
    for c in cells:
        failed = next((j for j in jobs[c.pipeline_id] if j.status in RERUN and j.error_type), None)
        error = (JobError(type=failed.error_type or "", message=(failed.error_message or "")[-2000:],
                          exit_code=failed.exit_code) if failed else None)
        reads.append(SweepCellRead(
            cell_id=c.cell_id, position=c.position, variant=c.variant, params=c.params, seed=c.seed,
            status=status[c.pipeline_id], pipeline_id=c.pipeline_id,  # type: ignore[arg-type]
            reused=c.pipeline_id not in pipelines_created_here,
            jobs={j.stage_name or j.kind: j.id for j in jobs[c.pipeline_id]}, error=error))
    counts = _counts(r.status for r in reads)
    mlflow = None
    if sweep.mlflow_run_id:
        url = None
        if settings.mlflow_ui_url and sweep.mlflow_experiment_id:
            url = (f"{settings.mlflow_ui_url.rstrip('/')}/#/experiments/{sweep.mlflow_experiment_id}"
                   f"/runs/{sweep.mlflow_run_id}")
        mlflow = MlflowRef(experiment_id=sweep.mlflow_experiment_id, run_id=sweep.mlflow_run_id, url=url)
    return SweepRead(id=sweep.id, name=sweep.name, experiment=sweep.experiment,
                     status=repo.pipeline_status(r.status for r in reads),  # type: ignore[arg-type]
                     counts=counts, spec={k: v for k, v in sweep.spec.items() if k != "base"}, cells=reads,
                     mlflow=mlflow, cancelled_at=sweep.cancelled_at, created_at=sweep.created_at,
                     links=_links(sweep.id))


def sweep_summary(session: Session, sweep: Sweep) -> SweepSummary:
    cells = sweep_repo.cells(session, sweep_id=sweep.id)
    status = sweep_repo.statuses(sweep_repo.jobs_of(session, pipeline_ids=[c.pipeline_id for c in cells]))
    values = [status[c.pipeline_id] for c in cells]
    return SweepSummary(id=sweep.id, name=sweep.name, experiment=sweep.experiment,
                        status=repo.pipeline_status(values), counts=_counts(values),  # type: ignore[arg-type]
                        created_at=sweep.created_at, links=_links(sweep.id))


# ---------------------------------------------------------------------------------------------------------------------


def _cell_plans(settings: Settings, cell: Cell) -> list[Plan]:
    plans: list[Plan] = []
    index: dict[str, int] = {}
    problems: list[Problem] = []
    for stage in cell.stages:
        kind = StageKind(stage["kind"])
        loc = ("body", "cells", cell.position, stage["name"])
        try:
            valid = validate_within_limits(settings, kind, stage["spec"], loc + ("spec",))
        except InvalidRequest as e:
            problems += e.problems
            continue
        if any(parent not in index for parent in stage["inputs"].values()):
            continue  # a parent was refused above: its problems already say why
        create = StageCreate(name=stage["name"], kind=kind, spec={}, inputs=stage["inputs"], queue=stage["queue"],
                             gpus=stage["gpus"])
        plans.append((create, valid, {role: index[parent] for role, parent in stage["inputs"].items()}))
        index[stage["name"]] = len(plans) - 1
    if problems:
        raise InvalidRequest(problems)
    return plans


def _plans_from_jobs(session: Session, jobs: list[Job]) -> list[Plan]:
    """A failed cell's pipeline again, from its jobs' stored (canonical) specs and edges."""
    index = {job.id: i for i, job in enumerate(jobs)}
    edges = repo.inputs_of(session, job_ids=index)
    plans: list[Plan] = []
    for job in jobs:
        kind = StageKind(job.kind)
        valid = validate(kind, job.spec, ("spec",))
        inputs = edges.get(job.id, {})
        create = StageCreate(name=job.stage_name or job.kind, kind=kind, spec={},
                             inputs={role: jobs[index[p]].stage_name or "" for role, p in inputs.items()},
                             queue=job.queue, gpus=job.gpus)  # type: ignore[arg-type]
        plans.append((create, valid, {role: index[p] for role, p in inputs.items()}))
    return plans


def _created_by(session: Session, sweep_id: str, pipeline_ids: list[str]) -> set[str]:
    if not pipeline_ids:
        return set()
    return set(session.scalars(select(Pipeline.id).where(Pipeline.id.in_(pipeline_ids),
                                                         Pipeline.sweep_id == sweep_id)))


def _pipeline_name(name: str, position: int) -> str:
    return f"{name}-{position}"


def _counts(statuses: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


def _links(sweep_id: str) -> dict[str, str]:
    base = f"{API}/sweeps/{sweep_id}"
    return {"self": base, "cancel": f"{base}/cancel", "resume": f"{base}/resume", "report": f"{base}/report"}
