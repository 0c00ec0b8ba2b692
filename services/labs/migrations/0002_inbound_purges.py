"""Labs: inbound purges, the durable jobs that delete an erased patient's lab messages in clear
from the broker (services/labs/purge.py).

Revision ID: 0002_inbound_purges
Revises: 0001_labs
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_inbound_purges"
down_revision = "0001_labs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbound_purges",
        sa.Column("subject_id", sa.String(64), primary_key=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("results_deleted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rejected_deleted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("events_deleted", sa.Integer, nullable=False, server_default="0"),
    )
    # The worker's query: pending jobs, oldest first.
    op.create_index("ix_inbound_purges_pending", "inbound_purges", ["done_at", "requested_at"])


def downgrade() -> None:
    op.drop_table("inbound_purges")
