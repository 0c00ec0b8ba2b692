"""Tables every service's own database has: the event log, the outbox, the inbox, checkpoints.

One definition serves PostgreSQL and SQLite alike; Alembic migrations are written from it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    Uuid,
)

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY, PostgreSQL wants BIGINT: one type for both.
Position = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "events",
    metadata,
    Column("position", Position, primary_key=True, autoincrement=True),
    # PostgreSQL transaction id (xid8) of the writer; 0 on SQLite. See EventStore.read_all.
    Column("tx_id", BigInteger, nullable=False, server_default="0"),
    Column("event_id", Uuid, nullable=False, unique=True),
    Column("stream_id", String(200), nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("event_type", String(100), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("correlation_id", Uuid, nullable=False),
    Column("causation_id", Uuid, nullable=True),
    Column("actor", String(200), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    UniqueConstraint("stream_id", "stream_version", name="uq_events_stream_version"),
    Index("ix_events_commit_order", "tx_id", "position"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Position, primary_key=True, autoincrement=True),
    Column("event_id", Uuid, nullable=False),
    Column("subject", String(250), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

inbox = Table(
    "inbox",
    metadata,
    Column("consumer", String(100), primary_key=True),
    Column("message_id", String(200), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("tx_id", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# What a service learned from enrollment's events about the patients that exist.
known_patients = Table(
    "known_patients",
    metadata,
    Column("subject_id", String(64), primary_key=True),
    Column("group", String(16), nullable=False),
    Column("sex", String(1), nullable=False),
    Column("age_years", Integer, nullable=False),
    Column("enrolled_on", Date, nullable=False),
)

# Subjects whose data were erased, as this service learned it (shared/erasures.py): its key
# mirror treats them as erased from start-up on, whatever the key bucket still holds.
erased_subjects = Table(
    "erased_subjects",
    metadata,
    Column("subject_id", String(200), primary_key=True),
    Column("erased_at", DateTime(timezone=True), nullable=False),
)
