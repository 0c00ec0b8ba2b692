"""Locks and ``as_of`` on the in-memory store and projection (docs/time-travel.md): the lock
rules, the lock use case (a frozen generation a correction, a rebuild's cleanup and an erasure
treat as the law requires), the ``as_of`` filter and the replayed view, the ``as_of`` parser, and
export files stamped with the moment answered."""

from __future__ import annotations

import io
from datetime import UTC, date, datetime, timedelta
from functools import partial

import pandas as pd
import pytest
from fastapi import HTTPException

from contracts.enrollment import PatientDataErased
from services.outcomes import handlers, locks
from services.outcomes.cdisc.catalogue import DATASETS
from services.outcomes.cdisc.xpt import to_xpt
from services.outcomes.domain import PatientOutcome
from services.outcomes.handlers import ClaimRebuild, DropGenerationsBefore, LockAnalysis, ProjectBatch
from services.outcomes.incoming import Incoming
from services.outcomes.projection_memory import MemoryProjectionStore
from services.outcomes.projector import ProjectionChanges
from services.outcomes.queries import Freshness
from services.outcomes.reading import ReplayedView
from services.outcomes.time_travel import keep
from services.outcomes.viewpoint import parse_as_of
from shared.errors import Conflict
from shared.events import CommandContext, DomainEvent, Envelope
from shared.store import EventStore, open_store
from tests.outcomes.conftest import Feed
from tests.unit.outcomes.cdisc_study import study
from tests.unit.outcomes.outcome_events import SID, dose, egfr, enrolled
from tests.unit.outcomes.test_outcomes_handlers import KeyMirror

DAY1 = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
ANALYST = CommandContext(actor="analyst:0badc0de")
STREAMS = {source: stream for source, stream in Feed.STREAMS.items()}


class Log:
    """Messages as the source streams hold them, each recorded at a chosen time."""

    def __init__(self) -> None:
        self.sequences: dict[str, int] = {}
        self.items: list[Incoming] = []

    def add(self, source: str, event: DomainEvent, stream_id: str, version: int, recorded_at: datetime) -> Incoming:
        stream = STREAMS[source]
        sequence = self.sequences[stream] = self.sequences.get(stream, 0) + 1
        envelope = Envelope.wrap(event, stream_id=stream_id, stream_version=version, context=CommandContext(),
                                 recorded_at=recorded_at)
        item = Incoming.parse(stream, sequence, source, envelope.model_dump_json().encode())
        self.items.append(item)
        return item


def typo_then_correction() -> tuple[Log, list[Incoming], list[Incoming]]:
    """Day 1: a patient whose latest eGFR is a typo (3.8); day 2: its correction (38)."""
    log = Log()
    first = [
        log.add("enrollment", enrolled(), f"patient-{SID}", 1, DAY1),
        log.add("pulse", dose(date(2014, 3, 10)), f"pulse-{SID}", 1, DAY1),
        log.add("labs", egfr("R1", 27.0, "2014-03-02"), "labresult-R1", 2, DAY1),
        log.add("labs", egfr("R2", 3.8, "2016-03-02"), "labresult-R2", 2, DAY1),
    ]
    second = [log.add("labs", egfr("R2", 38.0, "2016-03-02", status="corrected"), "labresult-R2", 4, DAY2)]
    return log, first, second


async def project(store: EventStore, projection: MemoryProjectionStore, items: list[Incoming]) -> None:
    await store.transact(partial(handlers.project_batch, ProjectBatch(items), projection=projection))


async def lock(store: EventStore, projection: MemoryProjectionStore, name: str) -> locks.AnalysisLock:
    return await store.transact(partial(handlers.lock_analysis, LockAnalysis(name, ANALYST), projection=projection))


def post_egfr(projection: MemoryProjectionStore, generation: int) -> float | None:
    row = projection.committed.patients[generation][SID]
    return PatientOutcome.model_validate_json(row["outcome_json"]).post_egfr


