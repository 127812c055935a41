"""MLflow run lifecycle against the ledger: open (or resume) a job's run nested under its pipeline's run, close it
with the status that matches the job, and close pipeline runs when their last job finishes.

Every MLflow failure is logged and swallowed: a job never fails because tracking is down. Closing is recorded in
the ledger (`mlflow_closed_at`), so the reaper can finish what a crashed or cut-off supervisor left open.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.db import jobs as repo
from api.db import sweeps as sweep_repo
from api.db.models import Job, SweepCell
from api.db.session import session_scope
from sgtm_engine.folders import RESULT
from sgtm_engine.mlflow_keys import headline_metrics, run_tags, spec_params
from workers.run_store import RUN_STATUS, RunStore

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The ledger no longer lists this supervisor's attempt as the running one."""


def open_job_run(*, run_store: RunStore, factory: sessionmaker[Session], job: Job, attempt: int,
                 inputs: dict[str, str], code_version: str) -> str | None:
    """The job's run id (created on the first attempt, set RUNNING again on a resume), or None without MLflow."""
    if run_store.uri is None:
        return None
    try:
        if job.mlflow_run_id:
            run_store.set_running(job.mlflow_run_id)
            run_store.set_tags(job.mlflow_run_id, {"attempt": str(attempt)})
            return job.mlflow_run_id
        parent = _pipeline_run(run_store=run_store, factory=factory, pipeline_id=job.pipeline_id)
        experiment_id = run_store.experiment_id(job.experiment)
        tags = {**run_tags(kind=job.kind, method=job.method, seed=job.seed, spec_hash=job.spec_hash,
                           code_version=code_version, stage=job.stage_name),
                "job_id": job.id, "attempt": str(attempt), "queue": job.queue}
        if job.pipeline_id:
            tags["pipeline_id"] = job.pipeline_id
        tags.update({f"input.{name}": parent_id for name, parent_id in inputs.items()})
        name = f"{job.stage_name or job.kind}-{job.method}-s{job.seed}-{job.spec_hash[:8]}"
        run_id = run_store.create_run(experiment_id, name=name, tags=tags, parent_run_id=parent)
        run_store.log_params(run_id, spec_params(job.spec))
    except Exception as e:  # noqa: BLE001 - tracking is best effort; the job runs without a run id
        log.warning("MLflow unavailable for job %s (%s): running without tracking", job.id, e)
        return None
    with session_scope(factory) as session:
        if not repo.set_mlflow_run(session, job_id=job.id, attempt=attempt, experiment_id=experiment_id,
                                   run_id=run_id):
            raise LeaseLost(job.id)
    return run_id


def _pipeline_run(*, run_store: RunStore, factory: sessionmaker[Session], pipeline_id: str | None) -> str | None:
    """The pipeline's parent run, created by whichever of its jobs starts first (a conditional UPDATE decides).
    A sweep cell's pipeline run nests under the sweep's run and carries the cell's variant, grid values and seed."""
    if pipeline_id is None:
        return None
    with session_scope(factory) as session:
        pipeline = repo.get_pipeline(session, pipeline_id=pipeline_id)
        assert pipeline is not None
        if pipeline.mlflow_run_id:
            return pipeline.mlflow_run_id
        name, experiment, sweep_id = pipeline.name, pipeline.experiment, pipeline.sweep_id
        cell = (session.get(SweepCell, (sweep_id, pipeline.cell_id)) if sweep_id and pipeline.cell_id else None)
        cell_info = (cell.cell_id, cell.variant, dict(cell.params), cell.seed) if cell is not None else None
    experiment_id = run_store.experiment_id(experiment)
    tags = {**run_tags(kind="pipeline", recipe=name), "pipeline_id": pipeline_id}
    parent = None
    params: dict[str, str] = {}
    if sweep_id is not None:
        parent = _sweep_run(run_store=run_store, factory=factory, sweep_id=sweep_id)
        tags["sgtm.sweep_id"] = sweep_id
    if cell_info is not None:
        cell_id, variant, grid, seed = cell_info
        params = {path: _param(value) for path, value in grid.items()}
        tags.update({"sgtm.cell_id": cell_id, "sgtm.variant": variant or "", **run_tags(kind="cell", seed=seed)})
        tags.update({f"sgtm.param.{path}": value for path, value in params.items()})
        name = _cell_run_name(variant, grid, seed) or name
    run_id = run_store.create_run(experiment_id, name=name, tags=tags, parent_run_id=parent)
    with session_scope(factory) as session:
        won = repo.claim_pipeline_run(session, pipeline_id=pipeline_id, experiment_id=experiment_id, run_id=run_id)
    if won:
        if params:
            run_store.log_params(run_id, params)
        return run_id
    run_store.delete_run(run_id)  # another job of the pipeline created the parent run at the same moment
    with session_scope(factory) as session:
        pipeline = repo.get_pipeline(session, pipeline_id=pipeline_id)
        return pipeline.mlflow_run_id if pipeline else None


