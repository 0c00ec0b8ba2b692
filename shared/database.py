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

import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, any_, bindparam, event, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = structlog.get_logger(__name__)

SHARED_MIGRATIONS = Path(__file__).parent / "migrations"
SERVICES_DIR = Path(__file__).parent.parent / "services"


def create_engine(url: str, *, pool_size: int = 10, plan_each_run: bool = True) -> AsyncEngine:
    """``plan_each_run=False`` leaves PostgreSQL's plan cache as it is (:data:`POSTGRES_SETTINGS`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    # No pool_pre_ping: it cost three round trips per transaction (18–24 % of an append, issue
    # 20). A pooled connection the server dropped fails its first statement instead; SQLAlchemy
    # then discards every connection of the pool older than the failure, and the failure is a
    # store outage (shared/outages.py) that consumers and requests wait out and retry.
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size,
        connect_args={"server_settings": POSTGRES_SETTINGS if plan_each_run else {}},
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


ANALYZE_THRESHOLD = 50
ANALYZE_SCALE_FACTOR = 0.1
"""A table is analysed once ``threshold + scale_factor × its rows`` rows changed since its last
analysis: autovacuum's own rule, with its defaults."""
ANALYZE_EVERY_SECONDS = 10.0

_STALE_TABLES = text(
    "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema() "
    "AND n_mod_since_analyze > :threshold + :scale_factor * n_live_tup ORDER BY relname"
)


async def analyze_stale_tables(engine: AsyncEngine) -> list[str]:
    """ANALYZE the tables of this database whose planner statistics are stale (autovacuum's rule);
    returns their names. PostgreSQL only.

    Why a service does this itself: an event store's batch reads look rows up by hundreds of keys
    at once (``stream_id = ANY(500 ids)``, ``one_of``). Without column statistics — a table never
    analysed, because autovacuum is off (it is on the development machine) or has not come round
    yet (it wakes once a minute) — PostgreSQL takes each key to match 0.5 % of the rows, 500 keys
    all of them, and plans a sequential scan of the whole event log for every batch: labs'
    PostgreSQL CPU per result grew with the log, 50 → 86 µs over four benchmark runs, and back to
    45 with statistics (docs/labs.md#throughput, tests/foundation/test_query_plans.py)."""
    async with engine.connect() as connection:
        stale = list(
            await connection.scalars(_STALE_TABLES, {"threshold": ANALYZE_THRESHOLD, "scale_factor": ANALYZE_SCALE_FACTOR})
        )
        quote = connection.dialect.identifier_preparer.quote
        for table in stale:
            await connection.exec_driver_sql(f"ANALYZE {quote(table)}")
        await connection.commit()
    return stale


async def keep_statistics(engine: AsyncEngine, every: float = ANALYZE_EVERY_SECONDS) -> None:
    """Run :func:`analyze_stale_tables` every ``every`` seconds, for ever (a service's background
    task on PostgreSQL). A failure is logged and tried again at the next round."""
    while True:
        try:
            analysed = await analyze_stale_tables(engine)
        except Exception as exc:  # noqa: BLE001 - plans may suffer, nothing is lost
            log.warning("analysing tables failed", error=repr(exc))
        else:
            if analysed:
                log.debug("tables analysed", tables=analysed)
        await asyncio.sleep(every)


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
