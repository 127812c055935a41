"""Repository functions for sweeps: keyword-only, an explicit session, no commits (callers own transactions).

A sweep's cells point at the pipeline that currently answers for them (`sweep_cells.pipeline_id`); pipelines carry
the `cell_id` they run, which is how a later submission finds what already ran: the latest pipeline of a cell id,
whichever sweep created it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from api.db.base import new_id, utcnow
from api.db.inputs import inputs_of
from api.db.jobs import get_many
from api.db.models import Job, Pipeline, Sweep, SweepCell
from api.db.pipelines import pipeline_status
from api.db.status import QUEUED, RUNNING

#: Serializes sweep submissions on PostgreSQL (pg_advisory_xact_lock), so two submissions sharing a cell cannot both
#: start it. SQLite (embedded) serializes writers by itself.
SUBMIT_LOCK = 0x5377_6565_70


def lock_submissions(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SUBMIT_LOCK})


def create_sweep(session: Session, *, name: str, experiment: str, spec: dict[str, Any],
                 idempotency_key: str | None = None, request_hash: str | None = None) -> Sweep:
    sweep = Sweep(id=new_id(), name=name, experiment=experiment, spec=spec, idempotency_key=idempotency_key,
                  request_hash=request_hash, created_at=utcnow())
    session.add(sweep)
    session.flush()
    return sweep


def get_sweep(session: Session, *, sweep_id: str) -> Sweep | None:
    return session.get(Sweep, sweep_id)


def list_sweeps(session: Session, *, limit: int = 50, before: tuple[dt.datetime, str] | None = None) -> list[Sweep]:
    stmt = select(Sweep)
    if before is not None:
        created, sweep_id = before
        stmt = stmt.where(or_(Sweep.created_at < created, and_(Sweep.created_at == created, Sweep.id < sweep_id)))
    return list(session.scalars(stmt.order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit)))


def add_cell(session: Session, *, sweep_id: str, cell_id: str, position: int, variant: str | None,
             params: dict[str, Any], seed: int | None, pipeline_id: str) -> SweepCell:
    cell = SweepCell(sweep_id=sweep_id, cell_id=cell_id, position=position, variant=variant, params=params,
                     seed=seed, pipeline_id=pipeline_id)
    session.add(cell)
    return cell


def set_cell_pipeline(session: Session, *, sweep_id: str, cell_id: str, pipeline_id: str) -> None:
    session.execute(update(SweepCell).where(SweepCell.sweep_id == sweep_id, SweepCell.cell_id == cell_id)
                    .values(pipeline_id=pipeline_id).execution_options(synchronize_session=False))


def cells(session: Session, *, sweep_id: str) -> list[SweepCell]:
    return list(session.scalars(select(SweepCell).where(SweepCell.sweep_id == sweep_id)
                                .order_by(SweepCell.position)))


def latest_pipelines(session: Session, *, cell_ids: Iterable[str]) -> dict[str, Pipeline]:
    """{cell id: the newest pipeline that ran it}, over every sweep."""
    ids = list(set(cell_ids))
    out: dict[str, Pipeline] = {}
    for i in range(0, len(ids), 500):
        rows = session.scalars(select(Pipeline).where(Pipeline.cell_id.in_(ids[i:i + 500]))
                               .order_by(Pipeline.created_at, Pipeline.id))
        for pipeline in rows:
            assert pipeline.cell_id is not None
            out[pipeline.cell_id] = pipeline  # ascending order: the last one wins
    return out


def jobs_of(session: Session, *, pipeline_ids: Iterable[str]) -> dict[str, list[Job]]:
    """{pipeline id: its jobs in creation order}."""
    ids = list(set(pipeline_ids))
    out: dict[str, list[Job]] = {p: [] for p in ids}
    for i in range(0, len(ids), 500):
        for job in session.scalars(select(Job).where(Job.pipeline_id.in_(ids[i:i + 500]))
                                   .order_by(Job.created_at, Job.id)):
            assert job.pipeline_id is not None
            out[job.pipeline_id].append(job)
    return out


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Pipelines' own jobs, the jobs their cells share with other cells' pipelines, and every job upstream of them
    (a stage that several cells of a sweep share runs once, in one cell's pipeline: api.sweeps)."""

    own: dict[str, list[Job]]
    """{pipeline id: its jobs in creation order}."""
    shared: dict[str, dict[str, str]]
    """{pipeline id: {stage name: job id}} of its cell's stages that run in another pipeline."""
    jobs: dict[str, Job]
    """Every job, own, shared or upstream, by id."""
    inputs: dict[str, dict[str, str]]
    """{job id: {input name: parent job id}}."""

    def stages(self, pipeline_id: str) -> dict[str, Job]:
        """The pipeline's cell's stages by the names the cell gives them: its own jobs, then the shared ones."""
        own = {job.stage_name or job.kind: job for job in self.own[pipeline_id]}
        return own | {name: self.jobs[job_id] for name, job_id in self.shared[pipeline_id].items()}

    def statuses(self) -> dict[str, str]:
        """{pipeline id: its cell's status}: of its own jobs and its shared stages (`pipeline_status`). A shared
        stage counts even where none of the cell's own jobs reads it (an evaluation shared between attack settings):
        the cell has not succeeded until it has."""
        return {p: pipeline_status(job.status for job in self.stages(p).values()) for p in self.own}

    def upstream(self, job_ids: Iterable[str]) -> list[str]:
        """These jobs and every job they read from, each once, parents before children."""
        order: dict[str, None] = {}

        def visit(job_id: str) -> None:
            if job_id not in order:
                for parent_id in self.inputs.get(job_id, {}).values():
                    visit(parent_id)
                order[job_id] = None

        for job_id in job_ids:
            visit(job_id)
        return list(order)