def close_job_run(*, run_store: RunStore, factory: sessionmaker[Session], job_id: str, run_id: str, status: str,
                  result: dict[str, Any] | None = None) -> bool:
    """Close a finished job's run with the matching status (and its result's references), then record it."""
    try:
        if result is not None:
            checkpoint = result.get("checkpoint") or {}
            tags = {"status": status}
            if checkpoint.get("path"):
                tags["checkpoint.uri"] = str(checkpoint["path"])
            if checkpoint.get("sha256"):
                tags["checkpoint.sha256"] = str(checkpoint["sha256"])
            tags.update(run_tags(code_version=result.get("code_version")))
            if result.get("manifest_hash"):
                tags["data_manifest_hash"] = str(result["manifest_hash"])
            run_store.set_tags(run_id, tags)
            run_store.log_dict(run_id, result, RESULT)
        run_store.close(run_id, RUN_STATUS[status])
    except Exception as e:  # noqa: BLE001 - the reaper retries
        log.warning("could not close MLflow run %s of job %s (%s); the reaper will retry", run_id, job_id, e)
        return False
    with session_scope(factory) as session:
        repo.mark_run_closed(session, job_id=job_id)
    return True


def close_finished_pipelines(*, run_store: RunStore, factory: sessionmaker[Session],
                             pipeline_ids: Iterable[str] | None = None) -> int:
    """Close the parent run of every pipeline whose jobs have all finished: FINISHED if all succeeded, else
    FAILED (any failed) or KILLED (any cancelled)."""
    if run_store.uri is None:
        return 0
    closed = 0
    with session_scope(factory) as session:
        todo = [(p.id, p.mlflow_run_id) for p in repo.pipelines_to_close(session, pipeline_ids=pipeline_ids)]
    for pipeline_id, run_id in todo:
        with session_scope(factory) as session:
            if not repo.claim_pipeline_close(session, pipeline_id=pipeline_id):
                continue
            jobs = repo.pipeline_jobs(session, pipeline_id=pipeline_id)
            status = repo.pipeline_status(j.status for j in jobs)
            headline = headline_metrics({j.stage_name or j.id: {"metrics": j.last_metrics} for j in jobs})
        try:
            if headline:  # the pipeline's run shows its stages' headline numbers, as `sgtm run`'s parent run does
                run_store.log_metrics(str(run_id), headline)
            run_store.close(str(run_id), RUN_STATUS[status])
            closed += 1
        except Exception as e:  # noqa: BLE001 - reopen so the reaper retries
            log.warning("could not close pipeline run %s (%s)", run_id, e)
            with session_scope(factory) as session:
                repo.reopen_pipeline_close(session, pipeline_id=pipeline_id)
    return closed


# ---------------------------------------------------------------------------------------------------------------------
# Sweeps: a parent run over the cells' pipeline runs, closed with the report once every cell has finished


