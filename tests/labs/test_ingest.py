"""The ingestion core on PostgreSQL and SQLite: what is recorded, parked, released, refused.

Every test calls :func:`ingest_batch` (or a use case of services.labs.handlers) inside ``store.transaction()`` the way the adapters
do, then reads the store back.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, func, select

from contracts.labs import EgfrComputed, LabResultCorrected, LabResultRejected
from services.labs.domain import stream_id
from services.labs.egfr import age_on, ckd_epi_2021
from services.labs.events import LabResultRecorded
from services.labs.handlers import SweepParked, sweep_parked
from services.labs.ingest import RAW_LIMIT, Labs, Refusal, ingest_batch, record_refusals
from services.labs.inputs import IncomingResult, LabRejection
from services.labs.tables import lab_rejections, lab_result_index, parked_results
from shared.schema import events, outbox
from shared.store import EventStore
from tests.labs.conftest import enroll, sql_labs

NOW = datetime(2024, 1, 1, tzinfo=UTC)
COLLECTED = datetime(2015, 6, 1, 8, 30, tzinfo=UTC)
SUBJECT = "IGA-A-001"


def result(message_id: str, *, result_id: str = "r-1", status: str = "final", value: float = 2.1,
           subject_id: str = SUBJECT, **changes: Any) -> IncomingResult:
    fields = dict(
        message_id=message_id, subject_id=subject_id, lab_id="LAB1", source="broker", loinc="2160-0",
        value=value, unit="mg/dL", collected_at=COLLECTED, status=status, result_id=result_id,
        raw=f'{{"message_id": "{message_id}"}}',
    )
    return IncomingResult(**(fields | changes))


async def run(store: EventStore, items: list[IncomingResult], labs: Labs | None = None,
              now: datetime = NOW) -> list[str]:
    async with store.transaction() as uow:
        outcomes = await ingest_batch(uow, labs or sql_labs(), items, now)
    return [outcome.kind for outcome in outcomes]


async def events_of(store: EventStore, result_id: str = "r-1") -> list[Any]:
    return [envelope.decode() for envelope in await store.read_stream(stream_id(result_id))]


async def effective(store: EventStore, result_id: str = "r-1") -> EgfrComputed:
    computed = [e for e in await events_of(store, result_id) if isinstance(e, EgfrComputed)]
    return computed[-1]


async def rejected_events(store: EventStore) -> list[LabResultRejected]:
    """Read directly (``read_all`` waits for the cluster-wide xmin horizon, which other work on a
    shared PostgreSQL may hold back)."""
    async with store.engine.connect() as connection:
        rows = await connection.execute(
            select(events.c.payload).where(events.c.event_type == "LabResultRejected").order_by(events.c.position)
        )
        return [LabResultRejected.model_validate(json.loads(row.payload)) for row in rows]


async def scalar(store: EventStore, query: Any) -> Any:
    async with store.engine.connect() as connection:
        return await connection.scalar(query)


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def enrolled(labs_store: EventStore) -> EventStore:
    await enroll(labs_store, sql_labs(), SUBJECT)
    return labs_store


async def test_creatinine_becomes_ckd_epi_2021_egfr_with_the_age_on_the_collection_date(enrolled: EventStore) -> None:
    before_anniversary = datetime(2016, 3, 1, 23, 0, tzinfo=UTC)
    on_anniversary = datetime(2016, 3, 2, 0, 30, tzinfo=UTC)
    kinds = await run(enrolled, [
        result("m1", result_id="r-before", collected_at=before_anniversary),
        result("m2", result_id="r-on", collected_at=on_anniversary, loinc="14682-9", value=185.64, unit="µmol/L"),
    ])
    assert kinds == ["accepted", "accepted"]
    before = await effective(enrolled, "r-before")
    on = await effective(enrolled, "r-on")
    assert (before.age_years, on.age_years) == (59, 60)  # enrolled at 58 on 2014-03-02
    assert before.age_years == age_on(58, date(2014, 3, 2), before_anniversary.date())
    assert before.egfr == ckd_epi_2021(2.1, 59, "F")  # unrounded
    assert on.creatinine_mg_dl == 185.64 / 88.4 == pytest.approx(2.1)
    assert on.egfr == ckd_epi_2021(on.creatinine_mg_dl, 60, "F")
    assert (on.equation, on.sex, on.derived_from, on.counted) == ("CKD-EPI 2021", "F", "creatinine", True)
    recorded = (await events_of(enrolled, "r-on"))[0]
    assert isinstance(recorded, LabResultRecorded)
    assert (recorded.value, recorded.unit, recorded.canonical_unit) == (185.64, "µmol/L", "mg/dL")


@pytest.mark.parametrize("order", ["final_first", "corrected_first", "same_batch"])
async def test_a_correction_replaces_the_value_whatever_the_arrival_order(enrolled: EventStore, order: str) -> None:
    final, corrected = result("m-final", value=2.1), result("m-corr", status="corrected", value=1.8)
    if order == "final_first":
        assert await run(enrolled, [final]) == ["accepted"]
        assert await run(enrolled, [corrected]) == ["accepted"]
    elif order == "corrected_first":
        assert await run(enrolled, [corrected]) == ["accepted"]
        assert await run(enrolled, [final]) == ["accepted"]  # recorded, changes nothing
    else:
        assert await run(enrolled, [final, corrected]) == ["accepted", "accepted"]
    current = await effective(enrolled)
    assert (current.status, current.creatinine_mg_dl) == ("corrected", 1.8)
    assert current.egfr == ckd_epi_2021(1.8, 59, "F")
    history = await events_of(enrolled)
    assert sum(isinstance(e, LabResultRecorded) for e in history) == 2
    if order != "corrected_first":
        (correction,) = [e for e in history if isinstance(e, LabResultCorrected)]
        assert (correction.previous_value, correction.new_value) == (2.1, 1.8)


async def test_a_preliminary_result_is_kept_but_not_counted_and_a_final_supersedes_it(enrolled: EventStore) -> None:
    assert await run(enrolled, [result("m-p", status="preliminary", value=2.4)]) == ["accepted"]
    assert (await effective(enrolled)).counted is False
    assert await run(enrolled, [result("m-f", value=2.2)]) == ["accepted"]
    current = await effective(enrolled)
    assert (current.counted, current.status, current.creatinine_mg_dl) == (True, "final", 2.2)
    assert await run(enrolled, [result("m-p2", status="preliminary", value=3.0)]) == ["accepted"]
    assert (await effective(enrolled)).creatinine_mg_dl == 2.2  # a preliminary never displaces a final


async def test_the_same_message_twice_has_one_effect(enrolled: EventStore) -> None:
    assert await run(enrolled, [result("m1"), result("m1")]) == ["accepted", "duplicate"]
    assert await run(enrolled, [result("m1")]) == ["duplicate"]
    history = await events_of(enrolled)
    assert [type(e).__name__ for e in history] == ["LabResultRecorded", "EgfrComputed"]
    assert await scalar(enrolled, select(func.count()).select_from(lab_result_index)) == 1


async def test_unknown_patient_is_parked_then_released_by_the_enrollment(labs_store: EventStore) -> None:
    labs = sql_labs()
    subject = "IGA-A-077"
    kinds = await run(labs_store, [
        result("m1", subject_id=subject, result_id="p-1"),
        result("m2", subject_id=subject, result_id="p-1", status="corrected", value=1.7),
        result("m1", subject_id=subject, result_id="p-1"),  # resent while waiting: held once
    ], labs)
    assert kinds == ["parked", "parked", "parked"]
    assert await scalar(labs_store, select(func.count()).select_from(parked_results)) == 2
    assert await events_of(labs_store, "p-1") == []

    await enroll(labs_store, labs, subject, sex="M", age_years=40, enrolled_on=date(2015, 1, 1))
    assert await scalar(labs_store, select(func.count()).select_from(parked_results)) == 0
    current = await effective(labs_store, "p-1")
    assert (current.status, current.creatinine_mg_dl, current.sex, current.age_years) == ("corrected", 1.7, "M", 40)
    assert current.egfr == ckd_epi_2021(1.7, 40, "M")
    assert await run(labs_store, [result("m1", subject_id=subject, result_id="p-1")], labs) == ["duplicate"]


async def test_parked_results_expire_into_unknown_subject_rejections(labs_store: EventStore) -> None:
    labs = sql_labs(unknown_patient_wait=60, rejected_also_on="t.labs.LabResultRejected")
    subject = "IGA-X-404"
    assert await run(labs_store, [result("m1", subject_id=subject, result_id="x-1")], labs) == ["parked"]
    rejected_before = sample("nephrotrack_lab_results_rejected_total", {"source": "broker", "reason": "unknown_subject"})
    async with labs_store.transaction() as uow:
        swept = await sweep_parked(SweepParked(NOW + timedelta(seconds=59)), uow, labs=labs)
    assert (swept.released, swept.expired) == ([], 0)
    async with labs_store.transaction() as uow:
        swept = await sweep_parked(SweepParked(NOW + timedelta(seconds=61)), uow, labs=labs)
    assert (swept.released, swept.expired) == ([], 1)
    (rejection,) = await rejected_events(labs_store)
    assert (rejection.code, rejection.subject_id, rejection.message_id, rejection.source) == (
        "unknown_subject", subject, "m1", "broker")
    assert "not enrolled" in rejection.reason and "60 s" in rejection.reason
    assert rejection.raw == '{"message_id": "m1"}'
    assert sample("nephrotrack_lab_results_rejected_total",
                  {"source": "broker", "reason": "unknown_subject"}) == rejected_before + 1
    async with labs_store.engine.connect() as connection:
        subjects = sorted((await connection.execute(select(outbox.c.subject))).scalars())
        logged = (await connection.execute(select(lab_rejections))).one()
    assert subjects == ["t.labs.LabResultRejected", "test.labs.LabResultRejected"]  # labs.rejected in the app
    assert (logged.code, logged.subject_id) == ("unknown_subject", subject)
    assert await scalar(labs_store, select(func.count()).select_from(parked_results)) == 0


async def test_the_sweep_releases_results_parked_while_their_enrollment_committed(labs_store: EventStore) -> None:
    """PostgreSQL race: a batch parks a result while the enrollment commits beside it; the
    enrollment's release did not see the row, so the sweep takes it in."""
    labs = sql_labs()
    subject = "IGA-A-078"
    await run(labs_store, [result("m1", subject_id=subject, result_id="race-1")], labs)
    from shared.schema import known_patients

    async with labs_store.transaction() as uow:  # the enrollment, without its release step
        await uow.connection.execute(known_patients.insert().values(
            subject_id=subject, group="A", sex="F", age_years=58, enrolled_on=date(2014, 3, 2)))
    async with labs_store.transaction() as uow:
        swept = await sweep_parked(SweepParked(NOW), uow, labs=labs)
    assert ([o.kind for o in swept.released], swept.expired) == (["accepted"], 0)
    assert (await effective(labs_store, "race-1")).egfr == ckd_epi_2021(2.1, 59, "F")


