"""A worker process's context: settings → ledger session factory, enqueuer, MLflow run store, supervisor.

Built once per process, lazily (in the pool process, after the fork). Not the engine's `sgtm_engine.runtime.Runtime`
(device, precision, DDP of a training process): the worker parent never runs torch.
"""

from __future__ import annotations

import dataclasses
import threading

from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db.session import make_engine, make_session_factory
from api.queue import Enqueuer, make_enqueuer
from sgtm_engine.folders import local_artifact_root, repoint_local_store
from workers.run_store import RunStore, make_run_store
from workers.supervisor import Supervisor


@dataclasses.dataclass
class WorkerContext:
    settings: Settings
    factory: sessionmaker[Session]
    enqueuer: Enqueuer
    run_store: RunStore
    supervisor: Supervisor


def build_worker_context(settings: Settings | None = None, *, enqueuer: Enqueuer | None = None,
                         shutdown: threading.Event | None = None) -> WorkerContext:
    settings = settings or Settings()
    factory = make_session_factory(make_engine(settings.ledger_url))
    enqueuer = enqueuer or make_enqueuer(settings)
    artifact_root = None
    if settings.tracking and not settings.mlflow_tracking_uri:  # embedded: the data root's own store, wherever it is
        repoint_local_store(settings.data_root)
        artifact_root = local_artifact_root(settings.data_root)
    run_store = make_run_store(settings.tracking_uri, artifact_root=artifact_root)
    supervisor = Supervisor(settings=settings, factory=factory, enqueuer=enqueuer, run_store=run_store,
                            shutdown=shutdown)
    return WorkerContext(settings=settings, factory=factory, enqueuer=enqueuer, run_store=run_store,
                         supervisor=supervisor)
