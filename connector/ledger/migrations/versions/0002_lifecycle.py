"""Appointment lifecycle: remembered appointment states, the opt-out list, the start a notification was
planned for.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notification") as batch:
        batch.add_column(sa.Column("appointment_start", UTCDateTime(), nullable=True))
    op.create_index("ix_notification_resource", "notification", ["source", "resource_id"])
    op.create_table(
        "appointment_state",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("appointment_id", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("start", UTCDateTime(), nullable=True),
        sa.Column("end", UTCDateTime(), nullable=True),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("patients", sa.String(2000), nullable=False),
        sa.Column("last_updated", UTCDateTime(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "optout",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("hint", sa.String(200), nullable=False),
        sa.Column("note", sa.String(500), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("kind", "digest", name="uq_optout_kind_digest"),
    )


def downgrade() -> None:
    op.drop_table("optout")
    op.drop_table("appointment_state")
    op.drop_index("ix_notification_resource", table_name="notification")
    with op.batch_alter_table("notification") as batch:
        batch.drop_column("appointment_start")