def lineage(session: Session, *, pipeline_ids: Iterable[str]) -> Lineage:
    """The pipelines' jobs, shared stages and every job upstream of them, with the edges between them (a query per
    level)."""
    own = jobs_of(session, pipeline_ids=pipeline_ids)
    shared = {p: {} for p in own} | _shared_stages(session, list(own))
    jobs = {job.id: job for pipeline_jobs in own.values() for job in pipeline_jobs}
    missing = {job_id for named in shared.values() for job_id in named.values()} - jobs.keys()
    jobs |= {job.id: job for job in get_many(session, job_ids=missing)}
    inputs: dict[str, dict[str, str]] = {}
    frontier = list(jobs)
    while frontier:
        edges = inputs_of(session, job_ids=frontier)
        inputs |= edges
        parents = {job.id: job for job in get_many(session, job_ids={p for named in edges.values()
                                                                      for p in named.values()} - jobs.keys())}
        jobs |= parents
        frontier = list(parents)
    return Lineage(own, shared, jobs, inputs)


def _shared_stages(session: Session, pipeline_ids: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for i in range(0, len(pipeline_ids), 500):
        rows = session.execute(select(Pipeline.id, Pipeline.shared_stages)
                               .where(Pipeline.id.in_(pipeline_ids[i:i + 500])))
        out.update({pipeline_id: dict(named) for pipeline_id, named in rows if named})
    return out


def sweep_ids_of(session: Session, *, pipeline_ids: Iterable[str]) -> list[str]:
    """The sweeps whose cells point at any of these pipelines."""
    ids = list(pipeline_ids)
    if not ids:
        return []
    return list(session.scalars(select(SweepCell.sweep_id).where(SweepCell.pipeline_id.in_(ids)).distinct()))


def active_sweep_ids(session: Session) -> list[str]:
    """Sweeps whose report is not yet logged (candidates for closing)."""
    return list(session.scalars(select(Sweep.id).where(Sweep.mlflow_closed_at.is_(None))))


def is_finished(session: Session, *, sweep_id: str) -> bool:
    """Every stage of every cell is final, shared ones included (`Lineage.statuses`' rule, in two counts: the
    reaper asks this of every open sweep on every pass)."""
    active = session.scalar(select(func.count()).select_from(Job)
                            .join(SweepCell, SweepCell.pipeline_id == Job.pipeline_id)
                            .where(SweepCell.sweep_id == sweep_id, Job.status.in_([QUEUED, RUNNING])))
    if active:
        return False
    pipeline_ids = list(session.scalars(select(SweepCell.pipeline_id).where(SweepCell.sweep_id == sweep_id)))
    shared = {job_id for named in _shared_stages(session, pipeline_ids).values() for job_id in named.values()}
    return not any(job.status in (QUEUED, RUNNING) for job in get_many(session, job_ids=shared))


def report_records(session: Session, *, sweep_id: str) -> list[dict[str, Any]]:
    """What `sgtm_engine.report.build_report` reads: one record per cell, in cell order:
    {cell_id, variant, params, seed, status, pipeline_id, stages: {stage name: the job's result (None unless it
    succeeded)}}, shared stages included (`Lineage.stages`)."""
    rows = cells(session, sweep_id=sweep_id)
    found = lineage(session, pipeline_ids=[c.pipeline_id for c in rows])
    status = found.statuses()
    return [{"cell_id": c.cell_id, "variant": c.variant, "params": dict(c.params), "seed": c.seed,
             "status": status[c.pipeline_id], "pipeline_id": c.pipeline_id,
             "stages": {name: job.result for name, job in found.stages(c.pipeline_id).items()}} for c in rows]


# ---------------------------------------------------------------------------------------------------------------------
# MLflow parent run and report (the worker side)


def claim_sweep_run(session: Session, *, sweep_id: str, experiment_id: str, run_id: str) -> bool:
    result = session.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.mlflow_run_id.is_(None))
                             .values(mlflow_experiment_id=experiment_id, mlflow_run_id=run_id)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def claim_sweep_close(session: Session, *, sweep_id: str) -> bool:
    result = session.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.mlflow_closed_at.is_(None))
                             .values(mlflow_closed_at=utcnow()).execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def set_cancelled(session: Session, *, sweep: Sweep, cancelled: bool) -> None:
    sweep.cancelled_at = utcnow() if cancelled else None
    session.flush()  # the next query (which sweeps are not cancelled) must see it


def pipelines_kept_by_others(session: Session, *, sweep_id: str, pipeline_ids: Iterable[str]) -> set[str]:
    """Those of these pipelines that a cell of another, not cancelled, sweep points at."""
    ids = list(pipeline_ids)
    if not ids:
        return set()
    stmt = (select(SweepCell.pipeline_id).join(Sweep, Sweep.id == SweepCell.sweep_id)
            .where(SweepCell.pipeline_id.in_(ids), SweepCell.sweep_id != sweep_id, Sweep.cancelled_at.is_(None)))
    return set(session.scalars(stmt))


def reopen_sweep(session: Session, *, sweep_id: str) -> None:
    session.execute(update(Sweep).where(Sweep.id == sweep_id).values(mlflow_closed_at=None)
                    .execution_options(synchronize_session=False))
