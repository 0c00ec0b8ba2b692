"""Event-store append throughput and latency: PostgreSQL with the lock-free commit-order
strategy (xmin) beside the classic table lock, SQLite, and a raw batched INSERT of the same
rows as the ceiling. Concurrent writers, one event per transaction, as commands write."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import insert

from bench.report import percentile
from shared.database import create_engine, migrate
from shared.events import DomainEvent, registry
from shared.schema import events
from shared.store import EventStore, GapStrategy, PostgresEventStore, SqliteEventStore
from tests.conftest import POSTGRES, drop_database

WRITERS = 8
APPENDS_PER_WRITER = 250


@registry.register
class BenchEventRecorded(DomainEvent):
    n: int
    note: str = "x" * 100


async def appends(
    store: EventStore, writers: int = WRITERS, each: int = APPENDS_PER_WRITER, tag: str = "bench"
) -> tuple[float, list[float]]:
    """``writers`` concurrent writers each appending ``each`` one-event new streams: the seconds
    it took and every append's latency."""
    latencies: list[float] = []

    async def writer(w: int) -> None:
        for i in range(each):
            started = time.perf_counter()
            await store.append(f"{tag}-{w}-{i}", [BenchEventRecorded(n=i)], expected_version=0)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return time.perf_counter() - started, latencies


async def _raw_insert(url: str, count: int) -> float:
    engine = create_engine(url)
    now = datetime.now(UTC)
    rows = [
        {
            "event_id": uuid.uuid4(), "stream_id": f"raw-{i}", "stream_version": 1, "event_type": "Raw",
            "schema_version": 1, "occurred_at": now, "recorded_at": now, "correlation_id": uuid.uuid4(),
            "causation_id": None, "actor": "bench", "payload": b'{"n":1}',
        }
        for i in range(count)
    ]
    started = time.perf_counter()
    for chunk in range(0, count, 1000):
        async with engine.begin() as connection:
            await connection.execute(insert(events), rows[chunk : chunk + 1000])
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return elapsed


async def _measure(url: str, strategy: GapStrategy) -> str:
    await asyncio.to_thread(migrate, "bench", url)
    engine = create_engine(url, pool_size=WRITERS)
    store: EventStore = (
        PostgresEventStore(engine, subject_for=lambda e: "bench.x", gap_strategy=strategy)
        if url.startswith("postgresql")
        else SqliteEventStore(engine, subject_for=lambda e: "bench.x")
    )
    elapsed, latencies = await appends(store)
    await store.close()
    total = WRITERS * APPENDS_PER_WRITER
    raw = await _raw_insert(url, total)
    return (
        f"| {url.split(':')[0]} | {strategy} | {total / elapsed:,.0f} | {percentile(latencies, 50) * 1000:.1f} | "
        f"{percentile(latencies, 99) * 1000:.1f} | {total / raw:,.0f} | {raw / elapsed:.2f} |"
    )


async def run(tmp: str) -> str:
    rows = []
    for strategy in (GapStrategy.XMIN, GapStrategy.TABLE_LOCK):
        url = f"{POSTGRES}/nt_bench_{uuid.uuid4().hex[:8]}"
        try:
            rows.append(await _measure(url, strategy))
        finally:
            await drop_database(url)
    rows.append(await _measure(f"sqlite+aiosqlite:///{tmp}/bench-{uuid.uuid4().hex[:6]}.db", GapStrategy.XMIN))
    return "\n".join(
        [
            f"### Event store append ({WRITERS} concurrent writers × {APPENDS_PER_WRITER} one-event transactions, with outbox rows)",
            "",
            "| backend | gap strategy | appends/s | p50 ms | p99 ms | raw batched INSERT rows/s | append ÷ raw |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
