"""Scheduling: the GPU memory a model's task needs, the registry of consumers, and an index for
counting an owner's queued tasks (fair share).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: None declares nothing, so existing GPU models keep taking a whole GPU.
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("gpu_memory_mb", sa.Integer(), nullable=True))
    op.create_table(
        "consumers",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("cpus", sa.Float(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("max_tasks", sa.Integer(), nullable=False),
        sa.Column("takes_gpu_tasks", sa.Boolean(), nullable=False),
        sa.Column("takes_cpu_tasks", sa.Boolean(), nullable=False),
        sa.Column("running_tasks", sa.JSON(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consumers")),
    )
    op.create_index(op.f("ix_consumers_last_seen_at"), "consumers", ["last_seen_at"])
    op.create_index("ix_tasks_status_owner_priority", "tasks", ["status", "owner", "priority"])


def downgrade() -> None:
    op.drop_index("ix_tasks_status_owner_priority", table_name="tasks")
    op.drop_index(op.f("ix_consumers_last_seen_at"), table_name="consumers")
    op.drop_table("consumers")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("gpu_memory_mb")
