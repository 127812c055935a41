"""Service settings (pydantic-settings), shared by the API, the Celery workers, the reaper and the embedded executor.

Choices made here:
- One `Settings` read from `SGTM_*` environment variables (and an optional `.env`); nothing reads the environment
  anywhere else in `api` or `workers`.
- Two modes. `embedded` (default): SQLite ledger and MLflow store under `data_root`, no broker. `deployed`: PostgreSQL,
  Redis and an MLflow server; default or weak secrets are refused at start-up rather than shipped.
- Timings are settings, not constants, so tests can shrink them (a 1 s heartbeat, a 4 s stale lease).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sgtm_engine.folders import local_tracking_uri

#: Values nobody should deploy with: tokens and database passwords from tutorials and templates.
WEAK_SECRETS = frozenset({"", "changeme", "change-me", "changethis", "secret", "password", "postgres", "token",
                          "admin", "sgtm", "test", "example", "default"})
MIN_TOKEN_LENGTH = 24


class Settings(BaseSettings):
    """Everything the service needs to know about where it runs."""

    # hide_input_in_errors: a start-up error must not print the settings it was given (tokens, URLs with passwords)
    model_config = SettingsConfigDict(env_prefix="SGTM_", env_file=".env", extra="ignore", hide_input_in_errors=True)

    mode: Literal["embedded", "deployed"] = "embedded"
    """`embedded`: one machine, SQLite, no broker. `deployed`: PostgreSQL + Redis + MLflow server, strict secrets."""
    data_root: Path = Path(".sgtm")
    """Job workdirs (`<data_root>/jobs/<job_id>`), the embedded SQLite files and the embedded token live here."""
    database_url: str | None = None
    """SQLAlchemy URL of the ledger; None = `sqlite:///<data_root>/sgtm.db` (embedded only)."""
    broker_url: str = "redis://127.0.0.1:6379/0"
    """Celery broker (deployed mode)."""
    queue_prefix: str = ""
    """Prepended to queue names (`gpu`, `cpu`, `control`) so test sessions sharing one Redis never clash."""
    worker_queues: Annotated[list[str], NoDecode] = ["gpu", "cpu"]
    """Queues a worker consumes when started without `-Q` (comma-separated in the environment)."""
    default_queue: Literal["gpu", "cpu"] = "gpu"
    """Queue of a job whose spec does not ask for the CPU (`runtime.device: cpu` routes to `cpu`)."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; None = `sqlite:///<data_root>/mlflow.db` (embedded only). Deployed: the HTTP server."""
    tracking: bool = True
    """False: jobs run without MLflow (no runs are opened; the ledger still records everything)."""
    mlflow_experiment: str = "sgtm"
    """Default experiment of a submission that names none."""
    mlflow_ui_url: str | None = None
    """Public base URL of the MLflow UI, for links in job responses; None = no links."""

    api_tokens: Annotated[list[SecretStr], NoDecode] = []
    """Bearer tokens the API accepts (comma-separated in the environment); every /api/v1 route needs one."""
    open_reads: bool = False
    """True: read routes (jobs, pipelines, sweeps, events, reports) answer without a token; writes still need one.
    For a trusted network only: reads show specs, metrics and server file paths."""

    engine_command: Annotated[list[str], NoDecode] = [sys.executable, "-m", "sgtm_engine"]
    """How the supervisor starts the engine; `run-stage …` is appended. Operator-set, never from a request."""
    engine_env_passthrough: Annotated[list[str], NoDecode] = []
    """Extra environment variable names the engine child inherits (comma-separated), e.g. an object store's
    credentials; the child otherwise gets a minimal environment, never the service's own settings."""
    engine_cache_dir: Path | None = None
    """Passed to the engine as `--cache-dir` (its content-addressed data/tokenizer cache); None = the engine's."""
    torchrun_command: Annotated[list[str], NoDecode] = [sys.executable, "-m", "torch.distributed.run"]
    """Launcher for jobs that ask for several GPUs; `--standalone --nproc_per_node N -m sgtm_engine …` is appended."""

    db_pool_size: int = Field(5, ge=1)
    """Ledger connections the API keeps open between requests."""
    db_max_overflow: int = Field(35, ge=0)
    """Extra ledger connections the API opens under load and closes as soon as they are returned, so a burst
    leaves only `db_pool_size` connections open afterwards. Pool size + overflow is also how many requests hold a
    ledger session at once; the rest wait their turn without taking a worker thread."""
    db_pool_timeout_s: float = Field(30.0, gt=0)
    """How long a request waits for a ledger connection before it is answered 503 (with Retry-After)."""
    heartbeat_interval_s: float = Field(2.0, gt=0)
    """How often a supervisor renews its lease; the same write reads the cancel flag."""
    progress_interval_s: float = Field(2.0, ge=0)
    """Least time between two progress writes of one job (eval, checkpoint and finish events are never throttled)."""
    stale_after_s: float = Field(60.0, gt=0)
    """A running job whose heartbeat is older than this is requeued by the reaper."""
    cancel_grace_s: float = Field(8.0, ge=0)
    """SIGTERM, then SIGKILL after this long: a cancel stops the child within heartbeat + grace seconds."""
    reap_interval_s: float = Field(15.0, gt=0)
    """How often beat runs the reaper (and the embedded executor runs it when idle)."""
    resend_after_s: float = Field(300.0, gt=0)
    """A ready job still queued after this long is sent again (doubling each time): lost messages are re-sent."""
    reconcile_after_s: float = Field(30.0, ge=0)
    """A finished job whose MLflow run is still open after this long is closed by the reaper."""
    final_write_timeout_s: float = Field(300.0, ge=0)
    """How long a supervisor retries a finished job's final-state write through a ledger outage."""
    max_attempts: int = Field(3, ge=1)
    """Claims per job before a retryable failure becomes final."""
    visibility_timeout_s: int = Field(7 * 24 * 3600, gt=0)
    """Redis redelivers an unacknowledged message after this; above the longest job (the claim absorbs duplicates)."""
    idempotency_ttl_s: int = Field(24 * 3600, gt=0)
    """An `Idempotency-Key` can be reused for a new submission after this long."""
    local_poll_interval_s: float = Field(0.5, gt=0)
    """How often the embedded executor looks for ready jobs."""

    max_steps: int = Field(1_000_000, ge=1)
    """Largest `steps` (and `warmup_steps`) of any stage a submission may ask for."""
    max_batch_size: int = Field(4096, ge=1)
    """Largest `batch_size` / `micro_batch_size` of any stage."""
    max_n_layer: int = Field(128, ge=1)
    """Deepest model a train spec may ask for."""
    max_d_model: int = Field(16_384, ge=1)
    """Widest model a train spec may ask for."""
    max_context: int = Field(32_768, ge=1)
    """Longest context a train spec may ask for."""
    max_parameters: int = Field(2_000_000_000, ge=1)
    """Largest estimated parameter count of a model to train."""
    max_memory_gb: float = Field(80.0, gt=0)
    """Largest estimated training memory (weights, AdamW state, activations): the workers' device memory."""
    max_sweep_cells: int = Field(2000, ge=1)
    """Most cells one sweep may expand into."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body accepted (413 beyond), checked before authentication and parsing."""
    max_json_depth: int = Field(32, ge=4)
    """Deepest JSON nesting accepted in a request body (422 beyond); specs need about six levels."""
    min_free_disk_mb: int = Field(512, ge=0)
    """`/ready` is not ready when the ledger's disk (embedded: the SQLite file's) has less free space than this."""
    event_streams_max: int = Field(256, ge=1)
    """Open `GET /jobs/{id}/events` streams the API serves at once; one more is a 429 with `Retry-After`."""
    event_streams_per_client: int = Field(16, ge=1)
    """Open event streams per API token."""
    event_poll_interval_s: float = Field(1.0, gt=0)
    """How often the API looks for new events of the jobs being streamed (one query for all open streams)."""

    @field_validator("worker_queues", "api_tokens", "engine_command", "torchrun_command", "engine_env_passthrough",
                     mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        # Environment variables carry lists as comma-separated (queues, tokens) or space-separated (commands) text.
        if isinstance(value, str):
            sep = "," if "," in value or " " not in value.strip() else None
            return [part.strip() for part in value.split(sep) if part.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_weak_deployments(self) -> Settings:
        if self.mode != "deployed":
            return self
        problems = []
        url = self.database_url or ""
        if not url.startswith("postgresql"):
            problems.append("SGTM_DATABASE_URL: deployed mode needs a PostgreSQL URL (postgresql+psycopg://…)")
        password = _url_password(url)
        if password is not None and password.lower() in WEAK_SECRETS:
            problems.append("SGTM_DATABASE_URL: the database password is a default value; set a generated one")
        problems += self.weak_token_problems()
        if self.tracking and not self.mlflow_tracking_uri:
            problems.append("SGTM_MLFLOW_TRACKING_URI: deployed mode logs to the MLflow server (http://mlflow:5000)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def weak_token_problems(self) -> list[str]:
        """One line per token a guesser could find (never showing any of it); the API refuses to start on any."""
        return [f"SGTM_API_TOKENS[{i}]: too weak; use at least {MIN_TOKEN_LENGTH} random characters "
                f"(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                for i, token in enumerate(self.api_tokens)
                if token.get_secret_value().lower() in WEAK_SECRETS or len(token.get_secret_value()) < MIN_TOKEN_LENGTH]

    # ---------------------------------------------------------------------------------------------------------------
    # Derived values

    @property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_root / 'sgtm.db').resolve()}"

    @property
    def tracking_uri(self) -> str | None:
        if not self.tracking:
            return None
        return self.mlflow_tracking_uri or local_tracking_uri(self.data_root)

    @property
    def jobs_root(self) -> Path:
        return (self.data_root / "jobs").resolve()

    def queue_name(self, queue: str) -> str:
        return f"{self.queue_prefix}{queue}"

    def workdir(self, job_id: str) -> Path:
        """Deterministic per job, so a requeued job runs again in the same directory and resumes its checkpoint."""
        return self.jobs_root / job_id


def _url_password(url: str) -> str | None:
    # scheme://user:password@host/db; no URL parsing library needed for this one question
    rest = url.split("://", 1)[-1]
    if "@" not in rest:
        return None
    userinfo = rest.rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None
