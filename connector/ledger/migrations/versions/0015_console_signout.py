"""Console sign-outs recorded in the ledger (`console_signout`: the digest of a signed-out session and until
when its cookie could be shown), so that every process serving the console refuses a signed-out cookie.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_signout",
        sa.Column("session", sa.String(64), primary_key=True),
        sa.Column("until", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_console_signout_until", "console_signout", ["until"])


def downgrade() -> None:
    op.drop_index("ix_console_signout_until", table_name="console_signout")
    op.drop_table("console_signout")
