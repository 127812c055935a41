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

Inside the fresh pipelines, a stage runs once per sweep, as `sgtm sweep --local` runs it: a stage with the same stage
key (`sgtm_engine.sweep.stage_keys`: kind, resolved spec, inputs' keys) as a job that succeeded or is still active
(not being cancelled), in the pipelines the sweep's cells point at, created by the same submission or by an earlier
stage of the same cell, is not created again; its dependents read that job's output (every method's attack against
one no-filter model per seed; a failed cell's stages that succeeded). Such a job stays in the pipeline that ran it;
each other cell's pipeline records it under that cell's name for it (`pipelines.shared_stages`).
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
from sgtm_engine.sweep import Cell, SweepError, SweepPlan, parse_sweep, stage_keys

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
        found = sweep_repo.lineage(session, pipeline_ids=[p.id for p in latest.values()])
        status = found.statuses()
        pool = _reusable(found, _job_keys(found))
        for cell in definition.cells:
            previous = latest.get(cell.cell_id)
            if previous is not None and status[previous.id] not in RERUN:
                pipeline_id = previous.id
            else:
                keys = stage_keys(cell.stages)
                own, shared = _share(plans[cell.cell_id], [keys[s["name"]] for s in cell.stages], pool)
                pipeline, jobs = create_pipeline_rows(
                    session, settings, name=_pipeline_name(body.name, cell.position), experiment=experiment,
                    plans=own, sweep_id=sweep.id, cell_id=cell.cell_id, shared=shared)
                pipeline_id = pipeline.id
                created.extend(jobs)
                for job in jobs:
                    pool.setdefault(keys[job.stage_name or job.kind], job)
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
    cell), for the stages that did not succeed. Succeeded and active cells are left alone. Commits; returns the jobs
    created."""
    sweep_repo.lock_submissions(session)
    sweep_repo.set_cancelled(session, sweep=sweep, cancelled=False)  # live again: shared pipelines count it
    cells = sweep_repo.cells(session, sweep_id=sweep.id)
    latest = sweep_repo.latest_pipelines(session, cell_ids=[c.cell_id for c in cells])
    found = sweep_repo.lineage(session, pipeline_ids=[c.pipeline_id for c in cells] + [p.id for p in latest.values()])
    status = found.statuses()
    keys = _job_keys(found)
    pool = _reusable(found, keys)
    created: list[Job] = []
    changed = False
    for cell in cells:
        newest = latest.get(cell.cell_id)
        if newest is not None and newest.id != cell.pipeline_id and status[newest.id] not in RERUN:
            sweep_repo.set_cell_pipeline(session, sweep_id=sweep.id, cell_id=cell.cell_id, pipeline_id=newest.id)
            changed = True
        elif status[cell.pipeline_id] in RERUN:
            plans, plan_keys = _plans_from_jobs(found, cell.pipeline_id, keys)
            own, shared = _share(plans, plan_keys, pool)
            pipeline, new_jobs = create_pipeline_rows(
                session, settings, name=_pipeline_name(sweep.name, cell.position), experiment=sweep.experiment,
                plans=own, sweep_id=sweep.id, cell_id=cell.cell_id, shared=shared)
            sweep_repo.set_cell_pipeline(session, sweep_id=sweep.id, cell_id=cell.cell_id, pipeline_id=pipeline.id)
            created += new_jobs
            changed = True
            key_of = {plan[0].name: key for plan, key in zip(plans, plan_keys, strict=True)}
            for job in new_jobs:
                pool.setdefault(key_of[job.stage_name or job.kind], job)
    if changed:
        sweep_repo.reopen_sweep(session, sweep_id=sweep.id)  # the report is rendered again when the cells finish
    session.commit()
    return created


def cancel_sweep(session: Session, *, sweep: Sweep) -> int:
    """Cancel every queued or running job of this sweep's cells, shared stages included, except those that another
    sweep, not itself cancelled, still needs: the jobs of the pipelines it also points at (running cells attached by
    a later submission, say) and the shared stages they read. Those keep running for it, and stop when the last
    sweep using them is cancelled. Commits; returns how many jobs were asked to stop."""
    sweep_repo.lock_submissions(session)  # a concurrent submission cannot attach to a pipeline being cancelled
    sweep_repo.set_cancelled(session, sweep=sweep, cancelled=True)
    mine = sweep_repo.lineage(session, pipeline_ids=[c.pipeline_id for c in sweep_repo.cells(session,
                                                                                           sweep_id=sweep.id)])
    touched = {job.pipeline_id for job in mine.jobs.values() if job.pipeline_id is not None}
    kept = sweep_repo.pipelines_kept_by_others(session, sweep_id=sweep.id, pipeline_ids=touched)
    needed = sweep_repo.lineage(session, pipeline_ids=kept).jobs
    n = 0
    for job in mine.jobs.values():
        if job.status in ACTIVE and job.id not in needed:
            repo.request_cancel(session, job_id=job.id)
            n += 1
    session.commit()
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Read


def sweep_read(session: Session, settings: Settings, sweep: Sweep) -> SweepRead:
    cells = sweep_repo.cells(session, sweep_id=sweep.id)
    found = sweep_repo.lineage(session, pipeline_ids=[c.pipeline_id for c in cells])
    status = found.statuses()
    reads = []
    pipelines_created_here = _created_by(session, sweep.id, [c.pipeline_id for c in cells])
    for c in cells:
        failed = next((j for j in found.own[c.pipeline_id] if j.status in RERUN and j.error_type), None)
        error = (JobError(type=failed.error_type or "", message=(failed.error_message or "")[-2000:],
                          exit_code=failed.exit_code) if failed else None)
        reads.append(SweepCellRead(
            cell_id=c.cell_id, position=c.position, variant=c.variant, params=c.params, seed=c.seed,
            status=status[c.pipeline_id], pipeline_id=c.pipeline_id,  # type: ignore[arg-type]
            reused=c.pipeline_id not in pipelines_created_here,
            jobs={name: job.id for name, job in found.stages(c.pipeline_id).items()}, error=error))
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
    status = sweep_repo.lineage(session, pipeline_ids=[c.pipeline_id for c in cells]).statuses()
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


def _plans_from_jobs(found: sweep_repo.Lineage, pipeline_id: str, keys: dict[str, str]
                     ) -> tuple[list[Plan], list[str]]:
    """A failed cell's stages again, shared ones included, from their jobs' stored (canonical) specs and edges, with
    each stage's key (`keys`: by job id)."""
    stages = found.stages(pipeline_id)
    rank = {job_id: i for i, job_id in enumerate(found.upstream(job.id for job in stages.values()))}
    names = sorted(stages, key=lambda name: rank[stages[name].id])  # parents first
    index: dict[str, int] = {}  # job id -> its plan
    plans: list[Plan] = []
    for name in names:
        job = stages[name]
        kind = StageKind(job.kind)
        inputs = found.inputs.get(job.id, {})
        create = StageCreate(name=name, kind=kind, spec={}, queue=job.queue, gpus=job.gpus,  # type: ignore[arg-type]
                             inputs={role: plans[index[p]][0].name if p in index else found.jobs[p].stage_name or ""
                                     for role, p in inputs.items()})
        plans.append((create, validate(kind, job.spec, ("spec",)),
                      {role: index[p] if p in index else found.jobs[p] for role, p in inputs.items()}))
        index.setdefault(job.id, len(plans) - 1)
    return plans, [keys[stages[name].id] for name in names]


