"""Where a stage reports metrics: the Tracker protocol, a NullTracker, and an MLflow tracker.

Choices (architecture.md, anchors.md §0.5-0.7):
- MLflow through `MlflowClient` with an explicit run id (the fluent API keeps process-global state).
- Metrics are buffered and sent with `log_batch` (at most 1,000 per call), flushed every `flush_every` points and
  at close: per-step HTTP calls would dominate a CPU training step and slow the MLflow UI.
- When the service runs a stage, the supervisor owns the run (creates it, tags it, ends it with the final status);
  the engine only logs into it (`owns_run=False`). `sgtm run` without a server creates and ends its own runs in a
  local SQLite store.
- mlflow is imported lazily so that importing the engine stays light.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from pathlib import Path
from typing import Any, Protocol

from sgtm_engine.config import flat_params

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Reports nowhere (tests, notebooks, benchmarks with logging off)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


_INVALID = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_key(name: str) -> str:
    """MLflow accepts only ASCII alphanumerics and `_-. /:`; category names may be Spanish ('Geografía, …')."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return _INVALID.sub("_", ascii_name)


flatten = flat_params  # kept as the tracker's name for it


class MlflowTracker:
    """Logs to one MLflow run through MlflowClient, with batched metrics."""

    def __init__(self, tracking_uri: str, run_id: str | None = None, experiment: str = "sgtm",
                 run_name: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 flush_every: int = 500):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.owns_run = run_id is None
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        self.run_id = run_id
        self.flush_every = flush_every
        self._buffer: list[Any] = []

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i: i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.owns_run:
            self.client.set_terminated(self.run_id, status=status)


def local_tracking_uri(root: str | Path) -> str:
    """A local SQLite store (MLflow's file store is deprecated); `mlflow ui --backend-store-uri <this>` shows it."""
    path = Path(root).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"
