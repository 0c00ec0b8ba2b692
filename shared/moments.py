"""One rule for moments read back from a database: everything stored is UTC.

SQLite (and PostgreSQL `timestamp without time zone` columns) hand back naive datetimes; a naive
value compared with an aware one raises, so every reader converts through here.
"""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is UTC:  # asyncpg's timestamptz: as it is (the common case, once per field read)
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
