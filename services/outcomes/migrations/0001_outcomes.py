"""Outcomes projections: per-patient facts and outcomes, timeline, per-source checkpoints.

Every projection row carries a ``generation``; ``projection_state`` names the generation the API
serves and the one a rebuild is writing, so a rebuild swaps by updating one row.

Revision ID: 0001_outcomes
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_outcomes"
down_revision = None
branch_labels = ("outcomes",)
depends_on = "0001_event_store"


def upgrade() -> None:
    state = op.create_table(
        "projection_state",
        sa.Column("name", sa.String(50), primary_key=True),
        sa.Column("active_generation", sa.Integer, nullable=False),
        sa.Column("rebuilding_generation", sa.Integer, nullable=True),
        sa.Column("rebuild_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rebuild_owner", sa.String(64), nullable=True),
        sa.Column("rebuild_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("swapped_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.bulk_insert(state, [{"name": "outcomes", "active_generation": 1}])
    op.create_table(
        "outcome_patients",
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("subject_id", sa.String(64), primary_key=True),
        sa.Column("group", sa.String(16), nullable=True),
        sa.Column("facts_json", sa.Text, nullable=False),
        sa.Column("outcome_json", sa.Text, nullable=True),
        sa.Column("egfr_versions_json", sa.Text, nullable=False),
    )
    op.create_table(
        "outcome_timeline",
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("occurred_on", sa.Date, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("detail_json", sa.Text, nullable=False),
    )
    op.create_index("ix_outcome_timeline_patient", "outcome_timeline", ["generation", "subject_id", "occurred_on"])
    op.create_table(
        "outcome_sources",
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("source", sa.String(100), primary_key=True),
        sa.Column("last_sequence", sa.BigInteger, nullable=False),
        sa.Column("last_event_recorded_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    for table in ("outcome_sources", "outcome_timeline", "outcome_patients", "projection_state"):
        op.drop_table(table)