def _sweep_run(*, run_store: RunStore, factory: sessionmaker[Session], sweep_id: str) -> str | None:
    """The sweep's parent run (created by the first cell to start; RUNNING again when a resumed cell starts)."""
    with session_scope(factory) as session:
        sweep = sweep_repo.get_sweep(session, sweep_id=sweep_id)
        if sweep is None:
            return None
        run_id, name, experiment, spec = sweep.mlflow_run_id, sweep.name, sweep.experiment, dict(sweep.spec)
    if run_id:
        run_store.set_running(run_id)
        return run_id
    experiment_id = run_store.experiment_id(experiment)
    run_id = run_store.create_run(experiment_id, name=name, tags={**run_tags(kind="sweep"), "sgtm.sweep_id": sweep_id})
    with session_scope(factory) as session:
        won = sweep_repo.claim_sweep_run(session, sweep_id=sweep_id, experiment_id=experiment_id, run_id=run_id)
    if won:
        run_store.log_dict(run_id, spec, "sweep.json")
        return run_id
    run_store.delete_run(run_id)
    with session_scope(factory) as session:
        sweep = sweep_repo.get_sweep(session, sweep_id=sweep_id)
        return sweep.mlflow_run_id if sweep else None


def close_finished_sweeps(*, run_store: RunStore, factory: sessionmaker[Session],
                          pipeline_ids: Iterable[str] | None = None) -> int:
    """For every sweep (using one of `pipeline_ids`, or any) whose cells have all finished and whose report is not
    logged yet: render the report (`sgtm_engine.report`), log its tables, figures and aggregate metrics to the sweep's
    parent run, and close that run (FINISHED if every cell succeeded, else FAILED or KILLED)."""
    if run_store.uri is None:
        return 0
    with session_scope(factory) as session:
        if pipeline_ids is None:
            candidates = sweep_repo.active_sweep_ids(session)
        else:
            candidates = sweep_repo.sweep_ids_of(session, pipeline_ids=pipeline_ids)
    closed = 0
    for sweep_id in candidates:
        with session_scope(factory) as session:
            sweep = sweep_repo.get_sweep(session, sweep_id=sweep_id)
            if sweep is None or sweep.mlflow_closed_at is not None:
                continue
            if not sweep_repo.is_finished(session, sweep_id=sweep_id):
                continue
            if not sweep_repo.claim_sweep_close(session, sweep_id=sweep_id):
                continue
            records = sweep_repo.report_records(session, sweep_id=sweep_id)
        status = repo.pipeline_status(r["status"] for r in records)
        try:
            run_id = _sweep_run(run_store=run_store, factory=factory, sweep_id=sweep_id)
            if run_id is None:
                continue
            log_sweep_report(run_store=run_store, run_id=run_id, records=records)
            run_store.close(run_id, RUN_STATUS[status])
            closed += 1
        except Exception as e:  # noqa: BLE001 - reopen so the reaper retries
            log.warning("could not close sweep run of %s (%s)", sweep_id, e)
            with session_scope(factory) as session:
                sweep_repo.reopen_sweep(session, sweep_id=sweep_id)
    return closed


def log_sweep_report(*, run_store: RunStore, run_id: str, records: list[dict[str, Any]]) -> bool:
    """Render the report into a temporary folder and log it under `report/` with its aggregate metrics. A missing
    or failing report module is logged, not raised: the run still closes."""
    try:
        from sgtm_engine.report import build_report
    except ImportError as e:
        log.warning("sweep report not rendered: sgtm_engine.report unavailable here (%s)", e)
        return False
    clean = [{k: r.get(k) for k in ("cell_id", "variant", "params", "seed", "status", "stages")} for r in records]
    try:
        with tempfile.TemporaryDirectory(prefix="sgtm-report-") as tmp:
            report = build_report(clean, Path(tmp))
            run_store.log_artifacts(run_id, Path(tmp), "report")
            metrics = {k: v for k, v in (report.get("metrics") or {}).items()
                       if isinstance(v, int | float) and math.isfinite(v)}
            if metrics:
                run_store.log_metrics(run_id, metrics)
    except Exception:  # noqa: BLE001 - a report bug must not keep the sweep's run open forever
        log.exception("sweep report failed for run %s", run_id)
        return False
    return True


def _param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _cell_run_name(variant: str | None, grid: dict[str, Any], seed: int | None) -> str:
    parts = [variant or ""] + [f"{path.rsplit('.', 1)[-1]}={_param(v)}" for path, v in grid.items()]
    if seed is not None:
        parts.append(f"s{seed}")
    return "-".join(p for p in parts if p)[:250]
