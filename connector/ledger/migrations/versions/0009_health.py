"""Health of sources and the mailer, written by the daemon for `connector status`; an index for counting
resource versions set aside with a problem (the quarantine gauge of /metrics).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "component_health",
        sa.Column("component", sa.String(100), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since", UTCDateTime(), nullable=True),
        sa.Column("last_ok_at", UTCDateTime(), nullable=True),
        sa.Column("problem", sa.String(500), nullable=True),
        sa.Column("problem_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    problem = sa.text("problem IS NOT NULL")
    op.create_index(
        "ix_seen_version_problem", "seen_version", ["source"], postgresql_where=problem, sqlite_where=problem
    )


def downgrade() -> None:
    op.drop_index("ix_seen_version_problem", table_name="seen_version")
    op.drop_table("component_health")
