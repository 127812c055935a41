"""Migrations upgrade and downgrade on SQLite and PostgreSQL, and the models match the migrated schema."""

from __future__ import annotations

import io
import re
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


def _offline_sql(command_name: str, revision: str) -> str:
    cfg = alembic_config("postgresql+psycopg://x@localhost/x")
    cfg.output_buffer = io.StringIO()
    getattr(command, command_name)(cfg, revision, sql=True)
    return cfg.output_buffer.getvalue()


def test_migrations_render_offline_sql() -> None:
    """`alembic upgrade head --sql` renders DDL that creates every table and index of the models, and the downgrade
    DDL drops them all: operators can review both before running them."""
    up, down = _offline_sql("upgrade", "head"), _offline_sql("downgrade", "head:base")
    assert metadata.sorted_tables, "no models registered"
    for table in metadata.sorted_tables:
        assert re.search(rf"^CREATE TABLE {table.name} \(", up, re.MULTILINE), f"upgrade SQL never creates {table.name}"
        assert re.search(rf"^DROP TABLE {table.name};", down, re.MULTILINE), f"downgrade SQL never drops {table.name}"
        assert table.indexes, f"{table.name} has no index (every ledger table is queried by one)"
        for index in table.indexes:
            columns = ", ".join(column.name for column in index.columns)
            unique = "UNIQUE " if index.unique else ""
            create = rf"^CREATE {unique}INDEX {index.name} ON {table.name} \({columns}\);"
            assert re.search(create, up, re.MULTILINE), f"upgrade SQL never creates index {index.name} ({columns})"
            assert re.search(rf"^DROP INDEX {index.name};", down, re.MULTILINE), f"downgrade never drops {index.name}"
