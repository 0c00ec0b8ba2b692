"""The outcomes use cases (services/outcomes/handlers.py) on the in-memory event store and the
in-memory projection: projecting a batch, and each step of a rebuild with its lease — in
milliseconds, without a database or a broker. (The outcomes service appends no event, so no
use case of it can meet an optimistic-concurrency conflict.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from contracts.enrollment import PatientDataErased
from services.outcomes import handlers
from services.outcomes.domain import PatientOutcome
from services.outcomes.handlers import (
    Checkpoint,
    ClaimRebuild,
    DropGenerationsBefore,
    ProjectBatch,
    ReadRebuiltPatients,
    ReleaseLease,
    SwapIn,
    WritePatients,
    WriteTimeline,
)
from services.outcomes.incoming import Incoming
from services.outcomes.projection_memory import MemoryProjectionStore
from services.outcomes.projector import ProjectedPatient, ProjectionChanges
from services.outcomes.rebuild.lease import LEASE_SECONDS, Lease, RebuildBusy, RebuildError
from services.outcomes.settings import OutcomesSettings
from services.outcomes.timeline import timeline_row
from shared.events import DomainEvent
from shared.store import EventStore, JsonCodec, open_store
from tests.outcomes.conftest import Feed
from tests.unit.outcomes.outcome_events import (
    SID,
    adverse_event,
    biopsy,
    dialysis,
    dose,
    egfr,
    enrolled,
    infused,
    upcr,
)

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
PULSE, LABS = Feed.STREAMS["pulse"], Feed.STREAMS["labs"]


@pytest.fixture
def store() -> EventStore:
    return open_store("memory://")


@pytest.fixture
def projection() -> MemoryProjectionStore:
    return MemoryProjectionStore()


@pytest.fixture
def feed() -> Feed:
    return Feed()


def parsed(feed: Feed, source: str, *events: DomainEvent) -> list[Incoming]:
    return [Incoming.parse(m.stream, m.stream_sequence, source, m.data) for m in feed.messages(source, *events)]


def lab(feed: Feed, event: Any, version: int) -> Incoming:
    m = feed.message("labs", feed.envelope(event, f"labresult-{event.result_id}", version))
    return Incoming.parse(m.stream, m.stream_sequence, "labs", m.data)


async def project(
    store: EventStore, projection: MemoryProjectionStore, items: Sequence[Incoming],
    unreadable: Sequence[tuple[str, int]] = (),
) -> ProjectionChanges:
    return await store.transact(
        partial(handlers.project_batch, ProjectBatch(items, unreadable), projection=projection)
    )


def outcome(projection: MemoryProjectionStore, subject_id: str = SID, generation: int = 1) -> PatientOutcome | None:
    value = projection.committed.patients[generation][subject_id]["outcome_json"]
    return PatientOutcome.model_validate_json(value) if value else None


def kinds(projection: MemoryProjectionStore, subject_id: str = SID, generation: int = 1) -> list[str]:
    rows = sorted(projection.committed.timeline.get(generation, {}).values(),
                  key=lambda row: (row["occurred_on"], row["recorded_at"]))
    return [row["kind"] for row in rows if row["subject_id"] == subject_id]


def marks(projection: MemoryProjectionStore, generation: int = 1) -> dict[str, int]:
    return {stream: mark.last_sequence for stream, mark in projection.committed.sources.get(generation, {}).items()}


# --- projecting a batch --------------------------------------------------------------------------


async def test_batches_from_every_source_give_the_patients_values_timeline_and_marks(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    start = date(2014, 3, 10)
    await project(store, projection, parsed(feed, "enrollment", enrolled(enrolled_on=date(2014, 3, 2))))
    await project(store, projection, parsed(feed, "pulse", dose(start, 1, 1), dose(date(2014, 3, 11), 1, 2)))
    await project(store, projection, parsed(feed, "cells", infused("LOT-1", date(2014, 5, 1))))
    await project(store, projection, [lab(feed, egfr("R1", 27.0, "2014-03-02"), 2),
                                      lab(feed, egfr("R2", 38.0, "2019-03-10"), 2)])
    changes = await project(store, projection, parsed(feed, "enrollment", dialysis(date(2020, 1, 1))))

    values = outcome(projection)
    assert values is not None
    assert (values.treatment_start, values.baseline_egfr, values.post_egfr) == (start, 27.0, 38.0)
    assert (values.pulse_cycles, values.infusions, values.kidney_failure) == (1, 1, True)
    assert kinds(projection) == ["enrolled", "egfr", "pulse_dose", "pulse_dose", "infusion", "egfr",
                                 "dialysis_started"]
    assert marks(projection) == {Feed.STREAMS["enrollment"]: 2, PULSE: 2, Feed.STREAMS["cells"]: 1, LABS: 2}
    assert changes.touched == {SID}  # the handler's answer: what the batch changed


async def test_facts_before_the_enrollment_are_kept_without_values(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    await project(store, projection, [lab(feed, egfr("R1", 30.0, "2014-01-01"), 2)])
    assert outcome(projection) is None and kinds(projection) == ["egfr"]
    await project(store, projection, parsed(feed, "enrollment", enrolled(group="control", baseline=33.0)))
    values = outcome(projection)
    assert values is not None and values.baseline_egfr == 30.0


async def test_an_older_egfr_version_arriving_later_is_ignored(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    await project(store, projection, parsed(feed, "enrollment", enrolled(group="control")))
    await project(store, projection, [lab(feed, egfr("R9", 40.0, "2016-01-01", status="corrected"), 4)])
    await project(store, projection, [lab(feed, egfr("R9", 4.4, "2016-01-01"), 2)])
    values = outcome(projection)
    assert values is not None and values.post_egfr == 40.0
    assert kinds(projection).count("egfr") == 2  # both versions stay on the timeline


async def test_a_stream_mark_never_moves_back(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    late, early = parsed(feed, "pulse", dose(date(2014, 3, 10), 1, 1), dose(date(2014, 3, 11), 1, 2))
    await project(store, projection, [early])
    await project(store, projection, [late])  # sequence 1, redelivered after sequence 2
    assert marks(projection) == {PULSE: 2}


async def test_payloads_of_erased_patients_only_move_the_mark(
    store: EventStore, projection: MemoryProjectionStore
) -> None:
    changes = await project(store, projection, [], unreadable=[(PULSE, 7)])
    assert marks(projection) == {PULSE: 7} and changes.applied == 1
    assert projection.committed.patients.get(1, {}) == {} and projection.committed.timeline.get(1, {}) == {}


class KeyMirror(JsonCodec):
    """What the sealing codec does with erasures, without keys: a forgotten subject is erased."""

    def __init__(self, *erased: str) -> None:
        self.erased = set(erased)

    def is_erased(self, subject_id: str) -> bool:
        return subject_id in self.erased

    def mark_erased(self, subject_id: str) -> None:
        self.erased.add(subject_id)


async def test_an_erasure_deletes_the_patient_remembers_it_and_ignores_what_follows(
    projection: MemoryProjectionStore, feed: Feed
) -> None:
    other = "IGA-B-901"
    codec = KeyMirror()
    store = open_store("memory://", codec=codec)
    await project(store, projection, parsed(feed, "enrollment", enrolled(), enrolled(sid=other, group="B")))
    await project(store, projection, parsed(feed, "pulse", dose(date(2014, 3, 10)), dose(date(2014, 3, 10), sid=other)))
    await project(store, projection, parsed(feed, "enrollment", PatientDataErased(subject_id=SID, erased_on=NOW.date())))
    assert codec.erased == {SID}  # the key forgotten in this process
    await project(store, projection, parsed(feed, "pulse", dose(date(2014, 3, 11), 1, 2)))  # a late one

    assert set(projection.committed.patients[1]) == {other}
    assert {row["subject_id"] for row in projection.committed.timeline[1].values()} == {other}
    assert marks(projection) == {Feed.STREAMS["enrollment"]: 3, PULSE: 3}
    async with store.transaction() as uow:
        assert await uow.erased.all() == [SID]


async def test_a_subject_the_key_vault_knows_as_erased_is_not_projected(feed: Feed) -> None:
    """A batch that opened an event a moment before its key was deleted, and commits after the
    erasure's batch: the codec's mirror says erased, and nothing of theirs is written."""

    store, projection = open_store("memory://", codec=KeyMirror(SID)), MemoryProjectionStore()
    await project(store, projection, parsed(feed, "enrollment", enrolled()))
    assert projection.committed.patients[1] == {} and projection.committed.timeline.get(1, {}) == {}
    assert marks(projection) == {Feed.STREAMS["enrollment"]: 1}
    async with store.transaction() as uow:
        assert await uow.erased.all() == [SID]


async def test_a_batch_that_fails_before_its_commit_leaves_nothing(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    await project(store, projection, parsed(feed, "enrollment", enrolled()))
    before = projection.committed

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        async with store.transaction() as uow:
            await handlers.project_batch(
                ProjectBatch(parsed(feed, "pulse", dose(date(2014, 3, 10)))), uow, projection=projection
            )
            raise Crash  # the process dies after the handler, before the commit
    assert projection.committed is before
    assert marks(projection) == {Feed.STREAMS["enrollment"]: 1} and kinds(projection) == ["enrolled"]


# --- the v2 facts: adverse events, urine results, biopsies ---------------------------------------


def patient_stream(feed: Feed, event: Any, version: int) -> Incoming:
    """An enrollment event on the patient's own stream (where adverse-event reports are), at a version."""
    m = feed.message("enrollment", feed.envelope(event, f"patient-{event.subject_id}", version))
    return Incoming.parse(m.stream, m.stream_sequence, "enrollment", m.data)


