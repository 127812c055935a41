"""The FastAPI application: `create_app()` (uvicorn --factory api.main:create_app). OpenAPI at /docs.

Nothing connects at import time; the engine is created with the app and connects on first use. The API never
imports torch, MLflow or the workers: it writes the ledger and rings the doorbell.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from alembic.script import ScriptDirectory
from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from api.config import Settings
from api.db.session import make_engine, make_session_factory
from api.deps import known_query
from api.errors import install_handlers
from api.guard import RequestGuard, SecurityHeaders
from api.migrate import alembic_config
from api.queue import Enqueuer, make_enqueuer
from api.routes import health, jobs, pipelines, sweeps
from api.streams import EventStreams

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, enqueuer: Enqueuer | None = None) -> FastAPI:
    settings = settings or Settings()
    if not settings.api_tokens:
        raise RuntimeError("no API tokens: set SGTM_API_TOKENS (comma-separated); `sgtm serve` creates one for "
                           "embedded mode in <data_root>/token")
    weak = settings.weak_token_problems()  # embedded mode too: the API may listen beyond loopback
    if weak:
        raise RuntimeError("; ".join(weak))
    engine = make_engine(settings.ledger_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
                         pool_timeout=settings.db_pool_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.streams.close()
        engine.dispose()

    # Swagger UI and ReDoc from the fastapi-offline package's bundled assets: /docs works with no internet access.
    app = FastAPIOffline(title="sgtm", version="1", lifespan=lifespan,
                  description="Submit training, ablation, evaluation, attack and RMU jobs; follow them; cancel "
                              "them. Specs are typed JSON and registry names only: never a path, URL or command.")
    app.state.settings = settings
    app.state.session_factory = make_session_factory(engine)
    # One request session per pool connection (api.deps.get_session says why)
    app.state.ledger_admission = anyio.Semaphore(settings.db_pool_size + settings.db_max_overflow)
    app.state.streams = EventStreams(app.state.session_factory, max_streams=settings.event_streams_max,
                                     per_client=settings.event_streams_per_client,
                                     poll_s=settings.event_poll_interval_s)
    app.state.enqueuer = enqueuer or make_enqueuer(settings)
    app.state.schema_head = _schema_head(settings.ledger_url)
    install_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes, max_json_depth=settings.max_json_depth)
    app.add_middleware(SecurityHeaders)
    app.include_router(health.router)  # probes may add cache-busting parameters
    for router in (jobs.router, pipelines.router, sweeps.router):
        app.include_router(router, dependencies=[Depends(known_query)])
    return app


def _schema_head(url: str) -> str | None:
    """The migrations' head revision, for /ready; None when the migrations are not beside the package (a
    non-editable install), in which case /ready checks the database only."""
    try:
        return ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    except Exception:  # noqa: BLE001 - alembic raises several kinds for a missing script location
        log.warning("migrations not found beside the package; /ready will not check the schema revision")
        return None