async def test_refusals_are_recorded_with_reason_and_raw_and_nothing_else(enrolled: EventStore) -> None:
    future = NOW + timedelta(days=2)
    kinds = await run(enrolled, [
        result("m1", result_id="ok-1"),
        result("m2", result_id="bad-1", collected_at=future),
        result("m3", result_id="bad-2", subject_id="IGA-UNKNOWN", collected_at=future),  # not parked: no use
        result("m4", result_id="ok-1", loinc="98979-8", value=40.0, unit="mL/min/1.73m2"),  # creatinine id
    ])
    assert kinds == ["accepted", "rejected", "rejected", "rejected"]
    codes = sorted(r.code or "" for r in await rejected_events(enrolled))
    assert codes == ["analyte_mismatch", "collected_in_future", "collected_in_future"]
    assert await scalar(enrolled, select(func.count()).select_from(parked_results)) == 0


async def test_a_negative_age_on_collection_is_refused_not_crashed(labs_store: EventStore) -> None:
    labs = sql_labs()
    await enroll(labs_store, labs, "IGA-A-002", age_years=1, enrolled_on=date(2020, 1, 1))
    kinds = await run(labs_store, [result("m1", subject_id="IGA-A-002", collected_at=datetime(2015, 1, 1, tzinfo=UTC))], labs)
    assert kinds == ["rejected"]
    (rejection,) = await rejected_events(labs_store)
    assert rejection.code == "egfr_not_computable"


