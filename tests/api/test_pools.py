"""Ledger connection pools on a real uvicorn: a burst of 100 concurrent clients gets no 503 and leaves only
`db_pool_size` PostgreSQL connections open afterwards, and a pool far smaller than the request threads serves the
burst too (requests wait for a session without holding a thread, so threads and connections cannot starve each
other)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.api.served import served_api
from tests.ledger_fixtures import TOKEN

pytestmark = pytest.mark.slow  # a real uvicorn under a burst of 100 clients: about a minute in all

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 100


def _burst(url: str) -> list[int]:
    def client(i: int) -> list[int]:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
            codes = [http.get("/api/v1/jobs", params={"limit": 50}).status_code for _ in range(5)]
            body = {"kind": "train", "spec": {"steps": 10, "seed": i}}
            codes.append(http.post("/api/v1/jobs", json=body).status_code)
            return codes

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [code for codes in pool.map(client, range(CLIENTS)) for code in codes]


@pytest.mark.parametrize("ledger_url", ["sqlite", "postgresql"], indirect=True)
def test_a_burst_gets_no_503_and_leaves_few_connections(ledger_url: str, tmp_path: Path) -> None:
    env = {"SGTM_DATABASE_URL": ledger_url, "SGTM_DATA_ROOT": str(tmp_path / "data"), "SGTM_API_TOKENS": TOKEN,
           "SGTM_TRACKING": "false", "SGTM_DB_POOL_SIZE": "3"}
    with served_api(env, tmp_path) as url:
        codes = _burst(url)
        assert set(codes) <= {200, 202}, (sorted(set(codes)), (tmp_path / "api.log").read_text()[-3000:])
        if ledger_url.startswith("postgresql"):
            time.sleep(1.0)
            probe = create_engine(ledger_url, pool_size=1)
            with probe.connect() as conn:
                open_connections = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND application_name NOT LIKE 'pytest%'")).scalar()
            probe.dispose()
            assert open_connections is not None and open_connections <= 3 + 2, open_connections


def test_a_one_connection_pool_serves_a_burst_of_many_more_clients(migrated_postgres: str, tmp_path: Path) -> None:
    # Without admission this deadlocks: 40 threads wait in the pool while the one connection belongs to a finished
    # request waiting for a thread to serialize its response; the pool timeout then turns it into 503s.
    env = {"SGTM_DATABASE_URL": migrated_postgres, "SGTM_DATA_ROOT": str(tmp_path / "data"), "SGTM_API_TOKENS": TOKEN,
           "SGTM_TRACKING": "false", "SGTM_DB_POOL_SIZE": "1", "SGTM_DB_MAX_OVERFLOW": "0",
           "SGTM_DB_POOL_TIMEOUT_S": "10"}
    with served_api(env, tmp_path) as url:
        codes = _burst(url)
    assert sorted(set(codes)) == [200, 202], (sorted(set(codes)), (tmp_path / "api.log").read_text()[-3000:])
    assert codes.count(202) == CLIENTS
