"""Delivery: when the first attempt was made (for the age limit), deliberate resends of in-doubt
notifications, the delivery status reported by Paubox webhooks and receipts, and the in-doubt alert.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notification") as batch:
        batch.add_column(sa.Column("first_attempt_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("resends", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("delivery_status", sa.String(32), nullable=True))
        batch.add_column(sa.Column("delivery_rank", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("delivery_updated_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("alerted_at", UTCDateTime(), nullable=True))
    op.create_index("ix_notification_tracking", "notification", ["tracking_id"])


def downgrade() -> None:
    op.drop_index("ix_notification_tracking", table_name="notification")
    with op.batch_alter_table("notification") as batch:
        for column in (
            "alerted_at",
            "delivery_updated_at",
            "delivery_rank",
            "delivery_status",
            "resends",
            "first_attempt_at",
        ):
            batch.drop_column(column)
