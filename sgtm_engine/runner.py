"""Run a recipe's stages in this process, in order, with MLflow runs nested under one parent run.

This is `sgtm run` and the demo's engine: no database, no broker. The service runs the same stages, one engine
child per stage, and owns the MLflow runs itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sgtm_engine.config import spec_hash
from sgtm_engine.pipeline import run_stage, write_json
from sgtm_engine.provenance import code_version
from sgtm_engine.recipe import Recipe
from sgtm_engine.tracking import MlflowTracker, NullTracker, Tracker, local_tracking_uri

log = logging.getLogger(__name__)


def run_recipe(recipe: Recipe, workdir: Path, *, mlflow_uri: str | None = None, track: bool = True,
               cache_dir: Path | None = None, experiment: str | None = None, emit=None) -> dict[str, Any]:
    """Run every stage; returns (and writes to WORKDIR/result.json) {'recipe', 'stages': {name: result}}."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    uri = (mlflow_uri or local_tracking_uri(workdir)) if track else None
    experiment = experiment or recipe.name
    parent: Tracker = MlflowTracker(uri, experiment=experiment, run_name=recipe.name,
                                    tags={"sgtm.recipe": recipe.name, "sgtm.code_version": code_version()}) \
        if uri else NullTracker()
    results: dict[str, Any] = {}
    status = "FAILED"
    try:
        for stage in recipe.stages:
            tags = {"sgtm.stage": stage.name, "sgtm.kind": stage.kind.value, "sgtm.spec_hash": spec_hash(stage.spec),
                    "sgtm.seed": str(getattr(stage.spec, "seed", ""))}
            tracker: Tracker = MlflowTracker(uri, experiment=experiment, run_name=stage.name,
                                             parent_run_id=parent.run_id, tags=tags) if uri else NullTracker()
            inputs = {role: workdir / parent_name for role, parent_name in stage.inputs.items()}
            stage_status = "FAILED"
            try:
                results[stage.name] = run_stage(stage.kind, stage.spec, workdir / stage.name, inputs, tracker=tracker,
                                                emit=emit, cache_dir=cache_dir)
                if "method" in results[stage.name]:
                    tracker.set_tags({"sgtm.method": results[stage.name]["method"]})
                stage_status = "FINISHED"
            finally:
                tracker.close(stage_status)
        status = "FINISHED"
    finally:
        parent.close(status)
    summary = {"recipe": recipe.name, "mlflow_uri": uri, "mlflow_parent_run_id": parent.run_id, "stages": results}
    write_json(workdir / "result.json", summary)
    return summary
