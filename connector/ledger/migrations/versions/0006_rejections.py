"""Refused webhook requests, counted by endpoint and reason (for `connector status`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejection",
        sa.Column("endpoint", sa.String(80), primary_key=True),
        sa.Column("reason", sa.String(100), primary_key=True),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("last_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rejection")
