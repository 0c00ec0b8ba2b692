"""The rebuild's fast paths give the rows the live projection gives (docs/performance.md).

tests/outcomes/test_rebuild.py checkpoints every few hundred events, so its timeline rows are
written by the checkpoints. Here the rebuild runs as it does on a big log: timeline rows written
in the background between rare checkpoints (COPY on PostgreSQL once a write holds enough rows),
several pull requests outstanding, a resumed run re-writing rows already there — and the rows
must still equal, row for row, those of a live projection fed the same messages.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from services.outcomes import projection_sql
from services.outcomes.rebuild.job import Rebuild
from services.outcomes.rebuild.wiring import default_streams
from shared.broker import Topology
from shared.database import migrate
from tests.conftest import drop_database, new_database_url
from tests.outcomes.mixed_run import mixed_run, publish
from tests.outcomes.rows import generation_rows, state
from tests.outcomes.test_rebuild import broker_url, caught_up, live_outcomes, sql_store  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)


async def test_background_timeline_writes_and_copy_equal_the_live_projection(
    backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projection_sql, "COPY_AT_LEAST", 50)  # COPY for most writes, INSERT for the small ones
    url = new_database_url(backend, tmp_path, "outcomes")
    await asyncio.to_thread(migrate, "outcomes", url)
    js = nats_client.jetstream()
    store = sql_store(url)
    engine = store.engine
    try:
        async with live_outcomes("outcomes", url):
            events = mixed_run(patients=6, results=80, seed=5)
            await publish(js, topology, events)
            await caught_up(engine, js, topology)
            live = await generation_rows(engine, 1)
            assert len(live["outcome_timeline"]) > 500

            # Interrupted after some background writes and before any checkpoint: the resumed
            # run starts over and writes those timeline rows a second time (a no-op).
            written = asyncio.Event()

            class StopsAfterTwoWrites(Rebuild):
                writes = 0

                async def _insert_timeline(self, run, rows):  # type: ignore[no-untyped-def]
                    await super()._insert_timeline(run, rows)
                    StopsAfterTwoWrites.writes += 1
                    if StopsAfterTwoWrites.writes == 2:
                        written.set()
                        await asyncio.Event().wait()

            first = StopsAfterTwoWrites(store, nats_client, default_streams(topology), flush_every=10**9,
                                        flush_seconds=3600, write_every=120, fetch_batch=37)
            task = asyncio.create_task(first.run())
            await asyncio.wait_for(written.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await generation_rows(engine, 2))["outcome_timeline"], "background writes reached the database"

            done = await Rebuild(store, nats_client, default_streams(topology), flush_every=10**9,
                                 flush_seconds=3600, write_every=120, fetch_batch=37).run()
            assert done.phase == "done" and done.generation == 2
            assert (await state(engine)).active_generation == 2
            assert await generation_rows(engine, 2) == live
    finally:
        await store.close()
        await drop_database(url)
