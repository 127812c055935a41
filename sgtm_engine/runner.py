"""Run stages in this process with MLflow runs nested under a parent run: a recipe's stages in order (`sgtm run`),
or one stage of a local sweep (`sgtm_engine.local_sweep`).

No database, no broker. The service runs the same stages, one engine child per stage, and owns the MLflow runs
itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgtm_engine.config import StageKind, spec_hash, to_dict
from sgtm_engine.errors import ConfigError
from sgtm_engine.folders import (
    RESULT,
    hold_folder,
    local_artifact_root,
    local_tracking_uri,
    make_folder,
    repoint_local_store,
    write_json,
)
from sgtm_engine.mlflow_keys import headline_metrics, run_tags, spec_params
from sgtm_engine.provenance import code_version
from sgtm_engine.recipe import Recipe, recipe_data
from sgtm_engine.stage import finished_result, run_stage
from sgtm_engine.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    check_server,
)

if TYPE_CHECKING:
    from sgtm_engine.progress import Emit

log = logging.getLogger(__name__)


def open_run(uri: str | None, experiment: str, name: str, *, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None, artifact_root: Path | None = None) -> Tracker:
    """An MLflow run (nested under `parent_run_id` when given), or a NullTracker without a tracking URI."""
    if uri is None:
        return NullTracker()
    from mlflow.exceptions import MlflowException

    try:
        return MlflowTracker(uri, experiment=experiment, run_name=name, parent_run_id=parent_run_id, tags=tags,
                             artifact_root=artifact_root)
    except MlflowException as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"MLflow store {uri}: could not open run {name!r} ({reason[:300]}); check the store, name "
                          "another with --mlflow-uri, or run with --no-track") from exc


def parent_run(workdir: Path, uri: str | None, experiment: str, name: str, *, tags: dict[str, str],
               artifact_root: Path | None = None) -> Tracker:
    """The MLflow run a recipe's or a sweep's stage runs nest under. A rerun in the same folder, under the same name,
    reopens the run an earlier one opened when the store holds it, so a resumed run stays one run in MLflow;
    <workdir>/mlflow_run.json keeps its id. The folder's own store is re-pointed first if the folder moved."""
    if uri is not None:
        check_server(uri)  # before anything runs: a wrong URI is said in seconds, not after minutes of retries
    if uri == local_tracking_uri(workdir) and (moved_from := repoint_local_store(workdir)) is not None:
        log.info("%s moved from %s: its MLflow store now points at the artifacts here", workdir, moved_from)
    record = workdir / "mlflow_run.json"
    known = json.loads(record.read_text()) if record.exists() else {}
    # a run id is a UUID: the store holding it is the store it was opened in (a moved folder's store included)
    reopened = MlflowTracker.reopened(uri, known["run_id"]) if uri and known.get("name") == name else None
    run = reopened or open_run(uri, experiment, name, tags=tags, artifact_root=artifact_root)
    if uri is not None:
        write_json(record, {"mlflow_uri": uri, "name": name, "run_id": run.run_id})
    return run


def run_tracked_stage(kind: StageKind, spec: Any, folder: Path, inputs: dict[str, Path], *, uri: str | None,
                      experiment: str, name: str, parent_run_id: str | None, tags: dict[str, str] | None = None,
                      cache_dir: Path | None = None, emit: Emit | None = None,
                      overwrite: bool = False, recipe: str | None = None, artifact_root: Path | None = None
                      ) -> dict[str, Any]:
    """Run one stage in `folder` inside its own MLflow run (tags and params as mlflow_keys.run_tags and spec_params
    say), closed FINISHED or FAILED; returns its result."""
    scheme = run_tags(kind=kind.value, stage=name, recipe=recipe, spec_hash=spec_hash(spec),
                      seed=getattr(spec, "seed", None), code_version=code_version())
    tracker = open_run(uri, experiment, name, parent_run_id=parent_run_id, tags={**(tags or {}), **scheme},
                       artifact_root=artifact_root)
    status = "FAILED"
    try:
        tracker.log_params(spec_params(to_dict(spec)))
        result = run_stage(kind, spec, folder, inputs, tracker=tracker, emit=emit, cache_dir=cache_dir,
                           overwrite=overwrite)
        # an evaluate or ablate stage inherits its method and seed from the model it was given
        tracker.set_tags(run_tags(method=result.get("method"), seed=result.get("seed"),
                                  code_version=result.get("code_version")))  # the run's tag is its record's
        status = "FINISHED"
        return result
    finally:
        tracker.close(status)


