"""Outcome statistics v2: adverse events and urine results join the patient's facts, guarded by
the stream version of the report applied (``report_versions_json``, as ``egfr_versions_json``
guards eGFRs).

The facts and values themselves live in the existing JSON columns (older rows read with the v2
values at their defaults). A projection built before this revision never read the adverse-event
and urine events (its consumers moved past them), so run ``nephrotrack rebuild`` after upgrading:
the rebuild replays the whole log into a new generation and swaps it in (services/outcomes/README.md).

Revision ID: 0002_outcomes_v2
Revises: 0001_outcomes
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_outcomes_v2"
down_revision = "0001_outcomes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outcome_patients") as table:
        table.add_column(sa.Column("report_versions_json", sa.Text, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("outcome_patients") as table:
        table.drop_column("report_versions_json")
