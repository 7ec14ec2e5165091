"""Models: the size of their /tmp and whether their root filesystem is writable.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("tmp_mb", sa.Integer(), nullable=True))
        # Models registered before this revision keep the read-only root filesystem default.
        batch.add_column(
            sa.Column("writable_rootfs", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("writable_rootfs")
        batch.drop_column("tmp_mb")
