"""Analysis locks (time travel): ``analysis_locks`` names the frozen generations, copies of the
projection's rows kept below generation zero (services/outcomes/locks.py, docs/time-travel.md).

Revision ID: 0003_analysis_locks
Revises: 0002_outcomes_v2
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_analysis_locks"
down_revision = "0002_outcomes_v2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analysis_locks",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False, unique=True),
        sa.Column("locked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("positions_json", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("analysis_locks")
