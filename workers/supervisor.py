"""The supervisor: one job, one engine child. The same code runs under Celery and in the embedded executor.

    claim (conditional UPDATE, attempt += 1) → workdir lock + spec.json → MLflow run → spawn the child in its own
    process group → tail events.jsonl into throttled progress + heartbeats → cancel: SIGTERM, SIGKILL after the
    grace → exit code + result.json → final state → close the MLflow run → send ready children.

Exit codes (`sgtm_engine.errors`): 0 succeeded (with a valid result.json); a requested cancel → cancelled; config,
data or divergence errors → failed for good; anything else (an unexpected error, a signal, an unrequested SIGTERM,
i.e. a preemption) → requeued while attempts remain, and the next attempt resumes from the workdir's checkpoint.

Every write after the claim is fenced by `attempt`; if one matches nothing, another attempt owns the job: the
supervisor kills its child and walks away without touching the row.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.jobs import Lease
from api.db.session import session_scope
from api.queue import Enqueuer
from sgtm_engine.errors import EXIT_CANCELLED, EXIT_CODE_NAMES, FINAL_FAILURE_CODES
from sgtm_engine.folders import ERROR, EVENTS, RESULT, EventTail, write_json
from sgtm_engine.provenance import code_version
from workers.child import Child, build_argv, describe_exit, engine_env
from workers.events import ProgressBuffer
from workers.results import read_json_object
from workers.run_store import RunStore
from workers.runs import LeaseLost, close_finished_pipelines, close_finished_sweeps, close_job_run, open_job_run

log = logging.getLogger(__name__)

POLL_S = 0.2
LOCK_WAIT_S = 30.0


class Outcome(enum.StrEnum):
    SKIPPED = "skipped"  # not claimable: a duplicate message, or the job finished/cancelled/waits on parents
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"  # a retryable failure; the job runs again and resumes from its checkpoint
    LOST = "lost"  # another attempt took the job over; this one stopped without writing


@dataclasses.dataclass
class _Watch:
    exit_code: int | None = None
    cancel_requested: bool = False
    shutdown: bool = False


class Supervisor:
    def __init__(self, *, settings: Settings, factory: sessionmaker[Session], enqueuer: Enqueuer, run_store: RunStore,
                 owner: str | None = None, shutdown: threading.Event | None = None):
        self.settings = settings
        self.factory = factory
        self.enqueuer = enqueuer
        self.run_store = run_store
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.shutdown = shutdown or threading.Event()
        self.code_version = code_version()

    # -----------------------------------------------------------------------------------------------------------------

    def run(self, job_id: str) -> Outcome:
        with session_scope(self.factory) as session:
            attempt = repo.claim(session, job_id=job_id, owner=self.owner)
        if attempt is None:
            log.info("job %s not claimable (duplicate delivery, finished, cancelled or waiting); acking", job_id)
            return Outcome.SKIPPED
        log.info("job %s claimed: attempt %d by %s", job_id, attempt, self.owner)
        try:
            return self._run_claimed(job_id, attempt)
        except LeaseLost:
            log.warning("job %s attempt %d lost its lease; stopped without writing", job_id, attempt)
            return Outcome.LOST
        except Exception as e:
            # Record it on the row (fenced): requeued while attempts remain (a full disk or a network share hiccup
            # passes), failed after. Then re-raise so the worker logs it loudly.
            log.exception("supervisor error on job %s attempt %d", job_id, attempt)
            message = f"supervisor error: {e.__class__.__name__}: {e}"
            with session_scope(self.factory) as session:
                job = repo.get(session, job_id=job_id)
                retry = job is not None and attempt < job.max_attempts
                requeued = retry and repo.requeue(session, job_id=job_id, attempt=attempt, reason=message)
            if requeued:
                self._send([job_id])
            elif not retry:
                self._finalize_failure(job_id, attempt, "supervisor_error", message, None)
            raise

    def _run_claimed(self, job_id: str, attempt: int) -> Outcome:
        with session_scope(self.factory) as session:
            job = repo.get(session, job_id=job_id)
            assert job is not None
            inputs = repo.inputs_of(session, job_ids=[job_id]).get(job_id, {})
        workdir = self.settings.workdir(job_id)
        workdir.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_workdir(workdir, self.settings, job_id, attempt, self.factory)
        child: Child | None = None
        try:
            finished = read_json_object(workdir / RESULT)
            if finished is not None:
                # An earlier attempt finished but its final state never reached the ledger (an outage, a crash
                # after the child exited): record that result instead of training again.
                log.warning("job %s attempt %d: adopting the finished result.json of an earlier attempt", job_id,
                            attempt)
                outcome = self._finalize(job_id, attempt, Outcome.SUCCEEDED, lambda s: repo.mark_succeeded(
                    s, job_id=job_id, attempt=attempt, result=finished))
                self._after_final(job_id, outcome, job.mlflow_run_id, finished, job.pipeline_id)
                return outcome
            spec_path = workdir / "spec.json"
            write_json(spec_path, job.spec)
            run_id = open_job_run(run_store=self.run_store, factory=self.factory, job=job, attempt=attempt,
                                  inputs=inputs, code_version=self.code_version)
            argv = build_argv(self.settings, kind=job.kind, spec_path=spec_path, workdir=workdir,
                              inputs={n: self.settings.workdir(p) for n, p in inputs.items()},
                              mlflow_uri=self.run_store.uri if run_id else None, mlflow_run_id=run_id, gpus=job.gpus)
            tail = EventTail(workdir / EVENTS, from_end=True)
            for stale in (RESULT, ERROR):  # a result (or error) must come from this attempt
                (workdir / stale).unlink(missing_ok=True)
            child = Child(argv, cwd=workdir, log_path=workdir / "logs" / f"attempt-{attempt}.log",
                          env=engine_env(self.settings), pass_fds=[lock_fd])
            checkpoints = workdir / "checkpoints"
            resume = checkpoints.is_dir() and any(checkpoints.iterdir())
            with session_scope(self.factory) as session:
                repo.add_event(session, job_id=job_id, attempt=attempt, type="spawned",
                               data={"pid": child.pid, "resume": resume})
            log.info("job %s attempt %d: engine child %d started", job_id, attempt, child.pid)
            watch = self._watch(job_id, attempt, child, tail)
            return self._settle(job_id, attempt, job.max_attempts, watch, child, workdir, run_id, job.pipeline_id)
        finally:
            if child is not None:
                child.cleanup()
            os.close(lock_fd)

    # -----------------------------------------------------------------------------------------------------------------

    def _watch(self, job_id: str, attempt: int, child: Child, tail: EventTail) -> _Watch:
        s = self.settings
        buffer = ProgressBuffer(s.progress_interval_s)
        watch = _Watch()
        next_heartbeat = 0.0
        term_sent_at: float | None = None
        killed = False
        while True:
            code = child.poll()
            for event in tail.read():
                buffer.add(event)
            now = time.monotonic()
            lease: Lease | None = None
            if buffer.due(now, force=code is not None):
                lease = self._db(lambda session, now=now: _write_progress(session, job_id, attempt, buffer, now))
            elif now >= next_heartbeat:
                lease = self._db(lambda session: repo.heartbeat(session, job_id=job_id, attempt=attempt))
            if lease is not None:
                next_heartbeat = now + s.heartbeat_interval_s
                if not lease.held:
                    child.signal_group(signal.SIGKILL)
                    child.wait()
                    raise LeaseLost(job_id)
                watch.cancel_requested = watch.cancel_requested or lease.cancel_requested
            if code is not None:
                watch.exit_code = code
                return watch
            stop = watch.cancel_requested or self.shutdown.is_set()
            if stop and term_sent_at is None:
                watch.shutdown = not watch.cancel_requested
                log.info("job %s: %s; sending SIGTERM to the engine", job_id,
                         "cancel requested" if watch.cancel_requested else "worker shutting down")
                child.signal_group(signal.SIGTERM)
                term_sent_at = now
            elif term_sent_at is not None and not killed and now - term_sent_at > s.cancel_grace_s:
                log.warning("job %s: engine still running %.0fs after SIGTERM; SIGKILL", job_id, s.cancel_grace_s)
                child.signal_group(signal.SIGKILL)
                killed = True
            time.sleep(POLL_S)

    def _db(self, fn: Any) -> Any:
        """A ledger call from the watch loop; a database outage is survived (the child keeps running) and retried
        on the next tick. If it lasts past the stale limit the reaper requeues the job and the fence stops us."""
        try:
            with session_scope(self.factory) as session:
                return fn(session)
        except OperationalError as e:
            log.warning("ledger unavailable while supervising (%s); retrying", e.__class__.__name__)
            return None

    # -----------------------------------------------------------------------------------------------------------------

    def _settle(self, job_id: str, attempt: int, max_attempts: int, watch: _Watch, child: Child, workdir: Path,
                run_id: str | None, pipeline_id: str | None) -> Outcome:
        code = watch.exit_code
        assert code is not None
        result = read_json_object(workdir / RESULT) if code == 0 else None
        if code == 0 and result is not None:
            outcome = self._finalize(job_id, attempt, Outcome.SUCCEEDED,
                                     lambda s: repo.mark_succeeded(s, job_id=job_id, attempt=attempt, result=result))
        elif code == 0:
            outcome = self._finalize_failure(job_id, attempt, "result_missing",
                                             "the engine exited 0 without a valid result.json\n" + child.log_tail(),
                                             code)
        elif watch.cancel_requested:
            outcome = self._finalize(job_id, attempt, Outcome.CANCELLED,
                                     lambda s: repo.mark_cancelled(s, job_id=job_id, attempt=attempt, exit_code=code))
        elif code in FINAL_FAILURE_CODES:
            outcome = self._finalize_failure(job_id, attempt, EXIT_CODE_NAMES[code], _explain(workdir, child), code)
        else:
            outcome = self._retry(job_id, attempt, max_attempts, code, child, workdir, watch.shutdown)
        self._after_final(job_id, outcome, run_id, result, pipeline_id)
        log.info("job %s attempt %d: %s (%s)", job_id, attempt, outcome.value, describe_exit(code))
        return outcome

    def _after_final(self, job_id: str, outcome: Outcome, run_id: str | None, result: dict[str, Any] | None,
                     pipeline_id: str | None) -> None:
        """Close the job's MLflow run, send the children it made ready, close finished pipelines and sweeps."""
        if outcome in (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED) and run_id:
            close_job_run(run_store=self.run_store, factory=self.factory, job_id=job_id, run_id=run_id,
                          status=outcome.value, result=result)
        if outcome == Outcome.SUCCEEDED:
            self._send_ready_children(job_id)
        if pipeline_id and outcome != Outcome.REQUEUED:
            close_finished_pipelines(run_store=self.run_store, factory=self.factory, pipeline_ids=[pipeline_id])
            close_finished_sweeps(run_store=self.run_store, factory=self.factory, pipeline_ids=[pipeline_id])

    def _retry(self, job_id: str, attempt: int, max_attempts: int, code: int, child: Child, workdir: Path,
               shutdown: bool) -> Outcome:
        if code == EXIT_CANCELLED:
            reason = "worker shut down" if shutdown else "engine stopped by an unrequested SIGTERM (preempted)"
        else:
            reason = f"engine {describe_exit(code)} ({EXIT_CODE_NAMES.get(code, 'unknown')})"
        if attempt >= max_attempts and not shutdown:
            return self._finalize_failure(job_id, attempt, "retries_exhausted",
                                          f"{reason} on attempt {attempt} of {max_attempts}\n"
                                          f"{_explain(workdir, child)}", code)
        with session_scope(self.factory) as session:
            if not repo.requeue(session, job_id=job_id, attempt=attempt, reason=f"{reason}; resuming"):
                return Outcome.LOST
        if not shutdown:  # on shutdown the next worker (or the next `sgtm serve`) picks it up
            self._send([job_id])
        return Outcome.REQUEUED

    def _finalize(self, job_id: str, attempt: int, outcome: Outcome, write: Any) -> Outcome:
        """Write the final state, retrying through a ledger outage (doubling waits, for up to
        `final_write_timeout_s`): a finished result is worth waiting for. Should the reaper have settled the job
        meanwhile (from the same result.json), its write stands and counts as ours."""
        delay, deadline = 0.5, time.monotonic() + self.settings.final_write_timeout_s
        while True:
            try:
                with session_scope(self.factory) as session:
                    if write(session):
                        if outcome != Outcome.SUCCEEDED:
                            repo.settle_orphans(session)  # descendants of a failed/cancelled stage can never run
                        return outcome
                    job = repo.get(session, job_id=job_id)
                    settled = job is not None and job.attempt == attempt and job.status == outcome.value
                    return outcome if settled else Outcome.LOST
            except OperationalError as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s attempt %d: ledger unavailable writing %s (%s); retrying in %.1fs", job_id,
                            attempt, outcome.value, e.__class__.__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _finalize_failure(self, job_id: str, attempt: int, error_type: str, message: str,
                          code: int | None) -> Outcome:
        return self._finalize(job_id, attempt, Outcome.FAILED, lambda s: repo.mark_failed(
            s, job_id=job_id, attempt=attempt, error_type=error_type, error_message=message, exit_code=code))

    def _send_ready_children(self, job_id: str) -> None:
        with session_scope(self.factory) as session:
            ready = [j.id for j in repo.ready_jobs(session, parent_id=job_id)]
        self._send(ready)

    def _send(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        sent = []
        with session_scope(self.factory) as session:
            queues = {j.id: j.queue for j in repo.get_many(session, job_ids=job_ids)}
            downstream = repo.with_parents(session, job_ids=job_ids)
        for job_id in job_ids:
            try:
                self.enqueuer.send(job_id, queues[job_id], downstream=job_id in downstream)
                sent.append(job_id)
            except Exception as e:  # noqa: BLE001 - the reaper re-sends ready jobs nobody claimed
                log.warning("could not send job %s (%s); the reaper will", job_id, e)
        with session_scope(self.factory) as session:
            repo.mark_enqueued(session, job_ids=sent)


# ---------------------------------------------------------------------------------------------------------------------


def _write_progress(session: Session, job_id: str, attempt: int, buffer: ProgressBuffer, now: float) -> Lease:
    events = buffer.take(now)
    held = repo.record_progress(session, job_id=job_id, attempt=attempt, step=buffer.step, total=buffer.total,
                                metrics=dict(buffer.metrics) or None, events=events)
    if not held:
        return Lease(held=False, cancel_requested=False)
    return repo.heartbeat(session, job_id=job_id, attempt=attempt)


def _explain(workdir: Path, child: Child) -> str:
    """The engine's own account (`error.json`: type, message, every config problem), else its log's tail."""
    record = read_json_object(workdir / ERROR)
    if record and record.get("message"):
        lines = [f"{record.get('type', 'Error')}: {record['message']}"]
        lines += [f"  - {p}" for p in record.get("problems") or [] if p not in record["message"]]
        return "\n".join(lines)
    return child.log_tail()


def _lock_workdir(workdir: Path, settings: Settings, job_id: str, attempt: int,
                  factory: sessionmaker[Session]) -> int:
    """An exclusive flock on `<workdir>/.lock`, inherited by the child: no two engine processes ever share a workdir
    (an old child still checkpointing after SIGTERM holds it until it exits). Waits up to LOCK_WAIT_S."""
    fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(f"workdir {workdir} is locked by another engine process") from None
            with session_scope(factory) as session:
                if not repo.heartbeat(session, job_id=job_id, attempt=attempt).held:
                    os.close(fd)
                    raise LeaseLost(job_id) from None
            time.sleep(0.5)
