"""The labs use cases (services/labs/handlers.py) on the in-memory event store and the in-memory
labs tables: ingesting results and refusals, parking and releasing, the sweep, erasure and the
purge jobs' bookkeeping — in milliseconds, without a database or a broker."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from contracts.enrollment import PatientDataErased, PatientEnrolled
from contracts.labs import EgfrComputed, LabResultCorrected, LabResultRejected, UrineResultMeasured
from services.labs.domain import stream_id
from services.labs.egfr import ckd_epi_2021
from services.labs.handlers import (
    CountPurged,
    EraseSubjects,
    FinishPurges,
    IngestResults,
    LearnPatients,
    StartPurges,
    SweepParked,
    count_purged,
    erase_subjects,
    finish_purges,
    ingest_results,
    learn_patients,
    start_purges,
    sweep_parked,
)
from services.labs.ingest import ERASED, Labs, Outcome, Refusal
from services.labs.inputs import IncomingResult, LabRejection
from services.labs.labs_memory import MemoryLabsStore
from shared.consumer import InboundMessage
from shared.events import CommandContext, DomainEvent, Envelope
from shared.store import EventStore, JsonCodec, open_store

NOW = datetime(2024, 1, 1, tzinfo=UTC)
COLLECTED = datetime(2015, 6, 1, 8, 30, tzinfo=UTC)
SUBJECT = "IGA-A-001"
ALSO_ON = "t.labs.LabResultRejected"


class KeyMirror(JsonCodec):
    """What the sealing codec does with erasures, without keys: a forgotten subject is erased."""

    def __init__(self) -> None:
        self.erased: set[str] = set()

    def is_erased(self, subject_id: str) -> bool:
        return subject_id in self.erased

    def mark_erased(self, subject_id: str) -> None:
        self.erased.add(subject_id)


@pytest.fixture
def codec() -> KeyMirror:
    return KeyMirror()


@pytest.fixture
def store(codec: KeyMirror) -> EventStore:
    return open_store("memory://", codec=codec)


@pytest.fixture
def labs() -> Labs:
    return Labs(MemoryLabsStore(), unknown_patient_wait=timedelta(seconds=60), rejected_also_on=ALSO_ON)


def tables(labs: Labs) -> Any:
    assert isinstance(labs.tables, MemoryLabsStore)
    return labs.tables.committed


def result(message_id: str, *, result_id: str = "r-1", subject_id: str = SUBJECT, status: str = "final",
           value: float = 2.1, **changes: Any) -> IncomingResult:
    fields = dict(message_id=message_id, subject_id=subject_id, lab_id="LAB1", source="broker", loinc="2160-0",
                  value=value, unit="mg/dL", collected_at=COLLECTED, status=status, result_id=result_id,
                  raw=json.dumps({"message_id": message_id}))
    return IncomingResult(**(fields | changes))


def message(event: DomainEvent, stream: str, sequence: int = 1) -> InboundMessage:
    envelope = Envelope.wrap(event, stream_id=stream, stream_version=1, context=CommandContext())
    return InboundMessage(subject=f"t.enrollment.{type(event).__name__}", data=envelope.model_dump_json().encode(),
                          headers={}, message_id=str(envelope.event_id), delivery=1, stream="T_ENROLLMENT",
                          stream_sequence=sequence)


def enrolled(subject_id: str = SUBJECT, **fields: Any) -> InboundMessage:
    values = dict(sex="F", age_years=58, weight_kg=60.0, group="A", enrolled_on=date(2014, 3, 2),
                  baseline_egfr=27.0, lee_grade="IV") | fields
    return message(PatientEnrolled(subject_id=subject_id, **values), f"patient-{subject_id}")


def erased(subject_id: str = SUBJECT) -> InboundMessage:
    return message(PatientDataErased(subject_id=subject_id, erased_on=NOW.date()), f"erasure-{subject_id}", 2)


async def learn(store: EventStore, labs: Labs, *messages: InboundMessage) -> Any:
    return await store.transact(lambda uow: learn_patients(LearnPatients(list(messages), NOW), uow, labs=labs))


async def ingest(store: EventStore, labs: Labs, *results: IncomingResult, refusals: list[Refusal] | None = None,
                 now: datetime = NOW) -> list[Outcome]:
    command = IngestResults(results, refusals or [], actor="labs:test", now=now)
    return await store.transact(lambda uow: ingest_results(command, uow, labs=labs))


async def events_of(store: EventStore, result_id: str = "r-1") -> list[Any]:
    return [envelope.decode() for envelope in await store.read_stream(stream_id(result_id))]


async def rejected(store: EventStore) -> list[LabResultRejected]:
    return [stored.envelope.decode() async for stored in store.read_all()  # type: ignore[misc]
            if stored.envelope.event_type == "LabResultRejected"]


async def test_a_result_for_an_enrolled_patient_is_recorded_with_its_egfr(store: EventStore, labs: Labs) -> None:
    await learn(store, labs, enrolled())
    (outcome,) = await ingest(store, labs, result("m1"))
    assert outcome.kind == "accepted"
    history = await events_of(store)
    assert [type(e).__name__ for e in history] == ["LabResultRecorded", "EgfrComputed"]
    computed = history[-1]
    assert isinstance(computed, EgfrComputed) and computed.egfr == ckd_epi_2021(2.1, 59, "F")
    assert (await store.read_stream(stream_id("r-1")))[0].actor == "labs:test"
    assert tables(labs).result_index == {"r-1": SUBJECT}
    assert [o.kind for o in await ingest(store, labs, result("m1"))] == ["duplicate"]
    assert len(await events_of(store)) == 2


async def test_urine_protein_is_recorded_corrected_and_deduplicated_like_creatinine(
    store: EventStore, labs: Labs
) -> None:
    await learn(store, labs, enrolled())
    upcr = dict(result_id="u-1", loinc="34366-5", unit="mg/mmol")
    outcomes = await ingest(store, labs, result("m1", status="preliminary", value=169.68, **upcr),
                            result("m2", value=113.12, **upcr), result("m2", value=113.12, **upcr),
                            result("m3", status="corrected", value=56.56, **upcr),
                            result("m4", value=1.0, result_id="u-1", loinc="2160-0", unit="mg/dL"))
    assert [o.kind for o in outcomes] == ["accepted", "accepted", "duplicate", "accepted", "rejected"]
    assert outcomes[-1].rejection is not None and outcomes[-1].rejection.code == "analyte_mismatch"
    history = await events_of(store, "u-1")
    assert not any(isinstance(e, EgfrComputed) for e in history)
    measured = [(e.value, e.unit, e.status, e.counted) for e in history if isinstance(e, UrineResultMeasured)]
    assert measured == [(1.5, "g/g", "preliminary", False), (1.0, "g/g", "final", True),
                        (0.5, "g/g", "corrected", True)]
    (correction,) = [e for e in history if isinstance(e, LabResultCorrected)]
    assert (correction.previous_value, correction.new_value, correction.canonical_unit) == (1.0, 0.5, "g/g")
    assert [r.code for r in await rejected(store)] == ["analyte_mismatch"]


async def test_a_urine_result_in_a_unit_of_another_code_is_refused(store: EventStore, labs: Labs) -> None:
    await learn(store, labs, enrolled())
    (outcome,) = await ingest(store, labs, result("m1", result_id="u-1", loinc="2890-2", unit="mg/mmol", value=50.0))
    assert outcome.kind == "rejected" and outcome.rejection is not None
    assert outcome.rejection.code == "unit_mismatch"
    assert [r.code for r in await rejected(store)] == ["unit_mismatch"]
    assert await events_of(store, "u-1") == []


async def test_a_result_before_its_enrollment_is_parked_then_released_by_it(store: EventStore, labs: Labs) -> None:
    kinds = [o.kind for o in await ingest(store, labs, result("m1"), result("m2", status="corrected", value=1.7),
                                          result("m1"))]
    assert kinds == ["parked", "parked", "parked"]
    assert len(tables(labs).parked) == 2  # the resent one is held once
    assert await events_of(store) == []

    learned = await learn(store, labs, enrolled())
    assert learned.enrolled == [SUBJECT] and [o.kind for o in learned.released] == ["accepted", "accepted"]
    assert tables(labs).parked == {}
    effective = [e for e in await events_of(store) if isinstance(e, EgfrComputed)][-1]
    assert (effective.status, effective.creatinine_mg_dl) == ("corrected", 1.7)


async def test_the_sweep_refuses_what_waited_too_long_and_releases_what_became_known(
    store: EventStore, labs: Labs
) -> None:
    await ingest(store, labs, result("m1", subject_id="IGA-X-404", result_id="x-1"),
                 result("m2", subject_id="IGA-A-078", result_id="race-1"))
    swept = await store.transact(lambda uow: sweep_parked(SweepParked(NOW + timedelta(seconds=59)), uow, labs=labs))
    assert (swept.released, swept.expired, swept.still_parked) == ([], 0, 2)

    async def enrolled_without_release(uow: Any) -> None:  # an enrollment that committed beside the parking
        from shared.patients import remember_enrollments
        await remember_enrollments(uow, [enrolled("IGA-A-078")])

    await store.transact(enrolled_without_release)
    swept = await store.transact(lambda uow: sweep_parked(SweepParked(NOW + timedelta(seconds=61)), uow, labs=labs))
    assert ([o.kind for o in swept.released], swept.expired, swept.still_parked) == (["accepted"], 1, 0)
    (refusal,) = await rejected(store)
    assert (refusal.code, refusal.subject_id, refusal.message_id) == ("unknown_subject", "IGA-X-404", "m1")
    assert "60 s" in refusal.reason
    (logged,) = tables(labs).rejections
    assert (logged.code, logged.subject_id, logged.source) == ("unknown_subject", "IGA-X-404", "broker")
    assert [row["subject"] for row in tables(labs).also_published] == [ALSO_ON]


async def test_refusals_from_parsing_and_from_deciding_are_recorded_alike(store: EventStore, labs: Labs) -> None:
    await learn(store, labs, enrolled())
    parse_refusal = Refusal(LabRejection("body is not JSON", "malformed_json"), "broker", "{not json")
    outcomes = await ingest(store, labs, result("m1", collected_at=NOW + timedelta(days=2)), refusals=[parse_refusal])
    assert [(o.kind, o.rejection and o.rejection.code) for o in outcomes] == [("rejected", "collected_in_future")]
    codes = sorted(r.code for r in await rejected(store))
    assert codes == ["collected_in_future", "malformed_json"]
    assert sorted(row.code for row in tables(labs).rejections) == codes
    assert len(tables(labs).also_published) == 2
    assert await events_of(store) == []


async def test_an_erasure_deletes_what_labs_holds_and_refuses_what_follows(
    store: EventStore, labs: Labs, codec: KeyMirror
) -> None:
    await ingest(store, labs, result("m1"), refusals=[
        Refusal(LabRejection("unknown LOINC", "unknown_loinc", subject_id=SUBJECT), "broker", "{}"),
    ])
    assert len(tables(labs).parked) == 1 and len(tables(labs).rejections) == 1

    learned = await learn(store, labs, erased())
    assert learned.erased == [SUBJECT] and codec.erased == {SUBJECT}
    assert tables(labs).parked == {} and tables(labs).rejections == []
    (job,) = tables(labs).purges.values()
    assert (job.subject_id, job.done_at, job.attempts) == (SUBJECT, None, 0)

    (outcome,) = await ingest(store, labs, result("m2"))
    assert outcome.kind == "rejected" and outcome.rejection is not None and outcome.rejection.code == ERASED
    last = (await rejected(store))[-1]
    assert last.code == ERASED and last.subject_id is None and SUBJECT not in last.raw
    await learn(store, labs, erased())  # redelivered: still one job
    assert len(tables(labs).purges) == 1


async def test_a_unit_of_work_that_fails_leaves_nothing_in_the_labs_tables(store: EventStore, labs: Labs) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            await ingest_results(IngestResults([result("m1")], now=NOW), uow, labs=labs)
            await erase_subjects(EraseSubjects(["IGA-A-002"], NOW), uow, labs=labs)
            raise RuntimeError("the batch failed later")
    committed = tables(labs)
    assert (committed.parked, committed.purges, committed.rejections) == ({}, {}, [])


async def test_purge_jobs_count_attempts_deletions_failures_and_completion(store: EventStore, labs: Labs) -> None:
    await store.transact(lambda uow: erase_subjects(EraseSubjects(["IGA-A-1", "IGA-A-2"], NOW), uow, labs=labs))
    started = await store.transact(lambda uow: start_purges(StartPurges(limit=1), uow, labs=labs))
    assert started == ["IGA-A-1"]  # oldest first, then by the limit

    await store.transact(lambda uow: count_purged(CountPurged("labs_results", {"IGA-A-1": 2}), uow, labs=labs))
    await store.transact(lambda uow: finish_purges(FinishPurges(["IGA-A-1"], error="TimeoutError()"), uow, labs=labs))
    job = tables(labs).purges["IGA-A-1"]
    assert (job.attempts, job.done_at, job.last_error, job.deleted["labs_results"]) == (1, None, "TimeoutError()", 2)

    await store.transact(lambda uow: start_purges(StartPurges(limit=10), uow, labs=labs))
    await store.transact(lambda uow: finish_purges(FinishPurges(["IGA-A-1", "IGA-A-2"], now=NOW), uow, labs=labs))
    jobs = tables(labs).purges
    assert [(j.attempts, j.done_at, j.last_error) for j in jobs.values()] == [(2, NOW, None), (1, NOW, None)]
    assert await store.transact(lambda uow: start_purges(StartPurges(limit=10), uow, labs=labs)) == []
