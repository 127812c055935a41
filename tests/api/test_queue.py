"""The doorbell against a real Redis: downstream jobs are served before root jobs (api.queue)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import redis
from kombu import Connection

from api.config import Settings
from api.queue import CeleryEnqueuer

REDIS = "redis://127.0.0.1:6379"


@pytest.fixture
def broker() -> str:
    db = 1 + secrets.randbelow(15)
    try:
        redis.Redis.from_url(f"{REDIS}/{db}").ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    return f"{REDIS}/{db}"


def test_downstream_jobs_are_delivered_before_older_root_jobs(broker: str, tmp_path: Path) -> None:
    prefix = f"t{secrets.token_hex(4)}-"
    settings = Settings(_env_file=None, broker_url=broker, queue_prefix=prefix, data_root=tmp_path)
    enqueuer = CeleryEnqueuer(settings)
    enqueuer.send("train-1", "cpu")
    enqueuer.send("train-2", "cpu")
    enqueuer.send("evaluate-1", "cpu", downstream=True)
    received = []
    try:
        with Connection(broker) as conn:
            queue = conn.SimpleQueue(settings.queue_name("cpu"))
            for _ in range(3):
                message = queue.get(timeout=5)
                received.append(message.payload[0][0])  # Celery protocol 2 body: [args, kwargs, embed]
                message.ack()
            queue.close()
    finally:
        client = redis.Redis.from_url(broker)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
    assert received == ["evaluate-1", "train-1", "train-2"]
