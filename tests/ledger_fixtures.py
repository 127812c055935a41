"""Ledger fixtures for the unit tests of `api` and `workers`: a migrated database on SQLite and on PostgreSQL
(`ledger_url` is parametrized over both), settings pointing at it, a recording enqueuer, and a reader of paged lists."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db.session import make_engine, make_session_factory
from api.migrate import upgrade

TOKEN = "test-token-0123456789abcdefghij"
TABLES = ("job_events", "job_inputs", "jobs", "sweep_cells", "pipelines", "sweeps")


class RecordingEnqueuer:
    """Remembers what was sent instead of ringing a broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.downstream: set[str] = set()
        self.fail = False
        self._lock = threading.Lock()

    def send(self, job_id: str, queue: str, *, downstream: bool = False) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        with self._lock:
            self.sent.append((job_id, queue))
            if downstream:
                self.downstream.add(job_id)

    def waiting(self, queue: str) -> set[str]:
        return set()  # nothing is ever left in a queue: every message counts as taken at once

    @property
    def job_ids(self) -> list[str]:
        return [job_id for job_id, _ in self.sent]


@pytest.fixture(scope="session")
def migrated_postgres(postgres_url: str) -> str:
    upgrade(postgres_url)
    return postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("migrated_postgres")
    yield url
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    engine.dispose()


@pytest.fixture
def factory(ledger_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(ledger_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def settings(ledger_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=ledger_url, data_root=tmp_path / "data", api_tokens=[TOKEN],
                    heartbeat_interval_s=0.2, progress_interval_s=0.2, stale_after_s=2.0, cancel_grace_s=2.0,
                    mlflow_tracking_uri=None, _env_file=None)


@pytest.fixture
def enqueuer() -> RecordingEnqueuer:
    return RecordingEnqueuer()


def all_pages(client: Any, path: str, limit: int = 2) -> list[str]:
    """The ids a newest-first list returns, `limit` at a time, following `next_cursor` to the last page."""
    ids, cursor = [], None
    while True:
        page = client.get(path, params={"limit": limit, **({"cursor": cursor} if cursor else {})}).json()
        ids += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            return ids
