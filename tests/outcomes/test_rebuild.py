"""Rebuild == live, on the real NATS JetStream and both database backends.

A long mixed run is published to the service streams. Two outcomes projections consume it
live: a reference that is never rebuilt, and one that is rebuilt (blue/green) while half of
the run is still being published and while it keeps answering queries. At the end the rebuilt
projection's active rows equal the reference's row for row — facts, outcomes, timeline and
per-source checkpoints — and a second, quiet rebuild reproduces its own live rows exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import nats
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.enrollment import PatientDataErased
from services.outcomes import projections
from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.queries import OutcomesQueries
from services.outcomes.rebuild import job
from services.outcomes.rebuild.job import Rebuild, RebuildProgress
from services.outcomes.rebuild.lease import RebuildBusy
from services.outcomes.rebuild.wiring import default_streams
from services.outcomes.settings import OutcomesSettings
from shared.broker import Topology
from shared.database import migrate
from shared.events import CommandContext, Envelope
from shared.service import Service
from shared.store import SqlEventStore, open_store
from tests.conftest import NATS_URL, drop_database, new_database_url
from tests.outcomes.mixed_run import Published, mixed_run, publish
from tests.outcomes.rows import generation_rows, state

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def broker_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", NATS_URL)


@contextlib.asynccontextmanager
async def live_outcomes(name: str, url: str) -> AsyncIterator[Service]:
    service = Service(name, database=url)
    projections.register(service, SqlProjectionStore(), OutcomesSettings())
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def caught_up(engine: AsyncEngine, js: nats.js.JetStreamContext, topology: Topology, timeout: float = 40) -> None:
    """Wait until the active generation's checkpoints reach every stream's head."""
    queries = OutcomesQueries(engine, default_streams(topology))
    deadline = time.monotonic() + timeout
    while True:
        heads = {s: (await js.stream_info(s)).state.last_seq for s in queries.streams.values()}
        async with queries.snapshot() as connection:
            marks = {s.stream: s.last_sequence for s in (await queries.freshness(connection)).sources}
        if marks == heads:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"projection stuck at {marks}, streams at {heads}")
        await asyncio.sleep(0.1)


def sql_store(url: str) -> SqlEventStore:
    store = open_store(url)
    assert isinstance(store, SqlEventStore)
    return store


async def active_rows(engine: AsyncEngine) -> dict[str, list[tuple]]:
    return await generation_rows(engine, (await state(engine)).active_generation)


async def test_rebuild_while_publishing_and_serving_equals_the_live_projection(
    backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology
) -> None:
    urls = [new_database_url(backend, tmp_path, "outcomes") for _ in range(2)]
    for url in urls:
        await asyncio.to_thread(migrate, "outcomes", url)
    reference_url, rebuilt_url = urls
    js = nats_client.jetstream()
    run = mixed_run(patients=9, results=120)
    before, during, after = run[: len(run) // 2], run[len(run) // 2 : 3 * len(run) // 4], run[3 * len(run) // 4 :]
    store, reference_store = sql_store(rebuilt_url), sql_store(reference_url)
    engine, reference_engine = store.engine, reference_store.engine
    try:
        async with live_outcomes("outcomes-reference", reference_url), live_outcomes("outcomes", rebuilt_url):
            await publish(js, topology, before)
            await caught_up(engine, js, topology)
            queries = OutcomesQueries(engine, default_streams(topology))
            phases: list[str] = []
            applied_by_phase: dict[str, int] = {}
            replaying = asyncio.Event()

            def track(progress: RebuildProgress) -> None:
                phases.append(progress.phase)
                applied_by_phase[progress.phase] = progress.applied
                if progress.phase == "replaying":
                    replaying.set()

            async def publish_during_rebuild() -> None:
                await replaying.wait()
                await publish(js, topology, during, pause=0.01)

            resume = asyncio.Event()
            lab_results_held: list[int] = []

            class HeldAfterItsFirstCheckpoint(Rebuild):
                """Replaying this small log takes a few tenths of a second: without the hold,
                the rebuild may be over before the live generation answered or anything new was
                published during it, and the test would prove neither. Before each checkpoint it
                counts the lab results its patients hold in memory: it moves them to disk after
                every fetch (``spill_every=1``)."""

                async def _flush(self, run):  # type: ignore[no-untyped-def]
                    lab_results_held.append(sum(
                        len(p.recorder.egfr) + len(p.recorder.urine) + len(p.egfr_versions)
                        for p in run.changes.patients.values()
                    ))
                    await super()._flush(run)
                    await resume.wait()

            job = HeldAfterItsFirstCheckpoint(
                store, nats_client, queries.streams, on_progress=track, flush_every=300, fetch_batch=100,
                spill_every=1,
            )
            rebuilding = asyncio.create_task(job.run())
            publishing = asyncio.create_task(publish_during_rebuild())
            answered_during_rebuild = 0
            while not rebuilding.done():
                async with queries.snapshot() as connection:
                    outcomes = await queries.outcomes(connection)
                assert len(outcomes) == 9  # the live generation keeps serving every patient
                if phases and phases[-1] in ("replaying", "catching up"):
                    answered_during_rebuild += 1
                if answered_during_rebuild and publishing.done():
                    resume.set()  # what was published meanwhile is left for "catching up"
                await asyncio.sleep(0.02)
            final = await rebuilding
            await publishing
            assert final.phase == "done" and final.generation == 2
            assert answered_during_rebuild > 0
            assert len(lab_results_held) >= 2 and set(lab_results_held) == {0}
            assert applied_by_phase["catching up"] > applied_by_phase["replaying"]  # published meanwhile
            assert (await state(engine)).active_generation == 2
            await publish(js, topology, after)  # the live projection goes on, into the new generation
            await caught_up(engine, js, topology)
            await caught_up(reference_engine, js, topology)
            reference = await generation_rows(reference_engine, 1)
            assert sum(len(rows) for rows in reference.values()) > 1500
            kinds = {row[4] for row in reference["outcome_timeline"]}
            assert {"urine_result", "adverse_event", "adverse_event_follow_up", "biopsy"} <= kinds  # v2 facts too
            assert await active_rows(engine) == reference
            assert await generation_rows(engine, 1) == {table: [] for table in reference}  # old generation dropped

        # Quiet now: a rebuild of the reference reproduces its live rows exactly.
        await Rebuild(reference_store, nats_client, default_streams(topology)).run()
        assert (await state(reference_engine)).active_generation == 2
        assert await generation_rows(reference_engine, 2) == reference
    finally:
        await store.close()
        await reference_store.close()
        for url in urls:
            await drop_database(url)


async def test_an_interrupted_rebuild_resumes_and_a_second_one_is_refused(
    backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job, "RESUME_PAGE", 1)  # the resumed one reads its patients back one page per patient
    url = new_database_url(backend, tmp_path, "outcomes")
    await asyncio.to_thread(migrate, "outcomes", url)
    js = nats_client.jetstream()
    store = sql_store(url)
    engine = store.engine
    try:
        async with live_outcomes("outcomes", url):
            events = mixed_run(patients=4, results=60, seed=3)
            await publish(js, topology, events)
            await caught_up(engine, js, topology)
            live = await generation_rows(engine, 1)

            flushed = asyncio.Event()

            class StopsAfterItsFirstFlush(Rebuild):
                async def _flush(self, run):  # type: ignore[no-untyped-def]
                    await super()._flush(run)
                    flushed.set()
                    await asyncio.Event().wait()  # until Ctrl-C

            first = StopsAfterItsFirstFlush(store, nats_client, default_streams(topology), flush_every=200,
                                            fetch_batch=100)
            task = asyncio.create_task(first.run())
            await flushed.wait()
            with pytest.raises(RebuildBusy):  # the first one holds the lease
                await Rebuild(store, nats_client, default_streams(topology)).run()
            task.cancel()  # Ctrl-C
            with pytest.raises(asyncio.CancelledError):
                await task
            interrupted = await state(engine)
            assert (interrupted.active_generation, interrupted.rebuilding_generation) == (1, 2)
            assert interrupted.rebuild_owner is None  # the lease was given back
            assert (await generation_rows(engine, 2))["outcome_sources"]  # flushed checkpoints to resume from

            resumed = await Rebuild(store, nats_client, default_streams(topology)).run()
            assert resumed.resumed and resumed.generation == 2 and resumed.phase == "done"
            assert resumed.applied < len(events)  # it did not start over
            assert await generation_rows(engine, 2) == live
    finally:
        await store.close()
        await drop_database(url)


async def test_a_patient_erased_during_a_rebuild_leaves_nothing_in_its_scratch_file(
    backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology
) -> None:
    """The rebuild keeps lab results in a scratch file between checkpoints; an erasure published
    while it runs (read when it catches up) must delete the patient's from it, as from the rows."""
    url = new_database_url(backend, tmp_path, "outcomes")
    await asyncio.to_thread(migrate, "outcomes", url)
    js = nats_client.jetstream()
    store = sql_store(url)
    try:
        async with live_outcomes("outcomes", url):
            events = mixed_run(patients=3, results=40, seed=5)
            erased = next(e.envelope.payload["subject_id"] for e in events if e.envelope.event_type == "PatientEnrolled")
            await publish(js, topology, events)
            await caught_up(store.engine, js, topology)
            in_file: list[int] = []
            replayed, erasure_published = asyncio.Event(), asyncio.Event()

            class ErasedWhileItRuns(Rebuild):
                async def _flush(self, run):  # type: ignore[no-untyped-def]
                    in_file.append(run.spill._db.execute(
                        "SELECT count(*) FROM segments WHERE subject_id = ?", (erased,)).fetchone()[0])
                    if not replayed.is_set():
                        replayed.set()
                        await erasure_published.wait()
                    await super()._flush(run)

            rebuilding = asyncio.create_task(
                ErasedWhileItRuns(store, nats_client, default_streams(topology), spill_every=1).run())
            await replayed.wait()
            erasure = PatientDataErased(subject_id=erased, erased_on=date(2026, 12, 6))
            await publish(js, topology, [Published("enrollment", Envelope.wrap(
                erasure, stream_id=f"erasure-{erased}", stream_version=1, context=CommandContext()))])
            erasure_published.set()
            assert (await rebuilding).phase == "done"
            assert in_file[0] > 0 and in_file[1:] and set(in_file[1:]) == {0}
            assert erased not in repr(await generation_rows(store.engine, 2))
    finally:
        await store.close()
        await drop_database(url)
