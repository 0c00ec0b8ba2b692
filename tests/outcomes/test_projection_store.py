"""One conformance case for the projection port: the same use cases, on the same messages, leave
the same state and the same rows in the SQL tables (SQLite, PostgreSQL) as in the in-memory
projection that the handler unit tests run on (tests/unit/outcomes/test_outcomes_handlers.py).
If the fake drifts from the tables, the handler tests would prove nothing: this fails instead."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

from contracts.enrollment import PatientDataErased
from services.outcomes import handlers, tables
from services.outcomes.domain import PatientOutcome
from services.outcomes.incoming import Incoming
from services.outcomes.projection_memory import MemoryProjectionStore
from services.outcomes.projection_sql import SqlProjectionStore, read_state
from services.outcomes.projection_store import ProjectionState, ProjectionStore
from services.outcomes.projector import ProjectedPatient, ProjectionChanges
from services.outcomes.timeline import timeline_row
from shared.events import CommandContext
from shared.store import EventStore, SqlEventStore, open_store
from tests.outcomes.conftest import Feed
from tests.outcomes.rows import generation_rows
from tests.unit.outcomes.outcome_events import SID, adverse_event, dialysis, dose, egfr, enrolled, infused, upcr

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
OTHER = "IGA-C-902"
Rows = dict[str, list[tuple[Any, ...]]]


def messages() -> dict[str, list[Incoming]]:
    feed = Feed()

    def parsed(source: str, *events: Any) -> list[Incoming]:
        return [Incoming.parse(m.stream, m.stream_sequence, source, m.data) for m in feed.messages(source, *events)]

    def lab(event: Any, version: int) -> Incoming:
        m = feed.message("labs", feed.envelope(event, f"labresult-{event.result_id}", version))
        return Incoming.parse(m.stream, m.stream_sequence, "labs", m.data)

    def patient(event: Any, version: int) -> Incoming:
        m = feed.message("enrollment", feed.envelope(event, f"patient-{event.subject_id}", version))
        return Incoming.parse(m.stream, m.stream_sequence, "enrollment", m.data)

    report, follow_up = (adverse_event("AE-1", "insomnia", date(2014, 3, 12), grade=grade, related_to=("mp_pulse",),
                                       causality="possible", follow_up=grade > 1) for grade in (1, 2))
    return {
        "enrollment": parsed("enrollment", enrolled(), enrolled(sid=OTHER, group="control"), enrolled(sid="IGA-B-903"),
                             dialysis(date(2019, 1, 1), sid=OTHER),
                             PatientDataErased(subject_id="IGA-B-903", erased_on=date(2025, 1, 1)))
        + [patient(follow_up, 3), patient(report, 2)],  # a follow-up overtaking the first report
        "pulse": parsed("pulse", dose(date(2014, 3, 10), 1, 1), dose(date(2014, 3, 11), 1, 2),
                        dose(date(2014, 3, 10), sid="IGA-B-903")),
        "cells": parsed("cells", infused("LOT-1", date(2014, 5, 1))),
        "labs": [lab(egfr("R1", 29.0, "2014-03-02", status="corrected"), 4), lab(egfr("R1", 27.0, "2014-03-02"), 2),
                 lab(egfr("R2", 31.0, "2016-03-02"), 2), lab(egfr("R3", 20.0, "2018-01-01", sid=OTHER), 2),
                 lab(upcr("U1", 0.8, "2016-03-02", status="corrected"), 4), lab(upcr("U1", 8.0, "2016-03-02"), 2)],
    }


async def scenario(store: EventStore, projection: ProjectionStore, run: dict[str, list[Incoming]]) -> None:
    """Live batches; two analysis locks (the first holding a patient erased later); rows of an
    abandoned generation; a rebuild interrupted after a checkpoint and a timeline write, resumed,
    caught up at its swap; older generations dropped."""

    async def live(items: list[Incoming], unreadable: list[tuple[str, int]] | None = None) -> None:
        await store.transact(partial(handlers.project_batch, handlers.ProjectBatch(items, unreadable or []),
                                     projection=projection))

    async def lock(name: str) -> None:
        await store.transact(partial(handlers.lock_analysis, handlers.LockAnalysis(name, CommandContext(actor="analyst:1")),
                                     projection=projection))

    await live(run["pulse"][1:])
    await lock("interim")
    await live(run["enrollment"], [(Feed.STREAMS["cells"], 9)])
    await live(run["labs"][:2])
    await lock("final")
    await live(run["pulse"][:1])  # below the mark, as a redelivery
    await live(run["labs"][2:] + run["cells"])
    async with store.transaction() as uow:  # what an abandoned rebuild left in generation 4
        await projection.write_timeline(uow, 4, [row for i in run["pulse"] if (row := timeline_row(i.envelope, i.event, i.source))])

    first = await store.transact(partial(handlers.claim_rebuild, handlers.ClaimRebuild("first"),
                                         projection=projection, clock=at(NOW)))
    changes = ProjectionChanges({})
    for item in run["enrollment"] + run["pulse"]:
        changes.add(item)
    await store.transact(partial(handlers.checkpoint, handlers.Checkpoint(first.lease, changes),
                                 projection=projection, clock=at(NOW + timedelta(seconds=1))))
    changes.clear()
    for item in run["labs"][:2]:
        changes.add(item)
    await store.transact(partial(handlers.write_timeline, handlers.WriteTimeline(first.lease, changes.take_timeline()),
                                 projection=projection, clock=at(NOW + timedelta(seconds=2))))
    await store.transact(partial(handlers.release_lease, handlers.ReleaseLease("first"), projection=projection))

    second = await store.transact(partial(handlers.claim_rebuild, handlers.ClaimRebuild("second"),
                                          projection=projection, clock=at(NOW + timedelta(seconds=3))))
    patients: dict[str, ProjectedPatient] = {}  # read back a page of one at a time
    while page := await store.transact(partial(
        handlers.read_rebuilt_patients, handlers.ReadRebuiltPatients(second.lease, max(patients, default=""), 1),
        projection=projection,
    )):
        patients.update(page)
    assert len(patients) > 1
    resumed = ProjectionChanges(patients)
    resumed.marks.update(second.marks)
    for item in run["labs"]:
        resumed.add(item)

    async def catch_up() -> None:
        for item in run["cells"]:
            resumed.add(item)
        resumed.skip(Feed.STREAMS["cells"], 9)  # the erased patient's payload the live batch skipped

    await store.transact(partial(handlers.swap_in, handlers.SwapIn(second.lease, resumed), projection=projection,
                                 catch_up=catch_up, clock=at(NOW + timedelta(seconds=4))))


def at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def memory_rows(projection: MemoryProjectionStore, generation: int) -> Rows:
    """The memory tables as tests/outcomes/rows.py reads the SQL ones."""
    committed = projection.committed
    held = {tables.patients: committed.patients, tables.timeline: committed.timeline, tables.sources: committed.sources}
    found: Rows = {}
    for table, rows in held.items():
        columns = [c.name for c in table.c if c.name != "generation"]
        by_key = rows.get(generation, {})
        if table is tables.sources:
            by_key = {s: {"source": s, "last_sequence": m.last_sequence,
                          "last_event_recorded_at": m.last_event_recorded_at} for s, m in by_key.items()}
        found[table.name] = [tuple(by_key[key][c] for c in columns) for key in sorted(by_key)]
    return found


def aware(rows: Rows) -> Rows:
    """SQLite hands times back naive (all are UTC)."""
    return {name: [tuple(v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v for v in row)
                   for row in table] for name, table in rows.items()}


async def test_the_sql_tables_hold_what_the_memory_projection_holds(outcomes_store: EventStore) -> None:
    assert isinstance(outcomes_store, SqlEventStore)
    run = messages()
    memory, memory_store = MemoryProjectionStore(), open_store("memory://")
    await scenario(memory_store, memory, run)
    await scenario(outcomes_store, SqlProjectionStore(), run)

    async with outcomes_store.engine.connect() as connection:
        state = await read_state(connection)
    assert state == memory.committed.state == ProjectionState(5, swapped_at=NOW + timedelta(seconds=4))
    for generation in (1, 4, 5, -1, -2):
        expected = memory_rows(memory, generation)
        assert aware(await generation_rows(outcomes_store.engine, generation)) == expected
    assert set(memory.committed.patients[-1]) == {SID}  # IGA-B-903's dose was frozen, then the erasure took it
    assert [len(rows) for rows in memory_rows(memory, -2).values()] == [2, 8, 4]
    async with outcomes_store.transaction() as uow, memory_store.transaction() as memory_uow:
        sql_locks, memory_locks = await SqlProjectionStore().locks(uow), await memory.locks(memory_uow)
    assert [(k.name, k.generation, k.actor, k.positions) for k in sql_locks] == [
        (k.name, k.generation, k.actor, k.positions) for k in memory_locks] == [
        ("interim", -1, "analyst:1", {Feed.STREAMS["pulse"]: 3}),
        ("final", -2, "analyst:1", {Feed.STREAMS["pulse"]: 3, Feed.STREAMS["enrollment"]: 7,
                                    Feed.STREAMS["cells"]: 9, Feed.STREAMS["labs"]: 2})]
    frozen = {generation: memory_rows(memory, generation) for generation in (-1, -2)}
    live, rebuilt = memory_rows(memory, 1), memory_rows(memory, 5)
    assert live == rebuilt and [len(rows) for rows in live.values()] == [2, 14, 4]
    patient = memory.committed.patients[5][SID]
    assert json.loads(patient["report_versions_json"]) == {"adverse_event": {"AE-1": 3}, "urine": {"U1": 4}}
    values = PatientOutcome.model_validate_json(patient["outcome_json"])
    assert (values.highest_ae_grade, values.post_upcr) == (2, 0.8)  # the newest versions, whatever the order

    for store, projection in ((memory_store, memory), (outcomes_store, SqlProjectionStore())):
        await store.transact(partial(handlers.drop_generations_before, handlers.DropGenerationsBefore(5),
                                     projection=projection))
    assert aware(await generation_rows(outcomes_store.engine, 5)) == memory_rows(memory, 5) == rebuilt
    assert await generation_rows(outcomes_store.engine, 1) == memory_rows(memory, 1) == {t: [] for t in live}
    for generation, rows in frozen.items():  # a rebuild's cleanup leaves the locks
        assert aware(await generation_rows(outcomes_store.engine, generation)) == memory_rows(memory, generation) == rows
