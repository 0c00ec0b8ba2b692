"""Event store: events, outbox, inbox, checkpoints, and the register of known patients.

Revision ID: 0001_event_store
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_event_store"
down_revision = None
branch_labels = ("eventstore",)
depends_on = None

Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", Position, primary_key=True, autoincrement=True),
        sa.Column("tx_id", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("event_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("stream_version", sa.Integer, nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("correlation_id", sa.Uuid, nullable=False),
        sa.Column("causation_id", sa.Uuid, nullable=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("stream_id", "stream_version", name="uq_events_stream_version"),
    )
    op.create_index("ix_events_commit_order", "events", ["tx_id", "position"])
    op.create_table(
        "outbox",
        sa.Column("id", Position, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("subject", sa.String(250), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.String(100), primary_key=True),
        sa.Column("message_id", sa.String(200), primary_key=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("tx_id", sa.BigInteger, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "known_patients",
        sa.Column("subject_id", sa.String(64), primary_key=True),
        sa.Column("group", sa.String(16), nullable=False),
        sa.Column("sex", sa.String(1), nullable=False),
        sa.Column("age_years", sa.Integer, nullable=False),
        sa.Column("enrolled_on", sa.Date, nullable=False),
    )


def downgrade() -> None:
    for table in ("known_patients", "checkpoints", "inbox", "outbox", "events"):
        op.drop_table(table)
