"""The supervisor's MLflow run store: creates, tags, resumes and closes runs by id for jobs, pipelines and sweeps.

Not the engine's `sgtm_engine.tracking.Tracker`, which logs one stage's metrics into a run the supervisor opened.
MLflow through `MlflowClient` with explicit run ids (no fluent, process-global state). The supervisor owns each
run's lifecycle: create (tags, params), RUNNING again on resume, FINISHED / FAILED / KILLED at the end.

Choices made here:
- mlflow is imported when a run store is built, not at module import, so `import workers.tasks` stays light.
- HTTP retries are cut to 2 (MLflow's default backs off for minutes): an MLflow outage must not hold a job
  hostage. Callers treat every run store error as non-fatal and the reaper reconciles later.
- Params are the submitted spec, flattened (`spec.model.n_layer`), in batches of ≤100 (the LogBatch limit).
- Checkpoints are referenced by URI + sha256 tags, never uploaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from sgtm_engine.folders import experiment_location

log = logging.getLogger(__name__)

RUN_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PARAM_VALUE_LIMIT = 6000


class RunStore(Protocol):
    uri: str | None

    def experiment_id(self, name: str) -> str: ...
    def create_run(self, experiment_id: str, *, name: str, tags: dict[str, str],
                   parent_run_id: str | None = None) -> str: ...
    def set_running(self, run_id: str) -> None: ...
    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...
    def log_params(self, run_id: str, params: dict[str, str]) -> None: ...
    def log_dict(self, run_id: str, data: dict[str, Any], name: str) -> None: ...
    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None: ...
    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None: ...
    def close(self, run_id: str, status: str) -> None: ...
    def delete_run(self, run_id: str) -> None: ...


class NullRunStore:
    """No MLflow: jobs still run; the ledger has no run ids."""

    uri: str | None = None

    def experiment_id(self, name: str) -> str:
        raise RuntimeError("tracking is off")

    def create_run(self, experiment_id: str, *, name: str, tags: dict[str, str],
                   parent_run_id: str | None = None) -> str:
        raise RuntimeError("tracking is off")

    def set_running(self, run_id: str) -> None: ...
    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...
    def log_params(self, run_id: str, params: dict[str, str]) -> None: ...
    def log_dict(self, run_id: str, data: dict[str, Any], name: str) -> None: ...
    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None: ...
    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None: ...
    def close(self, run_id: str, status: str) -> None: ...
    def delete_run(self, run_id: str) -> None: ...


class MlflowRunStore:
    def __init__(self, uri: str, *, artifact_root: Path | None = None):
        """`artifact_root`: where new experiments keep artifacts when `uri` is a local store (embedded mode);
        with a tracking server the server decides (proxied artifacts)."""
        for key, value in _CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._artifact_root = artifact_root
        self._experiments: dict[str, str] = {}

    def experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                location = None
                if self._artifact_root is not None:
                    location = experiment_location(self._artifact_root, name)
                try:
                    self._experiments[name] = self.client.create_experiment(name, artifact_location=location)
                except Exception:  # noqa: BLE001 - another worker created it first: read theirs
                    found = self.client.get_experiment_by_name(name)
                    if found is None:
                        raise
                    self._experiments[name] = found.experiment_id
            else:
                self._experiments[name] = found.experiment_id
        return self._experiments[name]

    def create_run(self, experiment_id: str, *, name: str, tags: dict[str, str],
                   parent_run_id: str | None = None) -> str:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id  # what the UI nests by
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=name)
        return str(run.info.run_id)

    def set_running(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_dict(self, run_id: str, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # the LogBatch limit
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def close(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)


def make_run_store(uri: str | None, *, artifact_root: Path | None = None) -> RunStore:
    if not uri:
        return NullRunStore()
    return MlflowRunStore(uri, artifact_root=artifact_root)

