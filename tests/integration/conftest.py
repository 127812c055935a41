"""The deployed stack, natively, from docker-compose.yml's commands: a fresh PostgreSQL database (ledger) and a
second one (MLflow store), a Redis DB number and queue prefix of our own, the MLflow server, `migrate`, the API,
Celery workers and beat. Everything started here is stopped here (by process group).

Timings are shrunk through SGTM_* variables (1 s heartbeats, a 6 s stale lease) so faults resolve in seconds.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import create_database, drop_database
from tests.integration.compose import ServiceProcess, free_port, http_ok, service_command, wait_until

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
FAST_TIMINGS = {
    "SGTM_HEARTBEAT_INTERVAL_S": "0.5",
    "SGTM_PROGRESS_INTERVAL_S": "0.5",
    "SGTM_STALE_AFTER_S": "6",
    "SGTM_REAP_INTERVAL_S": "2",
    "SGTM_CANCEL_GRACE_S": "5",
    "SGTM_RECONCILE_AFTER_S": "2",
    "SGTM_RESEND_AFTER_S": "20",
}


def tiny_train(steps: int = 20, **extra: object) -> dict[str, object]:
    """The smallest real training run: 2 layers, 64 wide, a 512-token BPE, 200 documents per split."""
    spec: dict[str, object] = {
        "model": {"n_layer": 2, "d_model": 64, "context": 64},
        "data": {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 200,
                 "test_docs_per_category": 2},
        "steps": steps, "batch_size": 4, "checkpoint_every": 5,
        "eval": {"capability": False, "max_batches": 1, "n_samples": 0},
    }
    spec.update(extra)
    return spec


FAST_EVALUATE = {"eval": {"capability": False, "max_batches": 1, "n_samples": 0}, "calibrate": {"enabled": False}}


def chain_pipeline(name: str) -> dict[str, object]:
    return {"name": name, "stages": [
        {"name": "train", "kind": "train", "spec": tiny_train()},
        {"name": "ablate", "kind": "ablate", "inputs": {"model": "train"}},
        {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "ablate"}, "spec": FAST_EVALUATE},
    ]}


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data/tokenizer cache for every engine child of the session (the first job prepares it)."""
    return tmp_path_factory.mktemp("engine-cache")


@dataclass
class Stack:
    api_url: str
    token: str
    ledger_url: str
    mlflow_uri: str
    data_root: Path
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def start(self, service: str, name: str | None = None, **env: str) -> ServiceProcess:
        argv, compose_env = service_command(service, _COMPOSE_VARS)
        merged = {**compose_env, **self.env, **env}
        process = ServiceProcess(name or service, argv, merged, self.log_dir)
        self.processes[name or service] = process
        return process

    def logs(self) -> str:
        return "\n".join(f"===== {name} =====\n{p.log_tail()}" for name, p in self.processes.items())


_COMPOSE_VARS = {"POSTGRES_PASSWORD": "unused-in-tests", "SGTM_API_TOKENS": "unused-in-tests"}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, engine_cache: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    log_dir = root / "logs"
    log_dir.mkdir()
    ledger_url = create_database("sgtm_test")
    mlflow_db = create_database("sgtm_mlflow")
    redis_db = 1 + secrets.randbelow(15)
    prefix = f"t{secrets.token_hex(3)}-"
    token = secrets.token_urlsafe(32)
    mlflow_port, api_port = free_port(), free_port()
    env = {
        "SGTM_DATABASE_URL": ledger_url,
        "SGTM_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
        "SGTM_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "SGTM_MLFLOW_UI_URL": f"http://127.0.0.1:{mlflow_port}",
        "SGTM_API_TOKENS": token,
        "SGTM_DATA_ROOT": str(root / "data"),
        "SGTM_ENGINE_CACHE_DIR": str(engine_cache),
        "SGTM_QUEUE_PREFIX": prefix,
        **FAST_TIMINGS,
    }
    s = Stack(api_url=f"http://127.0.0.1:{api_port}", token=token, ledger_url=ledger_url,
              mlflow_uri=env["SGTM_MLFLOW_TRACKING_URI"], data_root=root / "data", env=env, log_dir=log_dir)
    try:
        mlflow = s.start("mlflow", MLFLOW_BACKEND_STORE_URI=mlflow_db, MLFLOW_ARTIFACTS_DESTINATION=str(root / "art"),
                         MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(mlflow_port), MLFLOW_WORKERS="1",
                         MLFLOW_SERVER_ALLOWED_HOSTS=f"127.0.0.1:{mlflow_port},localhost:{mlflow_port}")
        migrate = s.start("migrate")
        assert migrate.proc.wait(120) == 0, migrate.log_tail()
        s.start("api", UVICORN_HOST="127.0.0.1", UVICORN_PORT=str(api_port))
        s.start("worker-gpu", "worker", SGTM_WORKER_QUEUES="gpu,cpu")
        s.start("beat")
        wait_until(http_ok(f"{s.api_url}/ready"), 60, "API", s.logs)
        wait_until(http_ok(f"{s.mlflow_uri}/health"), 90, "MLflow server", s.logs)
        assert mlflow.alive()
        yield s
    finally:
        for process in reversed(list(s.processes.values())):
            process.stop()
        _flush_redis(redis_db, prefix)
        drop_database(ledger_url)
        drop_database(mlflow_db)


def _flush_redis(db: int, prefix: str) -> None:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    keys = [k for pattern in (f"{prefix}*", f"_kombu.binding.{prefix}*") for k in client.keys(pattern)]
    if keys:
        client.delete(*keys)


@dataclass
class Embedded:
    api_url: str
    token: str
    data_root: Path
    process: ServiceProcess

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.data_root / 'sgtm.db'}"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.data_root / 'mlflow.db'}"


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory, engine_cache: Path) -> Iterator[Embedded]:
    """`sgtm serve` (python -m api.client_cli serve): SQLite ledger, local executor, local MLflow store."""
    root = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGTM_")}
    env.update(FAST_TIMINGS, SGTM_ENGINE_CACHE_DIR=str(engine_cache))
    argv = [sys.executable, "-m", "api.client_cli", "serve", "--port", str(port), "--data-root", str(root / "data")]
    process = ServiceProcess("serve", argv, env, root)
    e = Embedded(api_url=f"http://127.0.0.1:{port}", token="", data_root=root / "data", process=process)
    try:
        wait_until(http_ok(f"{e.api_url}/ready"), 90, "sgtm serve", process.log_tail)
        e.token = (root / "data" / "token").read_text().strip()
        yield e
    finally:
        process.stop(timeout=30)
