"""Live logs: the progress a running model last printed, shipped with its live log.

A column rather than derived from the stored log at each read: status reads and task lists are
frequent and must not open a blob of up to IS_MAX_LOG_BYTES per task.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("progress", sa.Float(), nullable=True))
    op.add_column("tasks", sa.Column("progress_message", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "progress_message")
    op.drop_column("tasks", "progress")
