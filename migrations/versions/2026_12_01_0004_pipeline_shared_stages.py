"""pipelines.shared_stages: the stages of a sweep cell that run in another cell's pipeline

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Static, like the others. A sweep runs a stage that several cells share once; each other cell's pipeline records
{stage name: job id} of the stages it reads from elsewhere, so its stages are known by the names the cell gives them.
Existing pipelines get NULL: they were created whole.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pipelines", sa.Column("shared_stages", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:  # SQLite drops a column by recreating the table
        batch.drop_column("shared_stages")