async def test_an_adverse_event_is_its_latest_report_and_an_older_one_arriving_later_is_ignored(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    await project(store, projection, [patient_stream(feed, enrolled(), 1)])
    first = adverse_event("AE-1", "hyperglycaemia", date(2014, 3, 11), grade=1)
    follow_up = adverse_event("AE-1", "hyperglycaemia", date(2014, 3, 11), grade=3, serious=True,
                              related_to=("mp_pulse",), causality="probable", follow_up=True)
    reported = patient_stream(feed, first, 2)
    await project(store, projection, [reported, patient_stream(feed, follow_up, 3)])
    await project(store, projection, [reported])  # redelivered after the follow-up
    await project(store, projection, [patient_stream(feed, adverse_event("AE-2", "insomnia", date(2014, 3, 12),
                                                                         related_to=("mp_pulse",),
                                                                         causality="possible"), 4)])

    values = outcome(projection)
    assert values is not None
    assert (values.adverse_events, values.highest_ae_grade) == (2, 3)
    assert values.any_serious_ae and values.any_significant_related_ae  # the follow-up's grade 3, probable
    assert kinds(projection) == ["enrolled", "adverse_event", "adverse_event_follow_up", "adverse_event"]


async def test_urine_results_give_baseline_and_post_upcr_with_corrections_and_preliminaries(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    await project(store, projection, parsed(feed, "enrollment", enrolled()))
    await project(store, projection, parsed(feed, "pulse", dose(date(2014, 3, 10))))
    await project(store, projection, [
        lab(feed, upcr("U1", 2.4, "2014-03-01"), 2),
        lab(feed, upcr("U2", 0.9, "2015-03-01", status="corrected"), 4),
        lab(feed, upcr("U2", 9.0, "2015-03-01"), 2),  # the typo's version, after its correction: ignored
        lab(feed, upcr("U3", 0.1, "2015-06-01", status="preliminary"), 2),  # kept, never counted
    ])

    values = outcome(projection)
    assert values is not None
    assert (values.baseline_upcr, values.post_upcr) == (2.4, 0.9)
    assert values.upcr_change_pct == (0.9 - 2.4) / 2.4 * 100
    assert (values.complete_remission, values.partial_remission) == (False, True)  # 0.9 < 1.0 and ≤ 1.2
    assert kinds(projection).count("urine_result") == 4


async def test_paired_biopsies_and_a_confirmed_decline_reach_the_patients_values(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    start = date(2014, 3, 10)
    await project(store, projection, parsed(feed, "enrollment", enrolled(baseline=30.0),
                                            biopsy(date(2014, 2, 1), deposits=True, iga="2+", proliferation=True,
                                                   lee="IV"),
                                            biopsy(date(2016, 2, 1), deposits=False, iga="negative",
                                                   proliferation=True, lee="II")))
    await project(store, projection, parsed(feed, "pulse", dose(start)))
    await project(store, projection, [lab(feed, egfr("R1", 18.0, "2015-01-01"), 2),   # ≤ 60 % of 30
                                      lab(feed, egfr("R2", 25.0, "2015-01-20"), 2),   # < 28 days: neither
                                      lab(feed, egfr("R3", 17.0, "2015-01-29"), 2)])  # 28 days: confirms

    values = outcome(projection)
    assert values is not None and values.paired_biopsies
    changes = (values.deposits_cleared, values.iga_cleared, values.proliferation_resolved,
               values.foot_process_improved, values.lee_grade_improved)
    assert changes == (True, True, False, False, True)
    assert (values.decline_40_on, values.decline_57_on) == (date(2015, 1, 1), None)
    days = (date(2015, 1, 1) - start).days
    assert (values.composite_endpoint, values.composite_endpoint_days) == ("decline_40", days)
    assert values.composite_endpoint_years == days / 365.25
    assert (values.kidney_failure_competing, values.kidney_failure_competing_days) == (None, (date(2015, 1, 29) - start).days)


async def test_an_erasure_deletes_the_adverse_events_and_urine_results_with_the_patient(
    projection: MemoryProjectionStore, feed: Feed
) -> None:
    store = open_store("memory://", codec=KeyMirror())
    await project(store, projection, [patient_stream(feed, enrolled(), 1),
                                      patient_stream(feed, adverse_event("AE-1", "flushing", date(2014, 3, 11)), 2)])
    await project(store, projection, [lab(feed, upcr("U1", 1.0, "2014-03-01"), 2)])
    await project(store, projection, parsed(feed, "enrollment", PatientDataErased(subject_id=SID, erased_on=NOW.date())))
    await project(store, projection, [lab(feed, upcr("U2", 0.5, "2015-03-01"), 2)])  # a late one
    assert projection.committed.patients[1] == {} and projection.committed.timeline[1] == {}


# --- the rebuild's steps -------------------------------------------------------------------------


def at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


async def run(store: EventStore, handler: Callable[..., Any], command: Any, **needs: Any) -> Any:
    return await store.transact(partial(handler, command, **needs))


async def claim(store: EventStore, projection: MemoryProjectionStore, owner: str, *, now: datetime = NOW,
                restart: bool = False) -> handlers.Claimed:
    return await run(store, handlers.claim_rebuild, ClaimRebuild(owner, restart), projection=projection, clock=at(now))


async def test_a_new_rebuild_takes_the_lease_and_a_generation_above_any_there_is(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    await project(store, projection, parsed(feed, "enrollment", enrolled()))
    async with store.transaction() as uow:  # rows of a rebuild abandoned long ago, in generation 3
        await projection.write_timeline(uow, 3, [row for i in parsed(feed, "pulse", dose(date(2014, 3, 10)))
                                                 if (row := timeline_row(i.envelope, i.event, i.source))])

    claimed = await claim(store, projection, "me")
    assert (claimed.lease, claimed.resumed, claimed.marks) == (Lease("me", 4), False, {})
    state = projection.committed.state
    assert (state.active_generation, state.rebuilding_generation, state.rebuild_owner) == (1, 4, "me")
    assert state.rebuild_started_at == state.rebuild_heartbeat_at == NOW
    assert set(projection.committed.patients) == {1}  # the stale generation is gone, the served one kept


async def test_a_live_lease_refuses_a_second_rebuild_until_its_heartbeat_is_stale(
    store: EventStore, projection: MemoryProjectionStore
) -> None:
    first = await claim(store, projection, "first")
    almost = NOW + timedelta(seconds=LEASE_SECONDS - 1)
    with pytest.raises(RebuildBusy, match="generation 2 is running"):
        await claim(store, projection, "second", now=almost)
    with pytest.raises(RebuildBusy):
        await store.transact(partial(handlers.refuse_while_rebuilding, projection=projection, clock=at(almost)))
    assert projection.committed.state.rebuild_owner == "first"

    later = NOW + timedelta(seconds=LEASE_SECONDS)
    await store.transact(partial(handlers.refuse_while_rebuilding, projection=projection, clock=at(later)))
    second = await claim(store, projection, "second", now=later)  # the first one died: taken over
    assert second.lease == Lease("second", first.lease.generation) and second.resumed
    with pytest.raises(RebuildError, match="taken over or restarted"):
        await run(store, handlers.write_timeline, WriteTimeline(first.lease, []), projection=projection, clock=at(later))


async def test_a_checkpoint_writes_and_renews_the_lease_and_a_resumed_rebuild_starts_from_it(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    claimed = await claim(store, projection, "me")
    changes = ProjectionChanges({})
    for item in [*parsed(feed, "enrollment", enrolled()), *parsed(feed, "pulse", dose(date(2014, 3, 10))),
                 *parsed(feed, "enrollment", enrolled(sid="IGA-C-902", group="control"))]:
        changes.add(item)
    beat = NOW + timedelta(seconds=5)
    await run(store, handlers.checkpoint, Checkpoint(claimed.lease, changes), projection=projection, clock=at(beat))
    assert projection.committed.state.rebuild_heartbeat_at == beat
    assert kinds(projection, generation=2) == ["enrolled", "pulse_dose"]

    await run(store, handlers.release_lease, ReleaseLease("me"), projection=projection)  # Ctrl-C
    state = projection.committed.state
    assert (state.rebuild_owner, state.rebuild_heartbeat_at, state.rebuilding_generation) == (None, None, 2)
    assert state.rebuild_started_at == NOW

    resumed = await claim(store, projection, "again", now=beat)
    assert resumed.resumed and resumed.lease == Lease("again", 2)
    pages = [await run(store, handlers.read_rebuilt_patients, ReadRebuiltPatients(resumed.lease, after, 1),
                       projection=projection) for after in ("", SID, "IGA-C-902")]
    assert [list(page) for page in pages] == [[SID], ["IGA-C-902"], []]  # a page at a time, in order
    assert pages[0][SID].row()["outcome_json"] is not None
    assert {s: m.last_sequence for s, m in resumed.marks.items()} == {Feed.STREAMS["enrollment"]: 2, PULSE: 1}
    assert projection.committed.state.rebuild_started_at == NOW  # the same rebuild, resumed


async def test_a_chunk_of_checkpoint_patients_is_written_under_the_lease(
    store: EventStore, projection: MemoryProjectionStore
) -> None:
    """A checkpoint writes its patients a chunk at a time, each chunk in its own transaction:
    every one renews the lease, and one written by a rebuild that lost its lease fails."""
    first = await claim(store, projection, "me")
    rows = [ProjectedPatient.new(subject_id).row() for subject_id in ("NT-0001", "NT-0002")]
    beat = NOW + timedelta(seconds=5)
    await run(store, handlers.write_patients, WritePatients(first.lease, rows), projection=projection, clock=at(beat))
    assert sorted(projection.committed.patients[first.lease.generation]) == ["NT-0001", "NT-0002"]
    assert projection.committed.state.rebuild_heartbeat_at == beat

    later = beat + timedelta(seconds=LEASE_SECONDS + 1)
    await claim(store, projection, "other", now=later)  # took the expired lease over
    with pytest.raises(RebuildError, match="taken over or restarted"):
        await run(store, handlers.write_patients, WritePatients(first.lease, rows), projection=projection, clock=at(later))


async def test_restart_discards_the_interrupted_generation(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    claimed = await claim(store, projection, "me")
    changes = ProjectionChanges({})
    for item in parsed(feed, "enrollment", enrolled()):
        changes.add(item)
    await run(store, handlers.checkpoint, Checkpoint(claimed.lease, changes), projection=projection, clock=at(NOW))
    await run(store, handlers.release_lease, ReleaseLease("me"), projection=projection)

    again = await claim(store, projection, "me", restart=True)
    assert (again.lease.generation, again.resumed, again.marks) == (3, False, {})
    assert 2 not in projection.committed.patients and 2 not in projection.committed.timeline


async def test_a_write_after_the_lease_was_lost_keeps_nothing(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    lost = (await claim(store, projection, "me")).lease
    await claim(store, projection, "other", now=NOW + timedelta(seconds=LEASE_SECONDS), restart=True)
    changes = ProjectionChanges({})
    for item in parsed(feed, "enrollment", enrolled()):
        changes.add(item)
    before = projection.committed
    with pytest.raises(RebuildError, match="generation 2 was taken over or restarted"):
        await run(store, handlers.checkpoint, Checkpoint(lost, changes), projection=projection, clock=at(NOW))
    with pytest.raises(RebuildError):
        await run(store, handlers.write_timeline, WriteTimeline(lost, changes.timeline), projection=projection, clock=at(NOW))
    assert projection.committed is before


async def test_release_gives_back_only_the_callers_own_lease(
    store: EventStore, projection: MemoryProjectionStore
) -> None:
    await claim(store, projection, "holder")
    await run(store, handlers.release_lease, ReleaseLease("someone else"), projection=projection)
    assert projection.committed.state.rebuild_owner == "holder"


async def test_the_swap_catches_up_inside_and_serves_the_rebuilt_generation(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    claimed = await claim(store, projection, "me")
    changes = ProjectionChanges({})
    published_meanwhile = parsed(feed, "enrollment", enrolled())

    clock = [NOW]
    swapped_at = NOW + timedelta(minutes=1)

    async def catch_up() -> None:
        assert projection.committed.state.rebuilding_generation == 2  # nothing swapped before it
        for item in published_meanwhile:
            changes.add(item)
        clock[0] = swapped_at  # a catch-up takes time: the swap is stamped when it is done

    await run(store, handlers.swap_in, SwapIn(claimed.lease, changes), projection=projection,
              catch_up=catch_up, clock=lambda: clock[0])
    state = projection.committed.state
    assert (state.active_generation, state.rebuilding_generation, state.rebuild_owner) == (2, None, None)
    assert (state.rebuild_started_at, state.rebuild_heartbeat_at, state.swapped_at) == (None, None, swapped_at)
    assert outcome(projection, generation=2) is not None

    await run(store, handlers.drop_generations_before, DropGenerationsBefore(2), projection=projection)
    assert await _generations(store, projection) == 2


async def _generations(store: EventStore, projection: MemoryProjectionStore) -> int:
    async with store.transaction() as uow:
        return await projection.newest_generation(uow)


async def test_a_swap_after_the_lease_was_taken_over_changes_nothing(
    store: EventStore, projection: MemoryProjectionStore
) -> None:
    lost = (await claim(store, projection, "me")).lease
    await claim(store, projection, "other", now=NOW + timedelta(seconds=LEASE_SECONDS))
    caught_up: list[bool] = []

    async def catch_up() -> None:
        caught_up.append(True)

    with pytest.raises(RebuildError, match="taken over before its swap"):
        await run(store, handlers.swap_in, SwapIn(lost, ProjectionChanges({})), projection=projection,
                  catch_up=catch_up, clock=at(NOW))
    assert caught_up == [] and projection.committed.state.active_generation == 1


async def test_a_rebuild_through_the_handlers_equals_the_live_projection(
    store: EventStore, projection: MemoryProjectionStore, feed: Feed
) -> None:
    """Live: batch by batch, sources interleaved. Rebuilt: the same messages, stream by stream,
    with a checkpoint and a timeline write on the way and the last source left for the swap."""
    by_source = {
        "enrollment": parsed(feed, "enrollment", enrolled(), enrolled(sid="IGA-C-902", group="control"),
                             dialysis(date(2019, 1, 1), sid="IGA-C-902")),
        "pulse": parsed(feed, "pulse", dose(date(2014, 3, 10), 1, 1), dose(date(2014, 3, 11), 1, 2)),
        "cells": parsed(feed, "cells", infused("LOT-1", date(2014, 5, 1))),
        "labs": [lab(feed, egfr("R1", 27.0, "2014-03-02"), 2), lab(feed, egfr("R1", 29.0, "2014-03-02"), 4),
                 lab(feed, egfr("R2", 31.0, "2016-03-02"), 2), lab(feed, egfr("R3", 20.0, "2018-01-01", sid="IGA-C-902"), 2)],
    }
    for items in ([by_source["labs"][3]], by_source["pulse"], by_source["enrollment"], by_source["labs"][:3],
                  by_source["cells"]):
        await project(store, projection, items)

    claimed = await claim(store, projection, "me")
    changes = ProjectionChanges({})
    for item in by_source["enrollment"] + by_source["pulse"]:
        changes.add(item)
    await run(store, handlers.checkpoint, Checkpoint(claimed.lease, changes), projection=projection, clock=at(NOW))
    changes.clear()
    for item in by_source["labs"]:
        changes.add(item)
    await run(store, handlers.write_timeline, WriteTimeline(claimed.lease, changes.take_timeline()),
              projection=projection, clock=at(NOW))

    async def catch_up() -> None:
        for item in by_source["cells"]:
            changes.add(item)

    await run(store, handlers.swap_in, SwapIn(claimed.lease, changes), projection=projection, catch_up=catch_up, clock=at(NOW))
    tables = projection.committed
    assert tables.state.active_generation == 2
    for table in tables.generation_tables():
        assert table[2] == table[1]
    assert len(tables.patients[2]) == 2 and len(tables.timeline[2]) == 10


def test_the_live_batch_size_is_a_setting_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OutcomesSettings().batch_size == 10_000  # the consumers' max_ack_pending
    monkeypatch.setenv("NEPHROTRACK_OUTCOMES_BATCH_SIZE", "500")
    assert OutcomesSettings().batch_size == 500
    monkeypatch.setenv("NEPHROTRACK_OUTCOMES_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="NEPHROTRACK_OUTCOMES_BATCH_SIZE"):
        OutcomesSettings()


def test_the_live_consumers_pause_after_a_partial_batch_only_when_told_to(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OutcomesSettings().max_pause_seconds == 0.0
    monkeypatch.setenv("NEPHROTRACK_OUTCOMES_MAX_PAUSE_SECONDS", "1")
    assert OutcomesSettings().max_pause_seconds == 1.0