# --- the rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["interim-2026", "DSMB_2027.1", "a", "9" * 64])
def test_names_of_letters_digits_dots_dashes_and_underscores_are_allowed(name: str) -> None:
    assert locks.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-interim", ".hidden", "interim 2026", "../etc", "x" * 65, "zwischenstand-ä",
                                  "a/b", "interim\n"])
def test_other_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(locks.LockNameInvalid, match="1 to 64 letters, digits"):
        locks.check_name(name)


def test_frozen_generations_count_down_from_minus_one() -> None:
    assert locks.frozen_generation([]) == -1
    assert locks.frozen_generation([-1, -3]) == -4
    assert not locks.is_frozen(1) and locks.is_frozen(-1)


# --- the lock use case ------------------------------------------------------------------------------


async def test_a_lock_freezes_the_served_rows_and_a_later_correction_leaves_them() -> None:
    store, projection = open_store("memory://"), MemoryProjectionStore()
    _, first, second = typo_then_correction()
    await project(store, projection, first)

    locked = await lock(store, projection, "interim-2026")
    assert (locked.name, locked.generation, locked.actor) == ("interim-2026", -1, ANALYST.actor)
    assert locked.positions == {STREAMS["enrollment"]: 1, STREAMS["pulse"]: 1, STREAMS["labs"]: 2}
    frozen = {table: rows[-1] for table, rows in zip(("patients", "timeline", "sources"),
                                                      projection.committed.generation_tables(), strict=True)}
    assert frozen["patients"] == projection.committed.patients[1]

    await project(store, projection, second)
    assert (post_egfr(projection, 1), post_egfr(projection, -1)) == (38.0, 3.8)
    assert projection.committed.patients[-1] == frozen["patients"]
    assert projection.committed.timeline[-1] == frozen["timeline"] and projection.committed.sources[-1] == frozen["sources"]

    [event] = await store.read_stream(locks.stream_id("interim-2026"))
    assert event.event_type == "AnalysisLocked" and event.actor == ANALYST.actor
    assert event.payload == {"name": "interim-2026", "generation": -1, "positions": locked.positions}


async def test_a_name_is_taken_once_and_each_lock_gets_its_own_generation() -> None:
    store, projection = open_store("memory://"), MemoryProjectionStore()
    await lock(store, projection, "interim-2026")
    with pytest.raises(Conflict, match="exists"):
        await lock(store, projection, "interim-2026")
    with pytest.raises(locks.LockNameInvalid):
        await lock(store, projection, "no spaces")
    assert (await lock(store, projection, "final")).generation == -2
    async with store.transaction() as uow:
        assert [lock.name for lock in await projection.locks(uow)] == ["interim-2026", "final"]


async def test_a_rebuild_neither_takes_nor_drops_a_frozen_generation() -> None:
    store, projection = open_store("memory://"), MemoryProjectionStore()
    _, first, _ = typo_then_correction()
    await project(store, projection, first)
    await lock(store, projection, "interim-2026")
    claimed = await store.transact(partial(
        handlers.claim_rebuild, ClaimRebuild("rebuilder", restart=True), projection=projection, clock=lambda: DAY2))
    assert claimed.lease.generation == 2
    await store.transact(partial(handlers.drop_generations_before, DropGenerationsBefore(3), projection=projection))
    assert post_egfr(projection, -1) == 3.8 and 1 not in projection.committed.patients


async def test_an_erasure_removes_the_patient_from_every_lock_too() -> None:
    store, projection = open_store("memory://", codec=KeyMirror()), MemoryProjectionStore()
    log, first, _ = typo_then_correction()
    await project(store, projection, first)
    await lock(store, projection, "interim-2026")
    await lock(store, projection, "final")
    erased = log.add("enrollment", PatientDataErased(subject_id=SID, erased_on=DAY2.date()), f"erasure-{SID}", 1, DAY2)
    await project(store, projection, [erased])
    for generation in (1, -1, -2):
        assert projection.committed.patients[generation] == {}
        assert projection.committed.timeline[generation] == {}


