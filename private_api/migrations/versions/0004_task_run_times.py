"""Tasks: when the model's container started and ended on the latest attempt that reported it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: tasks run before this revision, and attempts that ran no container, have none.
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("run_started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("run_finished_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("run_finished_at")
        batch.drop_column("run_started_at")
