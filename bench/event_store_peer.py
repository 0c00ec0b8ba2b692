"""Our PostgreSQL event store beside the Python reference, pyeventsourcing's PostgreSQL
application recorder (issue 20, target 3): append of the same events — 100-byte payloads, one
event per transaction, 1 and 8 concurrent writers — and the catch-up read of all of them.

Same PostgreSQL server, same durability (the server's ``synchronous_commit``, shown), each store
in its own database, rounds interleaved (the order alternates) so that load from elsewhere on
the shared machine falls on both. The peer is configured as its users do — through its
environment (``PERSISTENCE_MODULE=eventsourcing.postgres``, ``POSTGRES_*``), with its compiled
driver (``psycopg[binary]``) and a pool as large as the writers — and, being synchronous, writes
from one thread per writer. Ours writes an outbox row with each event and keeps its lock-free
gap-free read; the peer serialises writers with a table lock."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from importlib.metadata import version

from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench.event_store import BenchEventRecorded, appends
from bench.report import percentile
from shared.database import analyze_stale_tables, create_engine, ensure_database, migrate
from shared.store import PostgresEventStore
from shared.store.base import START, Position
from tests.conftest import POSTGRES, drop_database

ROUNDS = 3
APPENDS = {1: 1000, 8: 2000}
"""Appends per round by the number of concurrent writers (shared equally among them)."""
READ_BATCH = 1000

PAYLOAD = BenchEventRecorded(n=0).model_dump_json().encode()
"""The peer's stored state: our event's payload as our store encodes it (about 100 bytes)."""

Timed = tuple[float, list[float]]
"""Seconds for the whole round, and each append's latency."""


class Ours:
    name = "ours"

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: PostgresEventStore | None = None

    async def open(self) -> None:
        await asyncio.to_thread(migrate, "bench", self.url)
        engine = create_engine(self.url, pool_size=max(APPENDS))
        self.store = PostgresEventStore(engine, subject_for=lambda envelope: "bench.peer")

    async def append_round(self, writers: int, tag: str) -> Timed:
        assert self.store is not None
        return await appends(self.store, writers, APPENDS[writers] // writers, tag)

    async def analyse(self) -> None:
        """What a service's statistics keeper (``keep_statistics``, every 10 s) has done by the
        time the appends are over: without statistics PostgreSQL sorts the rest of the log for
        each batch instead of reading the commit-order index (docs/performance.md)."""
        assert self.store is not None
        await analyze_stale_tables(self.store.engine)

    async def read_all(self) -> tuple[float, int]:
        assert self.store is not None
        started = time.perf_counter()
        count = 0
        async for _ in self.store.read_all(batch_size=READ_BATCH):
            count += 1
        return time.perf_counter() - started, count

    async def read_rows(self) -> tuple[float, int]:
        """The same query without building envelopes: rows as they come, like the peer's."""
        assert self.store is not None
        started = time.perf_counter()
        count, after = 0, START
        while True:
            rows = await self.store._rows_after(after, READ_BATCH)
            count += len(rows)
            if len(rows) < READ_BATCH:
                return time.perf_counter() - started, count
            after = Position(rows[-1].tx_id, rows[-1].position)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


class Peer:
    name = "eventsourcing"

    def __init__(self, url: str) -> None:
        self.url = url
        self.recorder = None
        self.factory = None

    async def open(self) -> None:
        from eventsourcing.persistence import InfrastructureFactory

        await ensure_database(self.url)
        parsed = make_url(self.url)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parsed.database or "",
            "POSTGRES_HOST": parsed.host or "127.0.0.1",
            "POSTGRES_PORT": str(parsed.port or 5432),
            "POSTGRES_USER": parsed.username or "postgres",
            "POSTGRES_PASSWORD": parsed.password or "",
            "POSTGRES_POOL_SIZE": str(max(APPENDS)),
        }
        self.factory = InfrastructureFactory.construct(env)
        self.recorder = await asyncio.to_thread(self.factory.application_recorder)

    async def append_round(self, writers: int, tag: str) -> Timed:
        from eventsourcing.persistence import StoredEvent

        recorder = self.recorder
        assert recorder is not None
        latencies: list[float] = []
        each = APPENDS[writers] // writers
        start = threading.Barrier(writers + 1)

        def writer() -> None:
            batch = [StoredEvent(uuid.uuid4(), 1, "bench:BenchEventRecorded", PAYLOAD) for _ in range(each)]
            start.wait()
            for stored in batch:
                begun = time.perf_counter()
                recorder.insert_events([stored])
                latencies.append(time.perf_counter() - begun)

        threads = [threading.Thread(target=writer) for _ in range(writers)]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(start.wait)
        started = time.perf_counter()
        await asyncio.to_thread(lambda: [thread.join() for thread in threads])
        return time.perf_counter() - started, latencies

    async def read_all(self) -> tuple[float, int]:
        recorder = self.recorder
        assert recorder is not None

        def read() -> int:
            count, start = 0, 1
            while True:
                notifications = recorder.select_notifications(start, READ_BATCH)
                count += len(notifications)
                if len(notifications) < READ_BATCH:
                    return count
                start = notifications[-1].id + 1

        started = time.perf_counter()
        count = await asyncio.to_thread(read)
        return time.perf_counter() - started, count

    async def close(self) -> None:
        if self.factory is not None:
            self.factory.close()


