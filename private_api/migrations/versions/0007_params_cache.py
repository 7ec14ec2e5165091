"""Task parameters and the result cache: params on tasks, params_schema and cacheable on
models, the cache key, and indexes to find who else holds a blob.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("cacheable", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("params_schema", sa.JSON(), nullable=True))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("params", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("use_cache", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("cache_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("cached_from", sa.String(64), nullable=True))
    op.create_index("ix_tasks_cache_key", "tasks", ["cache_key"])
    op.create_index("ix_tasks_input_blob_key", "tasks", ["input_blob_key"])
    op.create_index("ix_tasks_output_blob_key", "tasks", ["output_blob_key"])


def downgrade() -> None:
    op.drop_index("ix_tasks_output_blob_key", table_name="tasks")
    op.drop_index("ix_tasks_input_blob_key", table_name="tasks")
    op.drop_index("ix_tasks_cache_key", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("cached_from")
        batch.drop_column("cache_key")
        batch.drop_column("use_cache")
        batch.drop_column("params")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("params_schema")
        batch.drop_column("cacheable")
