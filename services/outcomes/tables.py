"""The outcomes service's projection tables (created by ``migrations/0001_outcomes.py``).

Why a ``generation`` column on every row instead of one table per generation: a rebuild writes
generation N+1 next to the live generation N, and the swap is one update of
``projection_state.active_generation`` — no DDL, no renames, so it is atomic on PostgreSQL and
SQLite alike and a reader sees either the old projection or the new one, never a mix.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Date, DateTime, Integer, MetaData, String, Table, Text, Uuid

from shared.moments import as_utc

metadata = MetaData()

PROJECTION = "outcomes"
"""The name of the one row of ``projection_state``."""

projection_state = Table(
    "projection_state",
    metadata,
    Column("name", String(50), primary_key=True),
    Column("active_generation", Integer, nullable=False),
    Column("rebuilding_generation", Integer, nullable=True),
    Column("rebuild_started_at", DateTime(timezone=True), nullable=True),
    # A lease, so two rebuilds (CLI and admin endpoint) never write one generation at once.
    Column("rebuild_owner", String(64), nullable=True),
    Column("rebuild_heartbeat_at", DateTime(timezone=True), nullable=True),
    Column("swapped_at", DateTime(timezone=True), nullable=True),
)

patients = Table(
    "outcome_patients",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("subject_id", String(64), primary_key=True),
    Column("group", String(16), nullable=True),
    Column("facts_json", Text, nullable=False),
    Column("outcome_json", Text, nullable=True),
    Column("egfr_versions_json", Text, nullable=False),
    # Added by 0002: per kind (urine, adverse_event) and id, the stream version applied.
    Column("report_versions_json", Text, nullable=False, server_default="{}"),
)

timeline = Table(
    "outcome_timeline",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("event_id", Uuid, primary_key=True),
    Column("subject_id", String(64), nullable=False),
    Column("occurred_on", Date, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("source", String(20), nullable=False),
    Column("detail_json", Text, nullable=False),
)

sources = Table(
    "outcome_sources",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("source", String(100), primary_key=True),
    Column("last_sequence", BigInteger, nullable=False),
    Column("last_event_recorded_at", DateTime(timezone=True), nullable=True),
)

GENERATION_TABLES = (patients, timeline, sources)

locks = Table(
    # Added by 0003: one row per analysis lock; its rows are those of ``generation`` (below zero:
    # frozen, never written nor dropped by a rebuild) in the three generation tables.
    "analysis_locks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("generation", Integer, nullable=False, unique=True),
    Column("locked_at", DateTime(timezone=True), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("positions_json", Text, nullable=False),
)


def utc(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime, or None."""
    return None if value is None else as_utc(value)
