"""CRM inbox: received webhook events, encrypted, unique per source and sender event id.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbox_event",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("processed_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("source", "event_id", name="uq_inbox_source_event"),
    )
    op.create_index("ix_inbox_pending", "inbox_event", ["processed_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_inbox_pending", table_name="inbox_event")
    op.drop_table("inbox_event")
