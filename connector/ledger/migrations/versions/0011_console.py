"""The operator console: its audit table, and indexes for its searches (newest first by id, so that a page
is a keyset range, never a scan) and its charts (by the time a notification last changed).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_notification_appointment": ["resource_id", "id"],
    "ix_notification_patient": ["patient_id", "id"],
    "ix_notification_state_id": ["state", "id"],
    "ix_notification_updated": ["updated_at"],
}


def upgrade() -> None:
    op.create_table(
        "console_audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("notification_id", sa.BigInteger(), nullable=True),
        sa.Column("scope", sa.String(500), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
    )
    op.create_index("ix_console_audit_at", "console_audit", ["at"])
    op.create_index("ix_console_audit_notification", "console_audit", ["notification_id", "id"])
    for name, columns in INDEXES.items():
        op.create_index(name, "notification", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="notification")
    op.drop_index("ix_console_audit_notification", table_name="console_audit")
    op.drop_index("ix_console_audit_at", table_name="console_audit")
    op.drop_table("console_audit")