async def test_record_rejections_caps_the_raw_payload_and_escapes_what_the_database_cannot_hold(
    labs_store: EventStore,
) -> None:
    labs = sql_labs()
    huge = "\x00" + "x" * (RAW_LIMIT + 10)
    async with labs_store.transaction() as uow:
        await record_refusals(uow, labs, [
            Refusal(LabRejection("bad", "malformed_json", message_id="\ud800" * 3), "broker", huge),
        ], NOW)
    (rejection,) = await rejected_events(labs_store)
    assert rejection.raw.startswith("\x00x") and rejection.raw.endswith("... [11 more characters]")
    assert rejection.message_id == "\\ud800" * 3


async def test_metrics_count_only_what_commits(enrolled: EventStore) -> None:
    before = sample("nephrotrack_lab_results_accepted_total", {"source": "broker"})
    with pytest.raises(RuntimeError):
        async with enrolled.transaction() as uow:
            await ingest_batch(uow, sql_labs(), [result("m1", result_id="rolled-back")], NOW)
            raise RuntimeError("handler failed later in the batch")
    assert sample("nephrotrack_lab_results_accepted_total", {"source": "broker"}) == before
    assert await events_of(enrolled, "rolled-back") == []
    await run(enrolled, [result("m1", result_id="committed")])
    assert sample("nephrotrack_lab_results_accepted_total", {"source": "broker"}) == before + 1


async def test_a_batch_costs_the_same_statements_whatever_its_size(enrolled: EventStore) -> None:
    async def statements(size: int, tag: str) -> int:
        count = 0

        def on_execute(*_: Any) -> None:
            nonlocal count
            count += 1

        async with enrolled.transaction() as uow:
            event.listen(uow.connection.sync_connection, "before_cursor_execute", on_execute)
            outcomes = await ingest_batch(uow, sql_labs(), [result(f"{tag}-{n}", result_id=f"{tag}-{n}") for n in range(size)], NOW)
        assert {o.kind for o in outcomes} == {"accepted"}
        return count

    # A few events go in as one statement of arrays, many by COPY (shared/store/postgres.py,
    # ONE_STATEMENT_ROWS): within each way the count of statements does not grow with the batch.
    assert await statements(1, "one") == await statements(8, "few")
    assert await statements(20, "some") == await statements(400, "many")
