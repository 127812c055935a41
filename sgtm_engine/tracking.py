"""Where a stage reports metrics: the Tracker protocol, a NullTracker, and an MLflow tracker.

Choices (docs/architecture.md):
- MLflow through `MlflowClient` with an explicit run id (the fluent API keeps process-global state).
- Metrics are buffered and sent with `log_batch` (at most 1,000 per call), every `flush_every` points or
  `flush_seconds`, and at close: per-step HTTP calls would dominate a CPU training step and slow the MLflow UI.
- The store is written by one background thread per run, so training never waits on SQLite commits or a server's
  round trip (bench_train measures what is left); tracking failures are retried, then logged, never raised.
- MLflow's usage telemetry is switched off unless the user set it (it phones home; offline it waits on timeouts).
- When the service runs a stage, the supervisor owns the run (creates it, tags it, ends it with the final status);
  the engine only logs into it (`owns_run=False`). `sgtm run` without a server creates and ends its own runs in a
  local SQLite store.
- mlflow is imported lazily so that importing the engine stays light.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sgtm_engine.config import flat_params
from sgtm_engine.errors import ConfigError
from sgtm_engine.folders import experiment_location
from sgtm_engine.mlflow_keys import metric_key

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_model(self, name: str, write_export: Callable[[Path], Path], registered_name: str | None = None
                  ) -> str | None: ...
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

    def log_model(self, name: str, write_export: Callable[[Path], Path], registered_name: str | None = None
                  ) -> str | None:
        return None  # nothing is exported

    def flush(self) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass



class MlflowTracker:
    """Logs to one MLflow run through MlflowClient; every call after the run exists goes through one writer thread.

    The training thread only appends to a buffer and hands full batches to the writer, so a slow store (SQLite
    commits, a remote server's round trip) overlaps with training instead of stalling it. Calls keep their order.
    A failed call is retried (`retries` times, with backoff), then logged and counted, never raised into training:
    the stage's results are on disk (result.json) whatever the tracking store does. `flush()` and `close()` wait
    until everything handed over so far is stored.
    """

    def __init__(self, tracking_uri: str, run_id: str | None = None, experiment: str = "sgtm",
                 run_name: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 flush_every: int = 1000, flush_seconds: float = 10.0, retries: int = 3,
                 artifact_root: Path | None = None, reopen: bool = False):
        """`artifact_root`: where an experiment this tracker creates keeps its artifacts (a local store keeps them
        beside itself, not in MLflow's default `./mlruns` of the working directory); None: the store decides.
        With a `run_id` the tracker logs to that run and leaves ending it to whoever created it, unless `reopen`
        (see `reopened`)."""
        mlflow_offline_defaults()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.owns_run = run_id is None or reopen
        if reopen and run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        if run_id is None:  # synchronous: children need the id for mlflow.parentRunId
            exp = self.client.get_experiment_by_name(experiment)
            location = experiment_location(artifact_root, experiment) if artifact_root is not None else None
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, location)
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        self.run_id = run_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.retries = retries
        self.failed_calls = 0
        self._buffer: list[Any] = []
        self._last_send = time.monotonic()
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._writer.start()
        self._closed = False

    @classmethod
    def reopened(cls, tracking_uri: str, run_id: str) -> MlflowTracker | None:
        """An ended run of ours that goes on (a resumed recipe or sweep folder): set running again and ended by
        `close` as a run this tracker created would be; None when the store no longer holds it active."""
        mlflow_offline_defaults()
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            if MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.lifecycle_stage != "active":
                return None
        except MlflowException:  # deleted from the store for good
            return None
        return cls(tracking_uri, run_id=run_id, reopen=True)

    # -- the training thread's side: cheap, never blocks on the store

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), v[:6000]) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self._send(self.client.log_batch, self.run_id, params=items[i: i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_send >= self.flush_seconds:
            self._send_buffer()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._send(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_model(self, name: str, write_export: Callable[[Path], Path], registered_name: str | None = None
                  ) -> str | None:
        """Log a model (mlflow_model.py) linked to this run, registered when `registered_name` is given; returns its
        URI, or None when that failed (logged, never raised: the stage's model is on disk whatever MLflow does).
        Synchronous, after everything queued so far: it is called once a stage has finished."""
        from sgtm_engine.mlflow_model import log_model

        self.flush()
        try:
            uri = log_model(self.client, self.run_id, name, write_export, registered_name)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.failed_calls += 1
            log.warning("MLflow: could not log model %s of run %s: %s", name, self.run_id, exc)
            return None
        self.set_tags({f"sgtm.model.{name}": uri})
        return uri

    def flush(self) -> None:
        """Hand over the buffered metrics and wait until every call so far is stored (or has failed)."""
        self._send_buffer()
        self._queue.join()

    def close(self, status: str = "FINISHED") -> None:
        """End the run (when this tracker owns it) and, first, the runs nested under it that are still RUNNING, as
        KILLED: their process was killed (the out-of-memory killer took a worker) and could not end them itself."""
        if self._closed:
            return
        if self.owns_run:
            self._send_buffer()
            self._send(self._end_running_children)
            self._send(self.client.set_terminated, self.run_id, status=status)
        self.flush()
        self._queue.put(None)
        self._writer.join()
        self._closed = True
        if self.failed_calls:
            log.error("MLflow run %s: %d tracking call(s) failed after retries; the stage's own records "
                      "(result.json, events.jsonl) are complete", self.run_id, self.failed_calls)

    def _end_running_children(self) -> None:
        experiment = self.client.get_run(self.run_id).info.experiment_id
        for run in self.client.search_runs([experiment], f"tags.mlflow.parentRunId = '{self.run_id}' and "
                                                         "attributes.status = 'RUNNING'"):
            self.client.set_terminated(run.info.run_id, status="KILLED")

    def _send_buffer(self) -> None:
        self._last_send = time.monotonic()
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]  # log_batch: at most 1,000 metrics
            self._send(self.client.log_batch, self.run_id, metrics=chunk)

    def _send(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._closed:
            raise RuntimeError(f"MLflow run {self.run_id}: tracker already closed")
        self._queue.put((fn, args, kwargs))

    # -- the writer thread

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, kwargs = item
            try:
                self._call_with_retries(fn, args, kwargs)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _call_with_retries(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for attempt in range(self.retries + 1):
            try:
                fn(*args, **kwargs)
                return
            except Exception as exc:  # noqa: BLE001 - a tracking hiccup must never kill a training run
                if attempt == self.retries:
                    self.failed_calls += 1
                    log.warning("MLflow %s failed after %d attempts: %s", getattr(fn, "__name__", fn),
                                attempt + 1, exc)
                    return
                time.sleep(min(0.5 * 2 ** attempt, 5.0))


def mlflow_offline_defaults() -> None:
    """MLflow 3 sends usage telemetry from a background thread to a remote endpoint. Research runs should not phone
    home, and on an offline machine every attempt waits for a timeout (also at interpreter exit). Respect an
    explicit setting; otherwise opt out before mlflow is first imported."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # packaging a model copies its files with a progress bar per model: noise in a stage's log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Refuse an http(s) tracking URI with no server behind it at once: MLflow's client retries a refused connection
    for minutes before it gives up. Any answer passes (an authenticating proxy's 401, a store without `/health`):
    only a store that cannot be reached at all is refused."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answered
    except OSError as exc:  # refused, an unknown host, a timeout (URLError is an OSError)
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"MLflow store {uri}: no server answers there ({reason}); start it, name another store "
                          "with --mlflow-uri, or run with --no-track") from exc