def run_recipe(recipe: Recipe, workdir: Path, *, mlflow_uri: str | None = None, track: bool = True,
               cache_dir: Path | None = None, experiment: str | None = None,
               events: Callable[[str], Emit] | None = None, overwrite: bool = False,
               run_name: str | None = None) -> dict[str, Any]:
    """Run every stage; returns (and writes to WORKDIR/result.json) {'recipe', 'stages': {name: result}}.

    The MLflow store is a SQLite file in WORKDIR with its artifacts beside it, unless `mlflow_uri` names another.
    The parent run is named `run_name` (default: the recipe's name and spec hash) and carries the stages' headline
    metrics (`headline_metrics`). `events(stage name)`, when given, is where that stage's progress events also go
    (progress bars)."""
    workdir = make_folder(Path(workdir))
    uri = (mlflow_uri or local_tracking_uri(workdir)) if track else None
    artifact_root = local_artifact_root(workdir) if track and mlflow_uri is None else None
    experiment = experiment or recipe.experiment or recipe.name
    name = run_name or f"{recipe.name} ({spec_hash(recipe_data(recipe))[:8]})"
    with hold_folder(workdir, f"sgtm run {recipe.name}"):  # one process per run folder
        parent = parent_run(workdir, uri, experiment, name, artifact_root=artifact_root,
                            tags={**run_tags(kind="pipeline", recipe=recipe.name, code_version=code_version()),
                                  "sgtm.workdir": str(workdir.resolve())})
        results: dict[str, Any] = {}
        status = "FAILED"
        try:
            for stage in recipe.stages:
                done = finished_result(workdir / stage.name, stage.kind, stage.spec)
                if done is not None:  # a rerun keeps what finished: no second run of it, in MLflow or on the CPU
                    results[stage.name] = done
                    if events:
                        events(stage.name)({"type": "kept", "kind": stage.kind.value})
                    continue
                inputs = {role: workdir / parent_name for role, parent_name in stage.inputs.items()}
                results[stage.name] = run_tracked_stage(stage.kind, stage.spec, workdir / stage.name, inputs, uri=uri,
                                                        experiment=experiment, name=stage.name,
                                                        parent_run_id=parent.run_id, cache_dir=cache_dir,
                                                        emit=events(stage.name) if events else None,
                                                        overwrite=overwrite, recipe=recipe.name,
                                                        artifact_root=artifact_root)
            parent.log_metrics(headline_metrics(results), step=0)
            status = "FINISHED"
        finally:
            parent.close(status)
        summary = {"recipe": recipe.name, "mlflow_uri": uri, "mlflow_parent_run_id": parent.run_id, "stages": results}
        write_json(workdir / RESULT, summary)
        return summary


def register_last_model(recipe: Recipe, name: str) -> dict[str, str]:
    """The override that registers the recipe's final model as `name`: `<stage>.register` on its last stage that
    writes a model (an evaluate stage only when it calibrates)."""
    for stage in reversed(recipe.stages):
        spec = stage.spec
        if stage.kind == StageKind.EVALUATE:
            writes = spec.ablate is not None and spec.calibrate.enabled and spec.calibrate.steps > 0
        else:
            writes = getattr(spec, "save_model", True)
        if writes:
            return {f"{stage.name}.register": name}
    raise ConfigError(f"--register {name}: recipe {recipe.name} has no stage that writes a model")
