"""Alembic environment: imports only the ledger's metadata and the database URL (never the app or the workers)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

import api.db.models  # noqa: F401  (registers the tables on the metadata)
from api.config import Settings
from api.db.base import metadata
from api.db.session import make_engine

config = context.config


def _url() -> str:
    # A caller (api.migrate, tests) may set the URL; otherwise the service settings decide (SGTM_DATABASE_URL).
    return config.get_main_option("sqlalchemy.url") or Settings().ledger_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True, render_as_batch=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url(), poolclass=pool.NullPool) if not _url().startswith("sqlite") else make_engine(_url())
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things in place; batch mode rebuilds the table instead
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
