"""sweeps: sweeps, sweep_cells, pipelines.sweep_id / pipelines.cell_id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Static, like 0001. `pipelines.sweep_id` carries no foreign key: SQLite cannot add one to an existing table without
recreating it, and recreating `pipelines` would cascade-delete its jobs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("experiment", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("mlflow_experiment_id", sa.String(64), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("mlflow_closed_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_sweeps_idempotency_key")),
    )
    op.create_index("ix_sweeps_created_at_id", "sweeps", ["created_at", "id"])
    op.add_column("pipelines", sa.Column("sweep_id", sa.String(36), nullable=True))
    op.add_column("pipelines", sa.Column("cell_id", sa.String(64), nullable=True))
    op.create_index(op.f("ix_pipelines_sweep_id"), "pipelines", ["sweep_id"])
    op.create_index(op.f("ix_pipelines_cell_id"), "pipelines", ["cell_id"])
    op.create_table(
        "sweep_cells",
        sa.Column("sweep_id", sa.String(36), nullable=False),
        sa.Column("cell_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(64), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("pipeline_id", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweeps.id"], name=op.f("fk_sweep_cells_sweep_id_sweeps"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["pipeline_id"], ["pipelines.id"], name=op.f("fk_sweep_cells_pipeline_id_pipelines"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sweep_id", "cell_id", name=op.f("pk_sweep_cells")),
    )
    op.create_index(op.f("ix_sweep_cells_pipeline_id"), "sweep_cells", ["pipeline_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_sweep_cells_pipeline_id"), table_name="sweep_cells")
    op.drop_table("sweep_cells")
    op.drop_index(op.f("ix_pipelines_cell_id"), table_name="pipelines")
    op.drop_index(op.f("ix_pipelines_sweep_id"), table_name="pipelines")
    op.drop_column("pipelines", "cell_id")
    op.drop_column("pipelines", "sweep_id")
    op.drop_index("ix_sweeps_created_at_id", table_name="sweeps")
    op.drop_table("sweeps")
