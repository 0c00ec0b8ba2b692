"""Labs: parked results (subject not enrolled yet), the result-id index per subject, the
rejection log that ``GET /v1/rejections`` reads.

Revision ID: 0001_labs
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_labs"
down_revision = None
branch_labels = ("labs",)
depends_on = "0001_event_store"

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "parked_results",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(10), nullable=False),
        sa.Column("message_id", sa.String(200), nullable=False),
        sa.Column("result_id", sa.String(200), nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("source", "message_id", "result_id", name="uq_parked_results_message"),
    )
    op.create_index("ix_parked_results_subject", "parked_results", ["subject_id"])
    op.create_index("ix_parked_results_parked_at", "parked_results", ["parked_at"])
    op.create_table(
        "lab_result_index",
        sa.Column("result_id", sa.String(200), primary_key=True),
        sa.Column("subject_id", sa.String(64), nullable=False),
    )
    op.create_index("ix_lab_result_index_subject", "lab_result_index", ["subject_id"])
    op.create_table(
        "lab_rejections",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(10), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=True),
        sa.Column("subject_id", sa.Text, nullable=True),
        sa.Column("raw_preview", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("lab_rejections", "lab_result_index", "parked_results"):
        op.drop_table(table)
