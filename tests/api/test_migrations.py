"""Migrations upgrade and downgrade on SQLite and PostgreSQL, and the models match the migrated schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import api.db.models  # noqa: F401
from api.db.base import metadata
from api.db.session import make_engine
from api.migrate import alembic_config, downgrade, upgrade
from tests.conftest import create_database, drop_database

TABLES = {"alembic_version", "jobs", "job_inputs", "job_events", "pipelines", "sweeps", "sweep_cells"}


def _roundtrip(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == [], diff  # the models and the migrations describe the same schema
        downgrade(url)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        assert set(inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'ledger.db'}")


def test_postgresql_upgrade_downgrade() -> None:
    url = create_database("sgtm_migrate")
    try:
        _roundtrip(url)
    finally:
        drop_database(url)


def test_migrations_render_offline_sql(tmp_path: Path, capsys: object) -> None:
    """`alembic upgrade head --sql` works: operators can review the DDL before running it."""
    command.upgrade(alembic_config("postgresql+psycopg://x@localhost/x"), "head", sql=True)
