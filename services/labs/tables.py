"""The labs service's own tables beside its event store (created by ``migrations/``).

Only :mod:`services.labs.queries` (the SQL side of the :class:`~services.labs.labs_store.LabsStore`
port) touches them; the use cases read and write through the port, so they run on the in-memory
store as well.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, Text, Uuid

metadata = MetaData()
_Id = BigInteger().with_variant(Integer(), "sqlite")

parked_results = Table(
    "parked_results",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("source", String(10), nullable=False),
    Column("message_id", String(200), nullable=False),
    Column("result_id", String(200), nullable=False),
    Column("subject_id", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False),
)
"""Results for subjects not (yet) enrolled; one row per (source, message_id, result_id)."""

lab_result_index = Table(
    "lab_result_index",
    metadata,
    Column("result_id", String(200), primary_key=True),
    Column("subject_id", String(64), nullable=False),
)
"""Which result ids belong to a subject (``GET /v1/patients/{id}/results``)."""

lab_rejections = Table(
    "lab_rejections",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("event_id", Uuid, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("source", String(10), nullable=False),
    Column("code", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("message_id", Text, nullable=True),
    Column("subject_id", Text, nullable=True),
    Column("raw_preview", Text, nullable=False),
)
"""The rejection log ``GET /v1/rejections`` shows (the published events carry the whole payload)."""

inbound_purges = Table(
    "inbound_purges",
    metadata,
    Column("subject_id", String(64), primary_key=True),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("done_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("results_deleted", Integer, nullable=False, server_default="0"),
    Column("rejected_deleted", Integer, nullable=False, server_default="0"),
    Column("events_deleted", Integer, nullable=False, server_default="0"),
)
"""Erased subjects whose lab messages in clear are to be deleted from the broker (purge.py)."""
