"""The live projection's batch handler on PostgreSQL and SQLite: rows, idempotency, ordering,
and the checkpoint committed with (or rolled back with) the rows."""

from __future__ import annotations

import asyncio
from datetime import date

import pytest

from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.projections import LiveProjection
from services.outcomes.projector import ProjectedPatient
from shared.consumer import InboundMessage
from shared.store import EventStore
from tests.outcomes.conftest import Feed
from tests.outcomes.rows import checkpoints, generation_rows, outcome, timeline
from tests.unit.outcomes.outcome_events import SID, deviation, dialysis, dose, egfr, enrolled, infused

LABS, PULSE, ENROLLMENT = Feed.STREAMS["labs"], Feed.STREAMS["pulse"], Feed.STREAMS["enrollment"]


async def project(store: EventStore, source: str, messages: list[InboundMessage]) -> None:
    async with store.transaction() as uow:
        await LiveProjection(source, SqlProjectionStore())(uow, messages)


def lab(feed: Feed, event, version: int) -> InboundMessage:  # type: ignore[no-untyped-def]
    return feed.message("labs", feed.envelope(event, f"labresult-{event.result_id}", version))


async def test_a_patient_is_projected_from_every_source(outcomes_store: EventStore, feed: Feed) -> None:
    start = date(2014, 3, 10)
    await project(outcomes_store, "enrollment", feed.messages("enrollment", enrolled(enrolled_on=date(2014, 3, 2))))
    await project(outcomes_store, "pulse", feed.messages(
        "pulse", dose(start, 1, 1), dose(date(2014, 3, 11), 1, 2), deviation(start)))
    await project(outcomes_store, "cells", feed.messages("cells", infused("LOT-1", date(2014, 5, 1))))
    await project(outcomes_store, "labs", [
        lab(feed, egfr("R1", 27.0, "2014-03-02"), 2),
        lab(feed, egfr("R2", 33.0, "2016-03-10"), 2),
        lab(feed, egfr("R3", 38.0, "2019-03-10"), 2),
    ])
    await project(outcomes_store, "enrollment", feed.messages("enrollment", dialysis(date(2020, 1, 1))))

    values = await outcome(outcomes_store.engine, SID)
    assert values is not None
    assert (values.treatment_start, values.baseline_egfr, values.baseline_source) == (start, 27.0, "lab")
    assert values.post_egfr == 38.0 and values.followup_years == (date(2019, 3, 10) - start).days / 365.25
    assert values.egfr_slope == pytest.approx(5.0 / ((date(2019, 3, 10) - date(2016, 3, 10)).days / 365.25))
    assert (values.pulse_cycles, values.infusions, values.deviations, values.kidney_failure) == (1, 1, 1, True)
    kinds = [kind for kind, _ in await timeline(outcomes_store.engine, SID)]
    assert kinds == ["enrolled", "egfr", "pulse_dose", "protocol_deviation", "pulse_dose", "infusion",
                     "egfr", "egfr", "dialysis_started"]
    assert await checkpoints(outcomes_store.engine) == {ENROLLMENT: 2, PULSE: 3, Feed.STREAMS["cells"]: 1, LABS: 3}


async def test_dates_recorded_before_the_clinical_bounds_existed_are_projected_as_they_are(
    outcomes_store: EventStore, feed: Feed
) -> None:
    # Enrollment, pulse and labs now refuse such dates (shared.clinical_dates); a log written
    # before keeps them, and the projection (date and timestamp columns) must take them.
    await project(outcomes_store, "enrollment", feed.messages("enrollment", enrolled(enrolled_on=date(1, 1, 1))))
    await project(outcomes_store, "pulse", feed.messages("pulse", dose(date(9999, 12, 31))))
    await project(outcomes_store, "labs", [lab(feed, egfr("R1", 30.0, "0001-01-01T00:00:00+00:00"), 2),
                                           lab(feed, egfr("R2", 20.0, "9999-12-31T23:00:00+00:00"), 2)])
    await project(outcomes_store, "enrollment", feed.messages("enrollment", dialysis(date(3005, 1, 1))))

    values = await outcome(outcomes_store.engine, SID)
    assert values is not None
    assert (values.enrolled_on, values.treatment_start) == (date(1, 1, 1), date(9999, 12, 31))
    assert values.baseline_egfr == 20.0
    assert values.kidney_failure_years == (date(3005, 1, 1) - date(9999, 12, 31)).days / 365.25
    assert [kind for kind, _ in await timeline(outcomes_store.engine, SID)] == [
        "enrolled", "egfr", "dialysis_started", "pulse_dose", "egfr"]


async def test_an_older_egfr_version_arriving_after_a_newer_one_is_ignored(
    outcomes_store: EventStore, feed: Feed
) -> None:
    await project(outcomes_store, "enrollment", feed.messages("enrollment", enrolled(group="control")))
    # The correction (labs stream version 4) overtakes the typo it corrects (version 2).
    await project(outcomes_store, "labs", [lab(feed, egfr("R9", 40.0, "2016-01-01", status="corrected"), 4)])
    await project(outcomes_store, "labs", [lab(feed, egfr("R9", 4.4, "2016-01-01"), 2)])
    values = await outcome(outcomes_store.engine, SID)
    assert values is not None and values.post_egfr == 40.0
    entries = await timeline(outcomes_store.engine, SID)
    assert sorted(d["egfr"] for kind, d in entries if kind == "egfr") == [4.4, 40.0]  # both stay on the timeline


