"""Stale broker messages against a real Redis and a real Celery worker: messages of cancelled jobs are acked in
milliseconds each, and the reaper does not send again a job whose message is merely waiting in the queue."""

from __future__ import annotations

import datetime as dt
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.base import utcnow
from api.db.models import Job
from api.db.session import session_scope
from api.queue import CeleryEnqueuer
from tests.integration.compose import ServiceProcess, wait_until
from tests.workers.test_supervisor import FakeRunStore, make
from workers.reaper import reap

REDIS = "redis://127.0.0.1:6379"


@pytest.fixture
def broker(settings: Settings) -> Iterator[Settings]:
    """Settings on a Redis DB of our own and a unique queue prefix; the prefix's keys are deleted after."""
    db, prefix = 1 + secrets.randbelow(15), f"stale{secrets.token_hex(3)}-"
    client = redis.Redis.from_url(f"{REDIS}/{db}")
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    yield settings.model_copy(update={"broker_url": f"{REDIS}/{db}", "queue_prefix": prefix})
    for pattern in (f"{prefix}*", f"_kombu.binding.{prefix}*"):
        for key in client.scan_iter(pattern):
            client.delete(key)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_messages_of_cancelled_jobs_are_acked_cheaply(broker: Settings, factory: sessionmaker[Session],
                                                      tmp_path: Path) -> None:
    job_id = make(factory, {"steps": 1})
    with session_scope(factory) as s:
        repo.request_cancel(s, job_id=job_id)
    env = {"SGTM_DATABASE_URL": broker.ledger_url, "SGTM_DATA_ROOT": str(broker.data_root),
           "SGTM_BROKER_URL": broker.broker_url, "SGTM_QUEUE_PREFIX": broker.queue_prefix,
           "SGTM_WORKER_QUEUES": "cpu"}
    worker = ServiceProcess("worker", [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
                                       "--loglevel", "INFO"], env, tmp_path)
    try:
        wait_until(lambda: "ready." in worker.log_tail(20_000), 60, "the Celery worker", worker.log_tail)
        enqueuer = CeleryEnqueuer(broker)
        started = time.monotonic()
        for _ in range(20):
            enqueuer.send(job_id, "cpu")
        wait_until(lambda: worker.log_tail(200_000).count("not claimable") == 20, 60, "20 acks", worker.log_tail)
        elapsed = time.monotonic() - started
    finally:
        worker.stop()
    assert elapsed < 10, f"20 stale messages took {elapsed:.1f} s"
    assert not enqueuer.waiting("cpu")


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_the_reaper_does_not_resend_jobs_waiting_in_the_queue(broker: Settings, factory: sessionmaker[Session]) -> None:
    enqueuer = CeleryEnqueuer(broker)
    waiting = [make(factory, {"steps": 1}) for _ in range(5)]
    for job_id in waiting:
        enqueuer.send(job_id, "cpu")
    with session_scope(factory) as s:  # sent long ago: a backlog nobody has reached yet
        repo.mark_enqueued(s, job_ids=waiting)
        s.execute(update(Job).where(Job.id.in_(waiting)).values(enqueued_at=utcnow() - dt.timedelta(hours=1)))
    assert enqueuer.waiting("cpu") == set(waiting)
    report = reap(settings=broker, factory=factory, enqueuer=enqueuer, run_store=FakeRunStore())
    assert report.resent == []
    client = redis.Redis.from_url(broker.broker_url)
    for key in client.scan_iter(f"{broker.queue_prefix}cpu*"):
        client.delete(key)  # the messages are lost (a Redis without persistence restarted)
    report = reap(settings=broker, factory=factory, enqueuer=enqueuer, run_store=FakeRunStore())
    assert sorted(report.resent) == sorted(waiting) and enqueuer.waiting("cpu") == set(waiting)
