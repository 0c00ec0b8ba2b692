"""The event store: one interface (:mod:`shared.store.base`), one store per backend, and
:func:`open_store`, which picks the backend a database URL names."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import make_url

from shared.database import create_engine
from shared.events import Envelope
from shared.store.base import (
    JSON_CODEC,
    START,
    Codec,
    ConcurrencyError,
    EventStore,
    JsonCodec,
    Position,
    StoredEvent,
    UnitOfWork,
)
from shared.store.memory import MemoryEventStore
from shared.store.postgres import GapStrategy, PostgresEventStore
from shared.store.registers import EnrolledPatient
from shared.store.sql import SqlEventStore, SqlUnitOfWork
from shared.store.sqlite import SqliteEventStore

__all__ = [
    "JSON_CODEC",
    "START",
    "Codec",
    "ConcurrencyError",
    "EnrolledPatient",
    "EventStore",
    "GapStrategy",
    "JsonCodec",
    "MEMORY_URL",
    "MemoryEventStore",
    "Position",
    "PostgresEventStore",
    "SqlEventStore",
    "SqlUnitOfWork",
    "SqliteEventStore",
    "StoredEvent",
    "UnitOfWork",
    "open_store",
]

MEMORY_URL = "memory://"


def open_store(
    url: str, *, subject_for: Callable[[Envelope], str | None] | None = None, codec: Codec | None = None
) -> EventStore:
    """The event store of ``url``: ``postgresql+asyncpg://…``, ``sqlite+aiosqlite:///…``, or
    ``memory://`` (a new, empty store in this process: tests)."""
    backend = make_url(url).get_backend_name()
    if backend == "memory":
        return MemoryEventStore(subject_for=subject_for, codec=codec)
    stores: dict[str, type[PostgresEventStore | SqliteEventStore]] = {
        "postgresql": PostgresEventStore, "sqlite": SqliteEventStore,
    }
    if backend not in stores:  # the URL itself may hold a password: name its backend only
        raise ValueError(f"no event store for {backend!r} databases: use postgresql+asyncpg://, "
                         f"sqlite+aiosqlite:/// or {MEMORY_URL}")
    return stores[backend](create_engine(url), subject_for=subject_for, codec=codec)
