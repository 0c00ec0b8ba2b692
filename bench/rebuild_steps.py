"""What each step of a rebuild costs per event, beside the raw read (issue 20, target 2).

One process publishes 100,000 events of :mod:`bench.workload`'s sealed log
(``NEPHROTRACK_BENCH_REBUILD_STEPS_EVENTS``), reads them back with the rebuild's own puller —
the raw read — and then runs each step of the rebuild on all of them in turn, against the real
NATS server and PostgreSQL: decoding (``Incoming.parse``), applying (``ProjectionChanges.add``,
timeline rows included), writing the timeline, serialising and writing the patients (the
checkpoint). Each step's CPU time ÷ events; for the writes also the CPU of the PostgreSQL backend
that ran them (``/proc/<pid>/stat`` of ``pg_backend_pid()``): a core the rebuild needs too.
Why it matters: on 2 cores the rebuild's wall time per event can at best be its CPU per event, all
processes together, halved (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import nats

from bench import workload
from bench.rebuild import NATS_URL, PATIENTS, _fresh_database, delete_streams, publish
from shared.broker import Topology
from shared.keys import KeyVault, bucket_name

EVENTS = int(os.environ.get("NEPHROTRACK_BENCH_REBUILD_STEPS_EVENTS", "100000"))
TIMELINE_BATCH = 20_000  # the rebuild's WRITE_EVERY_EVENTS


def _backend_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(total: int) -> tuple[int, list[tuple[str, float, float | None]]]:
    """(events, [(step, µs of this process's CPU per event, µs of PostgreSQL's or None)])."""
    from sqlalchemy import text

    from bench.rebuild import set_up_child
    from services.outcomes.incoming import Incoming
    from services.outcomes.projection_sql import SqlProjectionStore
    from services.outcomes.projector import ProjectionChanges
    from services.outcomes.rebuild.reader import StreamReader, stream_sequence
    from shared.sealing import SealingCodec
    from shared.store import open_store
    from tests.conftest import drop_database

    set_up_child()
    topology = Topology(f"steps{uuid.uuid4().hex[:8]}")
    streams = {source: topology.service_stream(source).name for source in workload.SOURCES}
    url = ""
    steps: list[tuple[str, float, float | None]] = []
    try:
        await publish(NATS_URL, topology, total, PATIENTS)
        nc = await nats.connect(NATS_URL)
        vault = KeyVault(bucket_name(topology))
        await vault.connect(nc.jetstream())
        watch = asyncio.create_task(vault.watch())
        await vault.synced()
        codec = SealingCodec(vault)
        url = await _fresh_database()
        store = open_store(url, codec=codec)
        projection = SqlProjectionStore()

        async def backend(uow: Any) -> int:
            return (await uow.connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()

        pid = await store.transact(backend)  # the pool's one connection, reused by every write below
        messages: list[tuple[str, int, str, bytes]] = []

        def step(name: str, started: float, db: float | None = None) -> None:
            own = (time.process_time() - started) / len(messages) * 1e6
            steps.append((name, own, None if db is None else (_backend_cpu_seconds(pid) - db) / len(messages) * 1e6))

        gc.collect()
        started = time.process_time()
        for source, stream in streams.items():
            head = (await nc.jetstream().stream_info(stream)).state.last_seq
            read = 0
            async with StreamReader(nc, stream, 1, 2_000) as reader:
                while read < head:
                    batch = await reader.next_batch(head - read)
                    if batch is None:
                        raise RuntimeError(f"{stream}: nothing after {read} messages")
                    read += len(batch)
                    messages.extend((stream, stream_sequence(m), source, m.data) for m in batch)
        step("read (the rebuild's puller; messages kept)", started)

        started = time.process_time()
        items = [Incoming.parse(stream, sequence, source, data, codec) for stream, sequence, source, data in messages]
        step("decode (`Incoming.parse`: metadata, base64, AES-GCM, the event)", started)

        changes = ProjectionChanges({}, codec.is_erased)
        started = time.process_time()
        for item in items:
            changes.add(item)
        step("apply, timeline rows included (`ProjectionChanges.add`)", started)

        async def timed(name: str, work: Callable[[], Awaitable[None]]) -> None:
            db, started = _backend_cpu_seconds(pid), time.process_time()
            await work()
            step(name, started, db)

        timeline = changes.take_timeline()

        async def write_timeline() -> None:
            for start in range(0, len(timeline), TIMELINE_BATCH):
                chunk = timeline[start : start + TIMELINE_BATCH]
                await store.transact(lambda uow, chunk=chunk: projection.write_timeline(uow, 2, chunk))

        await timed("write the timeline (COPY, INSERT … SELECT)", write_timeline)
        started = time.process_time()
        patient_rows = changes.patient_rows()
        step("checkpoint: serialise every patient (`ProjectedPatient.row`)", started)
        await timed("checkpoint: write the patients",
                    partial(store.transact, lambda uow: projection.upsert_patients(uow, 2, patient_rows)))
        await store.close()
        watch.cancel()
        await nc.close()
        return len(messages), steps
    finally:
        await delete_streams(NATS_URL, topology)
        if url:
            await drop_database(url)


async def run(tmp: str) -> str:
    load = os.getloadavg()[0]
    events, steps = await measure(EVENTS)
    read = steps[0][1]
    beyond = sum(own for _, own, _ in steps[1:])
    database = sum(db for _, _, db in steps if db is not None)
    lines = [
        f"### Rebuild step by step against the raw read ({events:,} sealed events, {PATIENTS:,} patients; load "
        f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores)",
        "",
        "| step | µs of CPU per event, rebuild process | µs of CPU per event, PostgreSQL backend |",
        "|---|---|---|",
        *(f"| {name} | {own:.2f} | {'' if db is None else f'{db:.2f}'} |" for name, own, db in steps),
        "",
        f"Beyond the read ({read:.1f} µs): {beyond:.1f} µs of the rebuild process's CPU and {database:.1f} µs of "
        f"PostgreSQL's per event. On {os.cpu_count()} cores the rebuild's wall time per event is at least "
        f"({read:.1f} + {beyond + database:.1f}) / {os.cpu_count()} = {(read + beyond + database) / (os.cpu_count() or 1):.1f} µs; "
        f"50 % of the raw read allows {2 * read:.1f} µs.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(asyncio.run(run("")))
