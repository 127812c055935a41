"""sweeps.cancelled_at: a shared pipeline is cancelled only when every sweep using it is

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Static, like 0001 and 0002. Existing sweeps get NULL (not cancelled): before this revision a cancel stopped shared
pipelines outright, so no running pipeline depends on the column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sweeps", sa.Column("cancelled_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:  # SQLite drops a column by recreating the table
        batch.drop_column("cancelled_at")