async def test_a_redelivered_batch_counts_nothing_twice(outcomes_store: EventStore, feed: Feed) -> None:
    first = [
        *feed.messages("pulse", dose(date(2014, 3, 10), 1, 1), dose(date(2014, 3, 11), 1, 2)),
    ]
    await project(outcomes_store, "enrollment", feed.messages("enrollment", enrolled()))
    await project(outcomes_store, "pulse", first)
    before = await generation_rows(outcomes_store.engine, 1)
    await project(outcomes_store, "pulse", first)  # the same messages again, as after a lost ack
    await project(outcomes_store, "pulse", first[:1])
    assert await generation_rows(outcomes_store.engine, 1) == before
    values = await outcome(outcomes_store.engine, SID)
    assert values is not None and values.pulse_cycles == 1


async def test_a_failing_batch_leaves_neither_rows_nor_checkpoint(outcomes_store: EventStore, feed: Feed) -> None:
    await project(outcomes_store, "enrollment", feed.messages("enrollment", enrolled()))
    before = await generation_rows(outcomes_store.engine, 1)
    good = feed.messages("pulse", dose(date(2014, 3, 10)))
    poison = InboundMessage(subject="t.pulse.X", data=b"not an envelope", headers={}, message_id="x",
                            delivery=1, stream=PULSE, stream_sequence=99)
    with pytest.raises(ValueError):
        await project(outcomes_store, "pulse", [*good, poison])
    assert await generation_rows(outcomes_store.engine, 1) == before

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        async with outcomes_store.transaction() as uow:
            await LiveProjection("pulse", SqlProjectionStore())(uow, good)
            raise Crash  # e.g. the process dies after the handler, before the commit
    assert await generation_rows(outcomes_store.engine, 1) == before
    await project(outcomes_store, "pulse", good)
    assert (await checkpoints(outcomes_store.engine))[PULSE] == good[0].stream_sequence


async def test_the_checkpoint_never_moves_back(outcomes_store: EventStore, feed: Feed) -> None:
    late = feed.messages("pulse", dose(date(2014, 3, 10), 1, 1))
    early = feed.messages("pulse", dose(date(2014, 3, 11), 1, 2))
    await project(outcomes_store, "pulse", early)  # sequence 2
    await project(outcomes_store, "pulse", late)  # sequence 1, redelivered late
    assert (await checkpoints(outcomes_store.engine))[PULSE] == 2


async def test_facts_arriving_before_the_enrollment_wait_for_it(outcomes_store: EventStore, feed: Feed) -> None:
    await project(outcomes_store, "labs", [lab(feed, egfr("R1", 30.0, "2014-01-01"), 2)])
    assert await outcome(outcomes_store.engine, SID) is None
    await project(outcomes_store, "enrollment", feed.messages("enrollment", enrolled(group="control", baseline=33.0)))
    values = await outcome(outcomes_store.engine, SID)
    assert values is not None and values.baseline_egfr == 30.0  # the lab result, on or before the start


async def test_concurrent_batches_for_one_new_patient_lose_nothing(outcomes_store: EventStore, feed: Feed) -> None:
    """Two consumers create the same patient at once; the second waits for the first's row."""
    for round_ in range(5):
        sid = f"IGA-A-{round_:03d}"
        await asyncio.gather(
            project(outcomes_store, "pulse", feed.messages("pulse", dose(date(2014, 3, 10), sid=sid))),
            project(outcomes_store, "labs", [lab(feed, egfr("R1" + sid, 30.0, "2014-01-01", sid=sid), 2)]),
            project(outcomes_store, "enrollment", feed.messages("enrollment", enrolled(sid=sid))),
        )
        values = await outcome(outcomes_store.engine, sid)
        assert values is not None and values.pulse_cycles == 1 and values.counted_egfr_n == 1


def test_rows_are_canonical_whatever_the_order_facts_arrived_in(feed: Feed) -> None:
    events = [enrolled(), dose(date(2014, 3, 10), 1, 1), dose(date(2014, 3, 11), 1, 2), dose(date(2014, 3, 12), 1, 3),
              infused("LOT-1", date(2014, 5, 1)), infused("LOT-2", date(2014, 7, 1), number=2),
              egfr("R1", 27.0, "2014-03-02"), egfr("R2", 31.5, "2015-03-02")]
    envelopes = [(feed.envelope(e, version=1), e) for e in events]
    forward, backward = ProjectedPatient.new(SID), ProjectedPatient.new(SID)
    for envelope, event in envelopes:
        forward.apply(envelope, event)
    for envelope, event in reversed(envelopes):
        backward.apply(envelope, event)
    assert forward.row() == backward.row()
