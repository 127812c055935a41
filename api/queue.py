"""The doorbell: tell a worker that a job id is ready. Sent after the commit, by task name (never importing workers).

A message carries only the job id; the worker re-reads the row. A lost or duplicated message is harmless: the
reaper re-sends ready jobs that nobody claimed, and the claim (a conditional UPDATE) turns duplicates into no-ops.

Downstream first: a job with parents (ablate, evaluate, attack after a train) is sent at a higher priority than a
root job, so a sweep finishes whole cells one after another instead of training all 45 models before evaluating
any, and its report fills in while it runs. Kombu's Redis transport keeps one list per priority step (default
steps 0, 3, 6, 9; 0 is served first) and its BRPOP asks them in order, so nothing needs configuring on the workers.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any, Protocol

from api.config import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "sgtm.run_job"
REAP_TASK = "sgtm.reap"
CONTROL_QUEUE = "control"
DOWNSTREAM_PRIORITY = 0  # kombu Redis: lower step first
ROOT_PRIORITY = 6


class Enqueuer(Protocol):
    def send(self, job_id: str, queue: str, *, downstream: bool = False) -> None:
        """Ring the bell for `job_id` on `queue` ('gpu' or 'cpu'); raise if the broker cannot take it.
        `downstream`: the job reads a parent's output, and goes ahead of root jobs (module docstring)."""

    def waiting(self, queue: str) -> set[str]:
        """Job ids whose message sits in `queue`, not yet taken by a worker: the reaper does not send those again
        (a long backlog is not a lost message). Raise if the broker cannot be read."""


class NoopEnqueuer:
    """Embedded mode: the local executor polls the ledger for ready jobs, so there is nothing to ring."""

    def send(self, job_id: str, queue: str, *, downstream: bool = False) -> None:
        return None  # the executor's ledger query orders downstream jobs first itself (repo.ready_jobs)

    def waiting(self, queue: str) -> set[str]:
        return set()


class CeleryEnqueuer:
    """Publishes `sgtm.run_job(job_id)` to Redis. The Celery app here is a producer only (no task code)."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._app: Any = None

    def _celery(self) -> Any:
        if self._app is None:
            from celery import Celery  # imported on first send: the API starts (and /health answers) without it

            app = Celery("sgtm-producer", broker=self._settings.broker_url)
            # The visibility timeout must match the workers' (celery redis.rst "Caveats"): set on every client.
            app.conf.broker_transport_options = {"visibility_timeout": self._settings.visibility_timeout_s}
            app.conf.broker_connection_retry_on_startup = True
            self._app = app
        return self._app

    def send(self, job_id: str, queue: str, *, downstream: bool = False) -> None:
        self._celery().send_task(RUN_JOB_TASK, args=[job_id], queue=self._settings.queue_name(queue),
                                 priority=DOWNSTREAM_PRIORITY if downstream else ROOT_PRIORITY,
                                 retry=True, retry_policy={"max_retries": 2, "interval_start": 0,
                                                           "interval_step": 0.2, "interval_max": 0.5})


    def waiting(self, queue: str) -> set[str]:
        name = self._settings.queue_name(queue)
        with self._celery().connection_for_read() as conn:
            channel = conn.default_channel
            client = channel.client
            # kombu's Redis transport keeps one list per priority step (the first has the bare queue name)
            lists = [channel._q_for_pri(name, step) for step in channel.priority_steps]
            raw = [m for key in lists for m in client.lrange(key, 0, -1)]
        return {job_id for job_id in map(_job_id_of, raw) if job_id is not None}


def _job_id_of(raw: bytes) -> str | None:
    """The job id a queued `run_job` message carries (Celery protocol 2: body = base64 JSON [args, kwargs, …])."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != RUN_JOB_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def make_enqueuer(settings: Settings) -> Enqueuer:
    return CeleryEnqueuer(settings) if settings.mode == "deployed" else NoopEnqueuer()
