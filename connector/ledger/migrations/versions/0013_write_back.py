"""Write-back to the EHR: one row per write owed for a notification (a Communication), with its retries;
an index for counting a patient's emails (the daily cap); addresses suppressed after bounces.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "write_back",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("notification_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("resource_id", sa.String(128), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("notification_id", "kind", name="uq_write_back_notification_kind"),
    )
    op.create_index("ix_write_back_state_due", "write_back", ["state", "due_at"])
    op.create_index("ix_notification_source_patient", "notification", ["source", "patient_id"])
    op.create_table(
        "address_suppression",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("hint", sa.String(200), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False, server_default="bounce"),
        sa.Column("soft_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("soft_since", UTCDateTime(), nullable=True),
        sa.Column("suppressed_at", UTCDateTime(), nullable=True),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("cleared_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("source", "patient_id", "digest", name="uq_address_suppression"),
    )


def downgrade() -> None:
    op.drop_table("address_suppression")
    op.drop_index("ix_notification_source_patient", table_name="notification")
    op.drop_index("ix_write_back_state_due", table_name="write_back")
    op.drop_table("write_back")
