"""Chained tasks: input_from and model_from, the upstream output a task mounts at /model, and
indexes to find what waits on a task and who else holds a blob.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("input_from", sa.String(64), nullable=True))
        batch.add_column(sa.Column("model_from", sa.String(64), nullable=True))
        batch.add_column(sa.Column("model_from_blob_key", sa.String(255), nullable=True))
    op.create_index("ix_tasks_input_from", "tasks", ["input_from"])
    op.create_index("ix_tasks_model_from", "tasks", ["model_from"])
    op.create_index("ix_tasks_model_from_blob_key", "tasks", ["model_from_blob_key"])


def downgrade() -> None:
    op.drop_index("ix_tasks_model_from_blob_key", table_name="tasks")
    op.drop_index("ix_tasks_model_from", table_name="tasks")
    op.drop_index("ix_tasks_input_from", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("model_from_blob_key")
        batch.drop_column("model_from")
        batch.drop_column("input_from")
