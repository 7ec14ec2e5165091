"""Models and tasks.

Revision ID: 0001
Revises:
Create Date: 2024-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("human_readable_id", sa.String(128), nullable=False),
        sa.Column("container_tag", sa.String(512), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("use_gpu", sa.Boolean(), nullable=False),
        sa.Column("model_available", sa.Boolean(), nullable=False),
        sa.Column("model_zip_key", sa.String(255), nullable=True),
        sa.Column("model_zip_sha256", sa.String(64), nullable=True),
        sa.Column("timeout_s", sa.Integer(), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("cpus", sa.Float(), nullable=True),
        sa.Column("pids", sa.Integer(), nullable=True),
        sa.Column("allow_network", sa.Boolean(), nullable=False),
        sa.Column("run_as_root", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("human_readable_id", name="uq_models_human_readable_id"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        # A TaskStatus value; plain text rather than a native enum so new states need no DDL.
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("input_blob_key", sa.String(255), nullable=True),
        sa.Column("input_sha256", sa.String(64), nullable=True),
        sa.Column("output_blob_key", sa.String(255), nullable=True),
        sa.Column("output_sha256", sa.String(64), nullable=True),
        sa.Column("log_blob_key", sa.String(255), nullable=True),
        sa.Column("consumer_id", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_tasks_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.UniqueConstraint("uid", name="uq_tasks_uid"),
    )
    op.create_index("ix_tasks_status", "tasks", ["status"])
    op.create_index("ix_tasks_status_lease_expires_at", "tasks", ["status", "lease_expires_at"])
    op.create_index("ix_tasks_model_id", "tasks", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_model_id", table_name="tasks")
    op.drop_index("ix_tasks_status_lease_expires_at", table_name="tasks")
    op.drop_index("ix_tasks_status", table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("models")
