"""API keys: the highest priority a key may submit at, and how many active tasks it may hold.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: None is the role's default (IS_DEFAULT_MAX_PRIORITY, IS_DEFAULT_MAX_ACTIVE_TASKS
    # for users; the top priority and no limit for operators), which existing keys keep.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("max_priority", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_active_tasks", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("max_active_tasks")
        batch.drop_column("max_priority")
