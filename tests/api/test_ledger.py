"""The ledger's repository functions on SQLite and PostgreSQL: the state machine, fencing, readiness, settling."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.db import jobs as repo
from api.db.base import utcnow
from api.db.models import Job
from api.db.session import session_scope
from api.db.status import TRANSITIONS, JobStatus, can_transition


def make_job(session: Session, *, kind: str = "train", inputs: dict[str, str] | None = None, **overrides: Any) -> Job:
    fields: dict[str, Any] = {"kind": kind, "spec": {"steps": 3}, "spec_hash": "h" * 64, "method": "sgtm",
                              "seed": 0, "experiment": "sgtm", "queue": "cpu", "gpus": 1, "max_attempts": 3}
    fields.update(overrides)
    return repo.create(session, inputs=inputs or {}, **fields)


def new(factory: sessionmaker[Session], **kwargs: Any) -> str:
    with session_scope(factory) as s:
        return make_job(s, **kwargs).id


def status_of(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = repo.get(s, job_id=job_id)
        assert job is not None
        return job


def test_state_machine_table_is_closed_under_terminal_states() -> None:
    for terminal in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        assert TRANSITIONS[terminal] == frozenset()
    assert can_transition(JobStatus.RUNNING, JobStatus.QUEUED)  # requeue
    assert not can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)


def test_claim_bumps_attempt_and_a_second_claim_is_a_noop(factory: sessionmaker[Session]) -> None:
    job_id = new(factory)
    with session_scope(factory) as s:
        assert repo.claim(s, job_id=job_id, owner="w1") == 1
    with session_scope(factory) as s:
        assert repo.claim(s, job_id=job_id, owner="w2") is None  # the redelivered message
    job = status_of(factory, job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("running", 1, "w1")


def test_concurrent_claims_yield_exactly_one_winner(factory: sessionmaker[Session]) -> None:
    job_id = new(factory)
    results: list[int | None] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        with session_scope(factory) as s:
            results.append(repo.claim(s, job_id=job_id, owner=f"w{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: r or 0) == [None] * 7 + [1]


def test_writes_are_fenced_by_attempt(factory: sessionmaker[Session]) -> None:
    job_id = new(factory)
    with session_scope(factory) as s:
        repo.claim(s, job_id=job_id, owner="w1")
    with session_scope(factory) as s:
        assert repo.requeue(s, job_id=job_id, attempt=1, reason="lost")
    with session_scope(factory) as s:
        assert repo.claim(s, job_id=job_id, owner="w2") == 2
    with session_scope(factory) as s:  # the first supervisor wakes up late: every write of attempt 1 misses
        assert not repo.heartbeat(s, job_id=job_id, attempt=1).held
        assert not repo.record_progress(s, job_id=job_id, attempt=1, step=3, total=5, metrics={}, events=[])
        assert not repo.mark_succeeded(s, job_id=job_id, attempt=1, result={})
        assert repo.heartbeat(s, job_id=job_id, attempt=2).held
        assert repo.mark_succeeded(s, job_id=job_id, attempt=2, result={
            "summary": {"a": 1}, "metrics": {"m": 2.0}, "checkpoint": {"path": "/x/ck", "sha256": "ab"},
            "code_version": "v1"})
    job = status_of(factory, job_id)
    assert (job.status, job.checkpoint_uri, job.checkpoint_sha256, job.summary) == (
        "succeeded", "file:///x/ck", "ab", {"a": 1})
    with session_scope(factory) as s:
        assert not repo.requeue(s, job_id=job_id, attempt=2, reason="too late")


def test_children_wait_for_their_parents(factory: sessionmaker[Session]) -> None:
    parent = new(factory)
    child = new(factory, kind="ablate", inputs={"model": parent})
    with session_scope(factory) as s:
        assert [j.id for j in repo.ready_jobs(s)] == [parent]
        assert repo.claim(s, job_id=child, owner="w") is None
        assert repo.waiting_on(s, job_ids=[child]) == {child: [parent]}
        attempt = repo.claim(s, job_id=parent, owner="w")
        assert attempt == 1
        repo.mark_succeeded(s, job_id=parent, attempt=attempt, result={})
    with session_scope(factory) as s:
        assert [j.id for j in repo.ready_jobs(s, parent_id=parent)] == [child]
        assert repo.claim(s, job_id=child, owner="w") == 1


def test_ready_jobs_put_downstream_jobs_first_so_cells_finish_in_turn(factory: sessionmaker[Session]) -> None:
    """Two cells (train -> evaluate): once the first train succeeded, its evaluate goes ahead of the older, still
    queued second train; `with_parents` tells the doorbell the same."""
    train_a, train_b = new(factory), new(factory)
    eval_a = new(factory, kind="evaluate", inputs={"model": train_a})
    with session_scope(factory) as s:
        assert [j.id for j in repo.ready_jobs(s)] == [train_a, train_b]
        repo.mark_succeeded(s, job_id=train_a, attempt=repo.claim(s, job_id=train_a, owner="w"), result={})
    with session_scope(factory) as s:
        assert [j.id for j in repo.ready_jobs(s)] == [eval_a, train_b]
        assert repo.with_parents(s, job_ids=[train_a, train_b, eval_a]) == {eval_a}
        assert repo.with_parents(s, job_ids=[]) == set()


def test_a_failed_parent_fails_the_whole_chain(factory: sessionmaker[Session]) -> None:
    train = new(factory)
    ablate = new(factory, kind="ablate", inputs={"model": train})
    evaluate = new(factory, kind="evaluate", inputs={"model": ablate})
    with session_scope(factory) as s:
        repo.claim(s, job_id=train, owner="w")
        repo.mark_failed(s, job_id=train, attempt=1, error_type="data_error", error_message="x", exit_code=3)
        assert sorted(repo.settle_orphans(s)) == sorted([ablate, evaluate])
    assert status_of(factory, evaluate).status == "failed"
    assert status_of(factory, evaluate).error_type == "upstream_failed"


def test_cancel_queued_running_and_finished(factory: sessionmaker[Session]) -> None:
    queued, running, done = new(factory), new(factory), new(factory)
    child = new(factory, kind="ablate", inputs={"model": queued})
    with session_scope(factory) as s:
        repo.claim(s, job_id=running, owner="w")
        repo.claim(s, job_id=done, owner="w")
        repo.mark_succeeded(s, job_id=done, attempt=1, result={})
    with session_scope(factory) as s:
        assert repo.request_cancel(s, job_id=queued).status == "cancelled"
        assert repo.request_cancel(s, job_id=queued).status == "cancelled"  # idempotent
        job = repo.request_cancel(s, job_id=running)
        assert job.status == "running" and job.cancel_requested_at is not None
        assert repo.heartbeat(s, job_id=running, attempt=1).cancel_requested
        with pytest.raises(repo.IllegalTransition):
            repo.request_cancel(s, job_id=done)
        with pytest.raises(repo.JobNotFound):
            repo.request_cancel(s, job_id="00000000-0000-0000-0000-000000000000")
    assert status_of(factory, child).status == "cancelled"  # its parent will never produce a model
    with session_scope(factory) as s:
        assert repo.claim(s, job_id=queued, owner="w") is None


def _age_heartbeat(factory: sessionmaker[Session], job_id: str, seconds: float) -> None:
    with session_scope(factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - dt.timedelta(seconds=seconds)))


def test_stale_jobs_are_requeued_cancelled_or_failed(factory: sessionmaker[Session]) -> None:
    requeue, cancel, exhausted, fresh = (new(factory), new(factory), new(factory, max_attempts=1), new(factory))
    with session_scope(factory) as s:
        for job_id in (requeue, cancel, exhausted, fresh):
            repo.claim(s, job_id=job_id, owner="w")
        repo.request_cancel(s, job_id=cancel)
    for job_id in (requeue, cancel, exhausted):
        _age_heartbeat(factory, job_id, 120)
    with session_scope(factory) as s:
        stale = repo.find_stale(s, older_than=utcnow() - dt.timedelta(seconds=60))
        assert sorted(j for j, _ in stale) == sorted([requeue, cancel, exhausted])
        outcomes = {job_id: repo.reap_stale(s, job_id=job_id, attempt=attempt) for job_id, attempt in stale}
    assert outcomes == {requeue: "queued", cancel: "cancelled", exhausted: "failed"}
    assert status_of(factory, fresh).status == "running"
    assert status_of(factory, exhausted).error_type == "lost"


def test_unsent_ready_jobs_are_found_with_backoff(factory: sessionmaker[Session]) -> None:
    job_id = new(factory)
    with session_scope(factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - dt.timedelta(seconds=60)))
    with session_scope(factory) as s:
        assert [j.id for j in repo.find_unsent(s, resend_after_s=10)] == [job_id]  # never sent
        repo.mark_enqueued(s, job_ids=[job_id])
    with session_scope(factory) as s:
        assert repo.find_unsent(s, resend_after_s=10) == []  # just sent
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - dt.timedelta(seconds=11)))
    with session_scope(factory) as s:
        assert [j.id for j in repo.find_unsent(s, resend_after_s=10)] == [job_id]
        repo.mark_enqueued(s, job_ids=[job_id])
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - dt.timedelta(seconds=11)))
    with session_scope(factory) as s:
        assert repo.find_unsent(s, resend_after_s=10) == []  # second resend waits 20 s


def test_events_and_progress_are_recorded_in_order(factory: sessionmaker[Session]) -> None:
    job_id = new(factory)
    with session_scope(factory) as s:
        repo.claim(s, job_id=job_id, owner="w")
        assert repo.record_progress(s, job_id=job_id, attempt=1, step=2, total=10, metrics={"train/loss": 1.5},
                                    events=[{"type": "progress", "step": 2, "total": 10}])
    with factory() as s:
        types = [e.type for e in repo.events_after(s, job_id=job_id)]
        job = repo.get(s, job_id=job_id)
    assert types == ["status", "status", "progress"]
    assert job is not None and (job.progress_step, job.progress_total, job.last_metrics) == (
        2, 10, {"train/loss": 1.5})


def test_pipeline_status_is_derived() -> None:
    assert repo.pipeline_status(["succeeded", "running"]) == "running"
    assert repo.pipeline_status(["succeeded", "failed", "cancelled"]) == "failed"
    assert repo.pipeline_status(["succeeded", "cancelled"]) == "cancelled"
    assert repo.pipeline_status(["succeeded"]) == "succeeded"
