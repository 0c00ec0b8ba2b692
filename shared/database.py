"""Engines and migrations for a service's own database (PostgreSQL or SQLite).

SQLite is first-class for the embedded default, so it is configured for several processes and
tasks writing at once: WAL journal, a busy timeout instead of instant "database is locked", and
``BEGIN IMMEDIATE`` so a transaction takes the write lock up front rather than failing when it
upgrades from read to write half-way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, any_, bindparam, event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SHARED_MIGRATIONS = Path(__file__).parent / "migrations"
SERVICES_DIR = Path(__file__).parent.parent / "services"


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
        connect_args={"server_settings": POSTGRES_SETTINGS},
    )


POSTGRES_SETTINGS = {"plan_cache_mode": "force_custom_plan"}
"""Session settings of every PostgreSQL connection of a service.

``plan_cache_mode``: asyncpg prepares every statement, and after five runs PostgreSQL may keep
one generic plan for it, made for the tables as they then were — an event store's start empty
and grow by thousands of rows a second — and blind to the values. The labs inbox probe (500
message ids a batch) then compared the ids, a parameter, one by one with every row the plan
read: 133 µs of server CPU per result, against 4 µs with a plan made for each run, where the
ids are a constant array PostgreSQL hashes (docs/labs.md#throughput,
tests/foundation/test_query_plans.py). Planning these statements each time costs far less."""


def one_of(column: ColumnElement[Any], values: Sequence[Any], *, postgres: bool) -> ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL as ``column = ANY($1)`` with the values bound as one
    array. SQLAlchemy renders an ``IN`` list anew for every length and binds each value on its
    own: for the 500 ids of a lab batch that cost more CPU than the query (docs/labs.md#throughput),
    and every length was another statement for the server to prepare."""
    if postgres:
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")


async def ensure_database(url: str) -> None:
    """Create the PostgreSQL database named in ``url`` if it does not exist (one per service)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return
    admin = create_async_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            exists = await connection.exec_driver_sql(
                "SELECT 1 FROM pg_database WHERE datname = $1", (parsed.database,)
            )
            if exists.first() is None:
                await connection.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
    finally:
        await admin.dispose()


def alembic_config(service: str, url: str) -> Config:
    """Shared event-store migrations plus the service's own (``services/<svc>/migrations``)."""
    config = Config()
    config.set_main_option("script_location", str(SHARED_MIGRATIONS))
    locations = [SHARED_MIGRATIONS / "versions"]
    own = SERVICES_DIR / service / "migrations"
    if own.is_dir():
        locations.append(own)
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", ":".join(str(p) for p in locations))
    config.attributes["url"] = url
    return config


def migrate(service: str, url: str) -> None:
    """Bring the service's database to the newest schema. Synchronous: call it outside an
    event loop (or via ``asyncio.to_thread``); Alembic runs its own loop for the async driver."""
    asyncio.run(ensure_database(url))
    command.upgrade(alembic_config(service, url), "heads")
