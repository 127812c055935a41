"""Shared fixtures: a fresh PostgreSQL database per test session (created in the `test` cluster, dropped after).

Service fixtures (MLflow server, Celery worker, API process) live in tests/integration/conftest.py.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

PG_ADMIN_URL = os.environ.get("SGTM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _admin_engine():
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def create_database(prefix: str = "sgtm_test") -> str:
    """Create `<prefix>_<random>` and return its URL."""
    from sqlalchemy import text

    name = f"{prefix}_{secrets.token_hex(4)}"
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({e}); start it (.ci/run does)")
    finally:
        engine.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    from sqlalchemy import text

    name = url.rsplit("/", 1)[1]
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = create_database()
    yield url
    drop_database(url)


pytest_plugins = ["tests.ledger_fixtures"]
