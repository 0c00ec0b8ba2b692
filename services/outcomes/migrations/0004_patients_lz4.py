"""Patient rows' JSON compressed with lz4 instead of pglz on PostgreSQL: a live batch rewrites
every patient it touches, whole history included (tens of KB of facts JSON each, stored out of
line and compressed); pglz compressing them was most of PostgreSQL's CPU in the labs benchmark
(docs/performance.md, "End to end, live"). Values already stored stay as they are and read as
before; each is recompressed when next written. A server built without lz4 keeps pglz.

Revision ID: 0004_patients_lz4
Revises: 0003_analysis_locks
Create Date: 2026-12-06
"""

from alembic import op

revision = "0004_patients_lz4"
down_revision = "0003_analysis_locks"
branch_labels = None
depends_on = None

_COLUMNS = ("facts_json", "outcome_json")


def _compress(method: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    alter = ", ".join(f"ALTER COLUMN {column} SET COMPRESSION {method}" for column in _COLUMNS)
    op.execute(
        f"DO $$ BEGIN ALTER TABLE outcome_patients {alter}; "
        f"EXCEPTION WHEN feature_not_supported THEN RAISE NOTICE 'lz4 not supported: pglz kept'; END $$"
    )


def upgrade() -> None:
    _compress("lz4")


def downgrade() -> None:
    _compress("pglz")