async def _synchronous_commit(url: str) -> str:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return str(await connection.scalar(text("SHOW synchronous_commit")))
    finally:
        await engine.dispose()


async def _rounds(stores: list[Ours | Peer]) -> dict[tuple[str, int], list[Timed]]:
    found: dict[tuple[str, int], list[Timed]] = {}
    for round_ in range(ROUNDS):
        for writers in APPENDS:
            order = stores if round_ % 2 == 0 else stores[::-1]
            for store in order:
                result = await store.append_round(writers, f"r{round_}w{writers}")
                found.setdefault((store.name, writers), []).append(result)
    return found


def _rate(results: list[Timed], count: int) -> float:
    return statistics.median(count / elapsed for elapsed, _ in results)


def _latencies(results: list[Timed]) -> list[float]:
    return [latency for _, latencies in results for latency in latencies]


async def run(tmp: str) -> str:
    ours = Ours(f"{POSTGRES}/nt_bench_ours_{uuid.uuid4().hex[:8]}")
    peer = Peer(f"{POSTGRES}/nt_bench_peer_{uuid.uuid4().hex[:8]}")
    stores: list[Ours | Peer] = [ours, peer]
    try:
        for store in stores:
            await store.open()
        durability = await _synchronous_commit(ours.url)
        appended = await _rounds(stores)
        await ours.analyse()
        reads: dict[str, list[tuple[float, int]]] = {}
        readers = {"ours": ours.read_all, "eventsourcing": peer.read_all, "ours, rows": ours.read_rows}
        for round_ in range(ROUNDS):
            for name, read in readers.items() if round_ % 2 == 0 else reversed(readers.items()):
                reads.setdefault(name, []).append(await read())
    finally:
        for store in stores:
            await store.close()
        for url in (ours.url, peer.url):
            await drop_database(url)
    rows = []
    for writers, count in APPENDS.items():
        mine, theirs = appended[("ours", writers)], appended[("eventsourcing", writers)]
        ours_rate, peer_rate = _rate(mine, count), _rate(theirs, count)
        rows.append(
            f"| append, {writers} writer{'s' if writers > 1 else ''} | {ours_rate:,.0f} | {peer_rate:,.0f} | "
            f"**{ours_rate / peer_rate:.2f}×** | {percentile(_latencies(mine), 50) * 1000:.2f} / "
            f"{percentile(_latencies(mine), 99) * 1000:.2f} | {percentile(_latencies(theirs), 50) * 1000:.2f} / "
            f"{percentile(_latencies(theirs), 99) * 1000:.2f} |"
        )
    read_rates = {name: statistics.median(n / elapsed for elapsed, n in results) for name, results in reads.items()}
    read_count = reads["ours"][0][1]
    rows.append(
        f"| catch-up read of {read_count:,} events (batches of {READ_BATCH}) | {read_rates['ours']:,.0f} | "
        f"{read_rates['eventsourcing']:,.0f} | **{read_rates['ours'] / read_rates['eventsourcing']:.2f}×** | | |"
    )
    rows.append(
        f"| the same read, ours as undecoded rows (no envelopes) | {read_rates['ours, rows']:,.0f} | "
        f"{read_rates['eventsourcing']:,.0f} | {read_rates['ours, rows'] / read_rates['eventsourcing']:.2f}× | | |"
    )
    return "\n".join(
        [
            f"### Event store against the Python peer: eventsourcing {version('eventsourcing')} "
            f"(PostgresApplicationRecorder, psycopg {version('psycopg')}, psycopg-binary, psycopg-pool "
            f"{version('psycopg-pool')})",
            "",
            f"Same PostgreSQL, synchronous_commit={durability} for both; one event of {len(PAYLOAD)} payload bytes "
            f"per transaction (ours with its outbox row); {ROUNDS} interleaved rounds, median rate of the rounds, "
            "latencies over all rounds; the read: every event appended, oldest first, median of "
            f"{ROUNDS} interleaved reads (ours decoded into envelopes, the peer's as its notifications).",
            "",
            "| operation | ours /s | eventsourcing /s | ours ÷ peer | ours p50 / p99 ms | peer p50 / p99 ms |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )

