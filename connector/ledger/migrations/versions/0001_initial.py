"""Initial ledger: notifications, source cursors, seen resource versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("mapping", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(128), nullable=False),
        sa.Column("resource_version", sa.String(128), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("tracking_id", sa.String(128), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("key", name="uq_notification_key"),
    )
    op.create_index("ix_notification_state_due", "notification", ["state", "due_at"])
    op.create_table(
        "source_cursor",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("value", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "seen_version",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("resource_type", sa.String(64), primary_key=True),
        sa.Column("resource_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("last_updated", UTCDateTime(), nullable=True),
        sa.Column("problem", sa.String(500), nullable=True),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_seen_version_last_updated", "seen_version", ["source", "last_updated"])


def downgrade() -> None:
    op.drop_table("seen_version")
    op.drop_table("source_cursor")
    op.drop_index("ix_notification_state_due", table_name="notification")
    op.drop_table("notification")
