"""Dashboard sessions: a login with an API key, kept server-side so logout and key revocation end
it on every public API replica at once.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op  # noqa: F401

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    pass  # filled in by the dashboard sessions work


def downgrade() -> None:
    pass
