"""API load and dispatch latency against real PostgreSQL and Redis on loopback.

    .venv/bin/python benchmarks/bench_api.py [--clients 50] [--submits 10] [--reads 20] [--dispatch 5] [--streams 200]

1. Starts the API as docker-compose runs it (`uvicorn --factory api.main:create_app`, deployed mode) on a fresh
   PostgreSQL database, and a Celery worker (`celery -A workers.celery_app worker`) running the real engine child.
2. 50 concurrent clients (one HTTP connection each) submit jobs and read job status: p50/p99 latency of each.
   Submissions go to a queue nobody consumes (the load phase measures the API + ledger + broker publish only).
3. Event streams: 200 clients hold `GET /jobs/{id}/events` open on a queued job while `/health` is timed
   (p50/p99): open streams must not slow the rest of the API.
4. Dispatch: submit → engine child spawned (the ledger's `spawned` event: API, Redis, worker claim, fork/exec)
   and submit → the engine's own `started` event (plus Python + torch start-up), over a few sequential jobs,
   each cancelled once started. MLflow tracking is off here (SGTM_TRACKING=false): this measures dispatch.
The last line printed holds the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {"model": {"n_layer": 2, "d_model": 64, "context": 64},
        "data": {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 200,
                 "test_docs_per_category": 2},
        "steps": 200, "batch_size": 4, "eval": {"capability": False, "max_batches": 1, "n_samples": 0}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def load_phase(url: str, token: str, clients: int, submits: int, reads: int) -> tuple[list[float], list[float]]:
    submit_ms: list[float] = []
    read_ms: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        mine_submit, mine_read, ids = [], [], []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            barrier.wait()
            for k in range(submits):
                body = {"kind": "train", "queue": "cpu", "spec": {**TINY, "seed": i * 1000 + k}}
                t = time.perf_counter()
                r = http.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": f"bench-{i}-{k}"})
                mine_submit.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                ids.append(r.json()["id"])
            for k in range(reads):
                t = time.perf_counter()
                r = http.get(f"/api/v1/jobs/{ids[k % len(ids)]}")
                mine_read.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
        with lock:
            submit_ms.extend(mine_submit)
            read_ms.extend(mine_read)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return submit_ms, read_ms


def streams_phase(url: str, token: str, streams: int, samples: int = 200) -> tuple[list[float], int]:
    """/health latencies (ms) while `streams` event streams are open, and how many streams opened (200 OK)."""
    auth = {"Authorization": f"Bearer {token}"}
    job_id = httpx.post(f"{url}/api/v1/jobs", headers=auth, timeout=60,
                        json={"kind": "train", "queue": "cpu", "spec": {**TINY, "seed": 7}}).json()["id"]
    health_ms: list[float] = []
    opened_ok = 0

    async def hold(client: httpx.AsyncClient, opened: asyncio.Event, release: asyncio.Event) -> None:
        nonlocal opened_ok
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
            if r.status_code == 200:
                lines = r.aiter_lines()  # kept open: a dropped iterator closes the connection
                async for line in lines:
                    if line.startswith("event:"):
                        break
                opened_ok += 1
            if opened_ok == streams:
                opened.set()
            await release.wait()

    def time_health() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            http.get("/health")
            for _ in range(samples):
                t = time.perf_counter()
                http.get("/health").raise_for_status()
                health_ms.append((time.perf_counter() - t) * 1000)

    async def run() -> None:
        opened, release = asyncio.Event(), asyncio.Event()
        limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, headers=auth, limits=limits, timeout=120) as client:
            holders = [asyncio.create_task(hold(client, opened, release)) for _ in range(streams)]
            try:
                await asyncio.wait_for(opened.wait(), 120)
            except TimeoutError:
                pass  # reported below as fewer open streams
            await asyncio.to_thread(time_health)
            release.set()
            await asyncio.gather(*holders, return_exceptions=True)

    asyncio.run(run())
    return health_ms, opened_ok


def dispatch_phase(url: str, token: str, ledger: str, samples: int,
                   settle_s: float = 5.0) -> tuple[list[float], list[float], list[float]]:
    engine = create_engine(ledger)
    claimed_ms: list[float] = []
    spawned_ms: list[float] = []
    started_ms: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        for i in range(samples + 1):  # the first warms the worker up (Celery: ~2 s for the first task)
            t0 = time.time()
            job_id = http.post("/api/v1/jobs", json={"kind": "train", "queue": "gpu",
                                                     "spec": {**TINY, "seed": 10**6 + i}}).json()["id"]
            spawned = started = None
            deadline = time.monotonic() + 180
            while (spawned is None or started is None) and time.monotonic() < deadline:
                with engine.connect() as conn:
                    spawned = spawned or conn.execute(text(
                        "SELECT created_at FROM job_events WHERE job_id = :j AND type = 'spawned'"), {"j": job_id}
                    ).scalar()
                    started = started or conn.execute(text(
                        "SELECT data FROM job_events WHERE job_id = :j AND type = 'started'"), {"j": job_id}).scalar()
                time.sleep(0.02)
            if spawned is None or started is None:
                raise SystemExit(f"job {job_id} did not start within 180 s")
            data = started if isinstance(started, dict) else json.loads(started)
            if i > 0:
                with engine.connect() as conn:
                    claimed = conn.execute(text("SELECT min(created_at) FROM job_events WHERE job_id = :j AND "
                                                "type = 'status' AND attempt = 1"), {"j": job_id}).scalar()
                # the ledger stores naive UTC; the engine's event time is epoch seconds
                claimed_ms.append((claimed.replace(tzinfo=dt.UTC).timestamp() - t0) * 1000)
                spawned_ms.append((spawned.replace(tzinfo=dt.UTC).timestamp() - t0) * 1000)
                started_ms.append((float(data["t"]) - t0) * 1000)
            http.post(f"/api/v1/jobs/{job_id}/cancel")
            while http.get(f"/api/v1/jobs/{job_id}").json()["status"] not in ("cancelled", "succeeded", "failed"):
                time.sleep(0.2)
            time.sleep(settle_s)  # an idle worker (its pool process replaced) before the next sample
    engine.dispose()
    return claimed_ms, spawned_ms, started_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--submits", type=int, default=10, help="submissions per client")
    parser.add_argument("--reads", type=int, default=20, help="status reads per client")
    parser.add_argument("--streams", type=int, default=200, help="open event streams while /health is timed")
    parser.add_argument("--dispatch", type=int, default=5, help="sequential jobs for the dispatch latency")
    parser.add_argument("--pg-admin-url", default=os.environ.get(
        "SGTM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    args = parser.parse_args()

    name = f"sgtm_bench_{secrets.token_hex(4)}"
    admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    ledger = args.pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    work = Path(tempfile.mkdtemp(prefix="sgtm-bench-"))
    redis_db, prefix, token, port = 1 + secrets.randbelow(15), f"bench{secrets.token_hex(3)}-", \
        secrets.token_urlsafe(32), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "SGTM_MODE": "deployed",
           "SGTM_DATABASE_URL": ledger, "SGTM_BROKER_URL": f"{args.redis}/{redis_db}", "SGTM_API_TOKENS": token,
           "SGTM_QUEUE_PREFIX": prefix, "SGTM_DATA_ROOT": str(work / "data"), "SGTM_TRACKING": "false",
           "SGTM_ENGINE_CACHE_DIR": str(work / "cache"), "SGTM_HEARTBEAT_INTERVAL_S": "0.5",
           "UVICORN_HOST": "127.0.0.1", "UVICORN_PORT": str(port), "UVICORN_LOG_LEVEL": "warning",
           "SGTM_EVENT_STREAMS_PER_CLIENT": str(args.streams), "SGTM_EVENT_STREAMS_MAX": str(args.streams)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(["alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True, capture_output=True)
        procs.append(start(["uvicorn", "--factory", "api.main:create_app"], env, work / "api.log"))
        procs.append(start(["celery", "-A", "workers.celery_app", "worker", "--loglevel", "WARNING"],
                           {**env, "SGTM_WORKER_QUEUES": "gpu"}, work / "worker.log"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the API did not start; see {work / 'api.log'}")
            time.sleep(0.2)

        submit_ms, read_ms = load_phase(url, token, args.clients, args.submits, args.reads)
        health_ms, streams_open = streams_phase(url, token, args.streams)
        claimed_ms, spawned_ms, started_ms = dispatch_phase(url, token, ledger, args.dispatch)
    finally:
        for proc in reversed(procs):
            stop(proc)
        client = redis.Redis.from_url(f"{args.redis}/{redis_db}")
        keys = client.keys(f"{prefix}*") + client.keys(f"_kombu.binding.{prefix}*")
        if keys:
            client.delete(*keys)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    def fmt(values: list[float]) -> str:
        return f"p50={percentile(values, 50):.1f}ms p99={percentile(values, 99):.1f}ms"

    print(f"bench_api: {args.clients} concurrent clients on PostgreSQL: submit {fmt(submit_ms)} (n={len(submit_ms)}), "
          f"status read {fmt(read_ms)} (n={len(read_ms)}); /health with {streams_open} open event streams "
          f"{fmt(health_ms)}; submit→claimed by a worker {fmt(claimed_ms)}, "
          f"submit→engine child spawned {fmt(spawned_ms)}, "
          f"submit→engine started (python+torch up) p50={statistics.median(started_ms):.0f}ms "
          f"(n={len(spawned_ms)})")


if __name__ == "__main__":
    main()
