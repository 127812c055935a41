"""Wiring: settings → ledger session factory, enqueuer, MLflow tracker, supervisor. Built per process, lazily."""

from __future__ import annotations

import dataclasses
import threading

from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db.session import make_engine, make_session_factory
from api.queue import Enqueuer, make_enqueuer
from workers.supervisor import Supervisor
from workers.tracking import Tracker, make_tracker


@dataclasses.dataclass
class Runtime:
    settings: Settings
    factory: sessionmaker[Session]
    enqueuer: Enqueuer
    tracker: Tracker
    supervisor: Supervisor


def build_runtime(settings: Settings | None = None, *, enqueuer: Enqueuer | None = None,
                  shutdown: threading.Event | None = None) -> Runtime:
    settings = settings or Settings()
    factory = make_session_factory(make_engine(settings.ledger_url))
    enqueuer = enqueuer or make_enqueuer(settings)
    artifact_root = None if settings.mlflow_tracking_uri else (settings.data_root / "mlartifacts")
    tracker = make_tracker(settings.tracking_uri, artifact_root=artifact_root)
    supervisor = Supervisor(settings=settings, factory=factory, enqueuer=enqueuer, tracker=tracker,
                            shutdown=shutdown)
    return Runtime(settings=settings, factory=factory, enqueuer=enqueuer, tracker=tracker, supervisor=supervisor)
