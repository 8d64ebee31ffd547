"""FHIR Subscriptions: per subscription, the last event number and when it was last heard from.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subscription_state",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("subscription", sa.String(300), primary_key=True),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("last_seen", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("subscription_state")