# --- as_of -----------------------------------------------------------------------------------------


def replayed(items: list[Incoming], as_of: datetime) -> ReplayedView:
    changes = ProjectionChanges({})
    for item in items:
        if keep(item, as_of):
            changes.add(item)
    return ReplayedView(changes, Freshness(0, [], as_of=as_of))


async def test_as_of_keeps_what_was_recorded_by_then_whatever_the_clinical_dates() -> None:
    log, first, second = typo_then_correction()
    assert [keep(item, DAY1) for item in log.items] == [True] * len(first) + [False] * len(second)
    assert all(keep(item, DAY2) for item in log.items)

    for as_of, expected in [(DAY1 - timedelta(seconds=1), None), (DAY1, 3.8), (DAY2 - timedelta(hours=1), 3.8),
                            (DAY2, 38.0)]:
        record = await replayed(log.items, as_of).patient(SID)
        assert (record.outcome.post_egfr if record else None) == expected, as_of


async def test_a_replayed_view_answers_from_the_rows_the_projection_would_hold() -> None:
    """Same events, same rows: the replay serialises its patients and timeline as the tables do."""
    log, _, _ = typo_then_correction()
    store, projection = open_store("memory://"), MemoryProjectionStore()
    await project(store, projection, log.items)
    view = replayed(log.items, DAY2)
    assert view.rows == projection.committed.patients[1]
    record = await view.patient(SID)
    assert record is not None
    assert [entry.kind for entry in record.timeline] == ["enrolled", "egfr", "pulse_dose", "egfr", "egfr"]
    assert [o.subject_id for o in await view.outcomes("A")] == [SID] and await view.outcomes("B") == []
    assert [f.subject_id for f in await view.facts("A")] == [SID]
    [enrolled_record] = await view.enrolled_records({"egfr"})
    assert [entry.detail["egfr"] for entry in enrolled_record.timeline] == [27.0, 3.8, 38.0]  # as recorded


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-06-30T23:59:59Z", datetime(2026, 6, 30, 23, 59, 59, tzinfo=UTC)),
    ("2026-07-01T01:59:59+02:00", datetime(2026, 6, 30, 23, 59, 59, tzinfo=UTC)),
    ("2026-06-30 23:59:59.5+00:00", datetime(2026, 6, 30, 23, 59, 59, 500000, tzinfo=UTC)),
])
def test_as_of_is_an_rfc_3339_time_read_in_utc(value: str, expected: datetime) -> None:
    parsed = parse_as_of(value)
    assert parsed == expected and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(("value", "reason"), [
    ("2026-06-30T23:59:59", "no offset"), ("2026-06-30", "no offset"), ("last tuesday", "not an RFC 3339"),
    ("2026-06-30T23:59:59 02:00", "%2B"), ("0001-01-01T00:00:00+14:00", "outside the years"),
])
def test_a_naive_or_unreadable_as_of_is_refused_with_the_reason(value: str, reason: str) -> None:
    with pytest.raises(HTTPException) as refused:
        parse_as_of(value)
    assert refused.value.status_code == 422 and reason in refused.value.detail


# --- exports of a past moment ---------------------------------------------------------------------


def test_a_transport_file_stamped_with_a_moment_is_the_same_bytes_and_still_reads() -> None:
    adtte = DATASETS["adam"]["adtte"](study())
    moment = datetime(2026, 6, 30, 23, 59, 59, tzinfo=UTC)
    once, again = to_xpt(adtte, moment), to_xpt(adtte, moment)
    assert once == again and once[:560].count(b"30JUN26:23:59:59") == 4
    frame = pd.read_sas(io.BytesIO(once), format="xport")
    assert list(frame.columns) == [v.name for v in adtte.variables] and len(frame) == len(adtte.rows)
