"""Run stages in this process with MLflow runs nested under a parent run: a recipe's stages in order (`sgtm run`),
or one stage of a local sweep (`sgtm_engine.local_sweep`).

No database, no broker. The service runs the same stages, one engine child per stage, and owns the MLflow runs
itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sgtm_engine.config import StageKind, spec_hash
from sgtm_engine.provenance import code_version
from sgtm_engine.recipe import Recipe
from sgtm_engine.stage import run_stage, write_json
from sgtm_engine.tracking import MlflowTracker, NullTracker, Tracker, local_tracking_uri

log = logging.getLogger(__name__)


def open_run(uri: str | None, experiment: str, name: str, *, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None) -> Tracker:
    """An MLflow run (nested under `parent_run_id` when given), or a NullTracker without a tracking URI."""
    if uri is None:
        return NullTracker()
    return MlflowTracker(uri, experiment=experiment, run_name=name, parent_run_id=parent_run_id, tags=tags)


def stage_tags(name: str, kind: StageKind, spec: Any) -> dict[str, str]:
    return {"sgtm.stage": name, "sgtm.kind": kind.value, "sgtm.spec_hash": spec_hash(spec),
            "sgtm.seed": str(getattr(spec, "seed", ""))}


def run_tracked_stage(kind: StageKind, spec: Any, folder: Path, inputs: dict[str, Path], *, uri: str | None,
                      experiment: str, name: str, parent_run_id: str | None, tags: dict[str, str] | None = None,
                      cache_dir: Path | None = None, emit: Callable[[dict[str, Any]], None] | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Run one stage in `folder` inside its own MLflow run, closed FINISHED or FAILED; returns its result."""
    tracker = open_run(uri, experiment, name, parent_run_id=parent_run_id,
                       tags={**stage_tags(name, kind, spec), **(tags or {})})
    status = "FAILED"
    try:
        result = run_stage(kind, spec, folder, inputs, tracker=tracker, emit=emit, cache_dir=cache_dir,
                           overwrite=overwrite)
        if "method" in result:
            tracker.set_tags({"sgtm.method": result["method"]})
        status = "FINISHED"
        return result
    finally:
        tracker.close(status)


def run_recipe(recipe: Recipe, workdir: Path, *, mlflow_uri: str | None = None, track: bool = True,
               cache_dir: Path | None = None, experiment: str | None = None,
               events: Callable[[str], Callable[[dict[str, Any]], None]] | None = None, overwrite: bool = False
               ) -> dict[str, Any]:
    """Run every stage; returns (and writes to WORKDIR/result.json) {'recipe', 'stages': {name: result}}.
    `events(stage name)`, when given, is where that stage's progress events also go (progress bars)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    uri = (mlflow_uri or local_tracking_uri(workdir)) if track else None
    experiment = experiment or recipe.name
    parent = open_run(uri, experiment, recipe.name,
                      tags={"sgtm.recipe": recipe.name, "sgtm.code_version": code_version()})
    results: dict[str, Any] = {}
    status = "FAILED"
    try:
        for stage in recipe.stages:
            inputs = {role: workdir / parent_name for role, parent_name in stage.inputs.items()}
            results[stage.name] = run_tracked_stage(stage.kind, stage.spec, workdir / stage.name, inputs, uri=uri,
                                                    experiment=experiment, name=stage.name,
                                                    parent_run_id=parent.run_id, cache_dir=cache_dir,
                                                    emit=events(stage.name) if events else None,
                                                    overwrite=overwrite)
        status = "FINISHED"
    finally:
        parent.close(status)
    summary = {"recipe": recipe.name, "mlflow_uri": uri, "mlflow_parent_run_id": parent.run_id, "stages": results}
    write_json(workdir / "result.json", summary)
    return summary
