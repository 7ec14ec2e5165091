"""Failure categories: why a failed task failed, as a category beside its error text; and the
GPU readings a consumer's heartbeat carries, for the platform's metrics.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("failure", sa.String(16), nullable=True))
    with op.batch_alter_table("consumers") as batch:
        batch.add_column(sa.Column("gpu_readings", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("consumers") as batch:
        batch.drop_column("gpu_readings")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("failure")
