"""Erased subjects, remembered in every service's own database (shared/erasures.py); enrollment's
earlier erasures are taken from its erasure streams.

Revision ID: 0002_erased_subjects
Revises: 0001_event_store
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_erased_subjects"
down_revision = "0001_event_store"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erased_subjects",
        sa.Column("subject_id", sa.String(200), primary_key=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
    )
    # Enrollment records each erasure as the one event of stream ``erasure-<subject id>``.
    op.execute(
        "INSERT INTO erased_subjects (subject_id, erased_at) "
        "SELECT substr(stream_id, 9), recorded_at FROM events "
        "WHERE stream_id LIKE 'erasure-%' AND stream_version = 1"
    )


def downgrade() -> None:
    op.drop_table("erased_subjects")
