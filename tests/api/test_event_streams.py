"""Event streams on a real uvicorn over loopback: hundreds of open streams leave every other route answering,
the streams need a token, and they are capped per token and in total (their slots come back when clients leave)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from api.db import jobs as repo
from api.db.session import make_engine, make_session_factory, session_scope
from api.migrate import upgrade
from tests.api.served import served_api
from tests.ledger_fixtures import TOKEN

OTHER_TOKEN = "other-token-0123456789abcdefghij"
STREAMS = 200
TINY = {"model": {"n_layer": 2, "d_model": 64, "context": 64}, "steps": 20, "batch_size": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(API URL, ledger URL): `uvicorn --factory api.main:create_app` on SQLite, with no executor, so a submitted
    job stays queued until a test moves it through the ledger."""
    work = tmp_path_factory.mktemp("streams")
    ledger = f"sqlite:///{work / 'sgtm.db'}"
    upgrade(ledger)
    env = {"SGTM_DATABASE_URL": ledger, "SGTM_DATA_ROOT": str(work / "data"),
           "SGTM_API_TOKENS": f"{TOKEN},{OTHER_TOKEN}", "SGTM_EVENT_STREAMS_PER_CLIENT": str(STREAMS),
           "SGTM_EVENT_STREAMS_MAX": str(STREAMS + 1), "SGTM_TRACKING": "false", "SGTM_EVENT_POLL_INTERVAL_S": "0.2"}
    with served_api(env, work) as api:
        yield api, ledger


@pytest.fixture(scope="module")
def api_url(served: tuple[str, str]) -> str:
    return served[0]


def _queued_job(api_url: str) -> str:
    r = httpx.post(f"{api_url}/api/v1/jobs", json={"kind": "train", "spec": TINY},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def _hold_streams(api_url: str, job_id: str, n: int, opened: asyncio.Event, release: asyncio.Event) -> None:
    """Open `n` streams (one connection each), read each one's first event, hold them until `release`."""
    ready = 0
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=api_url, limits=limits, timeout=60,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:

        async def one() -> None:
            nonlocal ready
            async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
                assert r.status_code == 200, await r.aread()
                lines = r.aiter_lines()  # kept open: a dropped iterator closes the connection
                async for line in lines:
                    if line.startswith("event:"):
                        break
                ready += 1
                if ready == n:
                    opened.set()
                await release.wait()

        await asyncio.gather(*(one() for _ in range(n)))


def _health_latencies(api_url: str, samples: int = 100) -> list[float]:
    with httpx.Client(base_url=api_url, timeout=10) as client:
        client.get("/health")
        latencies = []
        for _ in range(samples):
            t = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append((time.perf_counter() - t) * 1000)
    return sorted(latencies)


def test_open_streams_do_not_freeze_the_api_and_are_capped(api_url: str) -> None:
    job_id = _queued_job(api_url)

    async def scenario() -> None:
        opened, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold_streams(api_url, job_id, STREAMS, opened, release))
        await asyncio.wait_for(opened.wait(), 120)
        latencies = await asyncio.to_thread(_health_latencies, api_url)
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        assert p99 < 100, f"/health p99 {p99:.1f} ms with {STREAMS} open event streams"
        async with httpx.AsyncClient(base_url=api_url, timeout=10) as client:
            # every other route still answers, a submission included
            assert (await client.get(f"/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"})
                    ).status_code == 200
            mine = await client.get(f"/api/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {TOKEN}"})
            assert mine.status_code == 429 and "SGTM_EVENT_STREAMS_PER_CLIENT" in mine.text
            assert int(mine.headers["Retry-After"]) > 0
            other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
            async with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=other) as last:
                assert last.status_code == 200
                full = await client.get(f"/api/v1/jobs/{job_id}/events", headers=other)
                assert full.status_code == 429 and "SGTM_EVENT_STREAMS_MAX" in full.text
        release.set()
        await holder

    asyncio.run(scenario())
    # the clients are gone: their slots are free again and the server is as fast as before
    time.sleep(0.5)

    async def reopen() -> None:
        opened, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold_streams(api_url, job_id, STREAMS, opened, release))
        await asyncio.wait_for(opened.wait(), 120)
        release.set()
        await holder

    asyncio.run(reopen())
    assert _health_latencies(api_url, 20)[-1] < 1000


def test_streams_need_a_token_and_an_existing_job(api_url: str) -> None:
    job_id = _queued_job(api_url)
    assert httpx.get(f"{api_url}/api/v1/jobs/{job_id}/events").status_code == 401
    unknown = httpx.get(f"{api_url}/api/v1/jobs/00000000-0000-4000-8000-000000000000/events",
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert unknown.status_code == 404
    events = httpx.get(f"{api_url}/api/v1/jobs/{job_id}/events?follow=false",
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert events.status_code == 200 and "event: status" in events.text


def test_a_stream_delivers_new_events_as_the_job_runs_and_ends_with_done(served: tuple[str, str]) -> None:
    api_url, ledger = served
    job_id = _queued_job(api_url)
    factory = make_session_factory(make_engine(ledger))

    def run_the_job() -> None:
        time.sleep(1.0)  # the stream is open and waiting by now
        with session_scope(factory) as s:
            attempt = repo.claim(s, job_id=job_id, owner="w")
            assert attempt is not None
        time.sleep(0.5)
        with session_scope(factory) as s:
            repo.record_progress(s, job_id=job_id, attempt=attempt, step=5, total=20, metrics=None,
                                 events=[{"type": "progress", "step": 5, "total": 20}])
        time.sleep(0.5)
        with session_scope(factory) as s:
            repo.mark_succeeded(s, job_id=job_id, attempt=attempt, result={"summary": {}})

    runner = threading.Thread(target=run_the_job)
    runner.start()
    started = time.monotonic()
    with httpx.stream("GET", f"{api_url}/api/v1/jobs/{job_id}/events", timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        kinds = [line.split(":", 1)[1].strip() for line in r.iter_lines() if line.startswith("event:")]
    runner.join()
    assert kinds == ["status", "status", "progress", "status", "done"]
    assert time.monotonic() - started < 10
