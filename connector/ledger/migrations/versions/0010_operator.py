"""Operator actions: a row for each notification a person settled or queued again (`connector resolve`,
`connector retry`), and an index for selecting notifications by state and time window.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operator_action",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("notification_id", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_operator_action_notification", "operator_action", ["notification_id", "id"])
    op.create_index("ix_notification_state_updated", "notification", ["state", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_notification_state_updated", table_name="notification")
    op.drop_index("ix_operator_action_notification", table_name="operator_action")
    op.drop_table("operator_action")