def _job_keys(found: sweep_repo.Lineage) -> dict[str, str]:
    """{job id: its stage key}, computed from the stored specs and edges exactly as from a sweep's cells."""
    order = found.upstream(found.jobs)
    return stage_keys({"name": i, "kind": found.jobs[i].kind, "spec": found.jobs[i].spec,
                       "inputs": found.inputs.get(i, {})} for i in order)


def _reusable(found: sweep_repo.Lineage, keys: dict[str, str]) -> dict[str, Job]:
    """Stage key -> a job of these pipelines' cells that succeeded or is still active and not being cancelled
    (`keys`: `_job_keys`)."""
    pool: dict[str, Job] = {}
    for pipeline_id in found.own:
        for job in found.stages(pipeline_id).values():
            if job.status not in RERUN and job.cancel_requested_at is None:
                pool.setdefault(keys[job.id], job)
    return pool


def _share(plans: list[Plan], keys: list[str], pool: dict[str, Job]) -> tuple[list[Plan], dict[str, Job | int]]:
    """The plans less the stages computed elsewhere, and {stage name: the job (or the index of the kept plan) that
    computes it}: a stage whose key `pool` has a job for, or that an earlier stage of the same cell computes (the
    no-filter cell's `train` is its `reference`). Dependents read that job's output instead. A cell that the pool
    covers whole gets a pipeline of shared stages only (a failed shared evaluation run again for the second cell
    that reads it)."""
    out: list[Plan] = []
    shared: dict[str, Job | int] = {}
    where: dict[int, int | Job] = {}
    kept: dict[str, int] = {}  # key -> index in `out`
    for i, ((stage, valid, resolved), key) in enumerate(zip(plans, keys, strict=True)):
        if key in pool or key in kept:
            where[i] = shared[stage.name] = pool[key] if key in pool else kept[key]
        else:
            out.append((stage, valid, {role: where[p] if isinstance(p, int) else p for role, p in resolved.items()}))
            where[i] = kept[key] = len(out) - 1
    return out, shared


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
