"""The enrollment use cases (services/enrollment/handlers.py) on the in-memory event store:
enrolling (the key first, refusals before it), clinical events and biopsies, adverse events
(report 201, follow-up, resend; serious ones counted once, on commit), erasure (idempotent,
remembered), and concurrent writers."""

from __future__ import annotations

from datetime import date
from functools import partial
from typing import Any

import pytest
from prometheus_client import REGISTRY

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated, PatientDataErased
from services.enrollment import handlers
from services.enrollment.domain import EnrollPatient, RecordBiopsy, RecordClinicalEvent, ReportAdverseEvent
from shared.errors import Conflict, Invalid, NotFound
from shared.events import CommandContext
from shared.keys import KeyErased
from shared.store import EventStore, open_store
from tests.unit.contested import contested

SUBJECT = "IGA-A-001"
TODAY = date(2026, 12, 5)


class Keys:
    """The key vault's ``create``: which subjects got a key; erased ones raise KeyErased."""

    def __init__(self, *erased: str) -> None:
        self.created: list[str] = []
        self.erased = set(erased)

    async def create(self, subject_id: str) -> bytes:
        if subject_id in self.erased:
            raise KeyErased(subject_id)
        self.created.append(subject_id)
        return b"k" * 32


def enroll_command(**overrides: Any) -> handlers.Enroll:
    fields: dict[str, Any] = {
        "subject_id": SUBJECT, "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
        "enrolled_on": date(2014, 3, 2), "baseline_egfr": 27.0, "lee_grade": "IV",
    }
    fields.update(overrides)
    return handlers.Enroll(EnrollPatient.model_validate(fields), context=CommandContext(actor="staff:test"), today=TODAY)


def event(type_: str, on: date, subject_id: str = SUBJECT) -> handlers.RecordEvent:
    return handlers.RecordEvent(subject_id, RecordClinicalEvent(type=type_, on=on), today=TODAY)


def adverse(ae_id: str = "AE-1", subject_id: str = SUBJECT, **overrides: Any) -> handlers.ReportAdverse:
    fields: dict[str, Any] = {
        "term": "hyperglycaemia", "onset_on": date(2014, 3, 11), "grade": 1, "serious": False,
        "related_to": ["mp_pulse"], "causality": "probable", "outcome": "recovered", "resolved_on": date(2014, 3, 14),
    }
    fields.update(overrides)
    return handlers.ReportAdverse(subject_id, ae_id, ReportAdverseEvent.model_validate(fields), today=TODAY)


def serious_counted(grade: int, related: bool) -> float:
    labels = {"grade": str(grade), "treatment_related": str(related).lower()}
    return REGISTRY.get_sample_value("nephrotrack_serious_adverse_events_total", labels) or 0.0


@pytest.fixture
async def store() -> EventStore:
    store = open_store("memory://")
    await store.transact(partial(handlers.enroll, enroll_command()))
    return store


async def types(store: EventStore, stream_id: str = f"patient-{SUBJECT}") -> list[str]:
    return [e.event_type for e in await store.read_stream(stream_id)]


# --------------------------------------------------------------------------- enrolling


async def test_enrolling_creates_the_key_first_then_records_the_patient() -> None:
    store, keys, command = open_store("memory://"), Keys(), enroll_command(subject_id="IGA-A-002")
    await handlers.create_patient_key(command, keys)
    view = await store.transact(partial(handlers.enroll, command))
    assert keys.created == ["IGA-A-002"]
    assert (view.subject_id, view.group, view.status) == ("IGA-A-002", "A", "active")
    [enrolled] = await store.read_stream("patient-IGA-A-002")
    assert enrolled.actor == "staff:test"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"baseline_egfr": 50.0}, "group A requires a baseline eGFR below 45"),
    ({"enrolled_on": date(2027, 1, 1)}, "enrolled_on"),
    ({"subject_id": "=HYPERLINK(1)"}, "must not start with"),
])
async def test_an_enrollment_refused_on_its_face_gets_no_key(overrides: dict[str, Any], reason: str) -> None:
    keys = Keys()
    with pytest.raises(Invalid, match=reason):
        await handlers.create_patient_key(enroll_command(**overrides), keys)
    assert keys.created == []


async def test_an_erased_subject_cannot_be_enrolled_again() -> None:
    with pytest.raises(Conflict, match="was erased and cannot be enrolled again") as refused:
        await handlers.create_patient_key(enroll_command(), Keys(SUBJECT))
    assert refused.value.code == "erased"


async def test_enrolling_twice_is_a_conflict(store: EventStore) -> None:
    with pytest.raises(Conflict, match="already enrolled"):
        await store.transact(partial(handlers.enroll, enroll_command()))


async def test_a_concurrent_enrollment_that_commits_first_makes_this_one_a_conflict() -> None:
    store = open_store("memory://")
    command = enroll_command()
    with pytest.raises(Conflict, match="already enrolled"):
        await store.transact(contested(store, partial(handlers.enroll, command), partial(handlers.enroll, command)))
    assert await types(store) == ["PatientEnrolled"]


# --------------------------------------------------------------------------- records


async def test_clinical_events_and_biopsies_are_recorded_with_their_rules(store: EventStore) -> None:
    biopsy = handlers.RecordBiopsyFindings(SUBJECT, RecordBiopsy(performed_on=date(2015, 4, 2)), today=TODAY)
    recorded = await store.transact(partial(handlers.record_biopsy, biopsy))
    assert recorded.event_type == "BiopsyRecorded"
    await store.transact(partial(handlers.record_clinical_event, event("dialysis_started", date(2015, 5, 1))))
    with pytest.raises(Conflict, match="dialysis_started is already recorded"):
        await store.transact(partial(handlers.record_clinical_event, event("dialysis_started", date(2015, 6, 1))))
    with pytest.raises(Invalid, match="death on 2015-04-01 precedes events already recorded"):
        await store.transact(partial(handlers.record_clinical_event, event("death", date(2015, 4, 1))))
    with pytest.raises(NotFound, match="no patient is enrolled with subject id IGA-A-404"):
        await store.transact(partial(handlers.record_clinical_event, event("death", date(2015, 4, 1), "IGA-A-404")))
    assert await types(store) == ["PatientEnrolled", "BiopsyRecorded", "DialysisStarted"]


async def test_a_death_recorded_concurrently_is_decided_with(store: EventStore) -> None:
    withdrawal = partial(handlers.record_clinical_event, event("withdrawn", date(2016, 1, 1)))
    death = partial(handlers.record_clinical_event, event("death", date(2015, 12, 1)))
    with pytest.raises(Conflict, match="died on 2015-12-01; nothing more can be recorded"):
        await store.transact(contested(store, withdrawal, death))


# --------------------------------------------------------------------------- adverse events


async def test_an_adverse_event_is_reported_then_followed_up_and_a_resend_changes_nothing(store: EventStore) -> None:
    first = await store.transact(partial(handlers.report_adverse_event, adverse(outcome="recovering", resolved_on=None)))
    assert first.change == "reported" and isinstance(first.event.decode(), AdverseEventReported)
    follow_up = await store.transact(partial(handlers.report_adverse_event, adverse(grade=2)))
    assert follow_up.change == "updated" and isinstance(follow_up.event.decode(), AdverseEventUpdated)
    assert (follow_up.adverse_event.grade, follow_up.adverse_event.resolved_on) == (2, date(2014, 3, 14))
    resend = await store.transact(partial(handlers.report_adverse_event, adverse(grade=2)))
    assert (resend.change, resend.event, resend.adverse_event) == ("unchanged", None, follow_up.adverse_event)
    assert await types(store) == ["PatientEnrolled", "AdverseEventReported", "AdverseEventUpdated"]


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"grade": 5}, "grade 5 .* goes with outcome 'fatal'"),
    ({"outcome": "fatal"}, "grade 1 with outcome fatal"),
    ({"resolved_on": date(2014, 3, 10)}, "resolved_on 2014-03-10 is before onset_on 2014-03-11"),
    ({"onset_on": date(2014, 3, 1), "resolved_on": None}, "onset_on 2014-03-01 is before enrollment on 2014-03-02"),
])
async def test_an_invalid_report_is_refused_and_records_nothing(
    store: EventStore, overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Invalid, match=reason) as refused:
        await store.transact(partial(handlers.report_adverse_event, adverse(**overrides)))
    assert refused.value.status_code == 422
    assert await types(store) == ["PatientEnrolled"]


async def test_an_adverse_event_of_an_unknown_patient_is_not_found(store: EventStore) -> None:
    with pytest.raises(NotFound):
        await store.transact(partial(handlers.report_adverse_event, adverse(subject_id="IGA-A-404")))


async def test_after_withdrawal_or_death_the_rules_of_other_records_hold(store: EventStore) -> None:
    await store.transact(partial(handlers.record_clinical_event, event("withdrawn", date(2015, 1, 1))))
    with pytest.raises(Invalid, match="onset_on 2015-01-02 is after IGA-A-001 withdrew on 2015-01-01"):
        await store.transact(partial(handlers.report_adverse_event, adverse(onset_on=date(2015, 1, 2), resolved_on=None)))
    before = await store.transact(partial(handlers.report_adverse_event, adverse(resolved_on=date(2015, 2, 1))))
    assert before.change == "reported"  # began under consent: still reported, and followed up
    await store.transact(partial(handlers.record_clinical_event, event("death", date(2015, 3, 1))))
    with pytest.raises(Invalid, match="resolved_on 2015-03-02 is after IGA-A-001's death on 2015-03-01"):
        await store.transact(partial(handlers.report_adverse_event, adverse(resolved_on=date(2015, 3, 2))))


async def test_a_serious_adverse_event_is_counted_once_when_it_commits(store: EventStore) -> None:
    before = serious_counted(3, True)
    await store.transact(partial(handlers.report_adverse_event, adverse(grade=3, serious=True)))
    assert serious_counted(3, True) == before + 1
    await store.transact(partial(handlers.report_adverse_event, adverse(grade=3, serious=True, outcome="unknown")))
    await store.transact(partial(handlers.report_adverse_event, adverse(grade=3, serious=True, outcome="unknown")))
    assert serious_counted(3, True) == before + 1  # a follow-up or a resend of a serious one: not again


async def test_a_follow_up_that_makes_an_adverse_event_serious_is_counted(store: EventStore) -> None:
    before = serious_counted(2, False)
    await store.transact(partial(handlers.report_adverse_event, adverse("AE-2", grade=2, causality="unlikely")))
    assert serious_counted(2, False) == before
    await store.transact(partial(handlers.report_adverse_event, adverse("AE-2", grade=2, causality="unlikely", serious=True)))
    assert serious_counted(2, False) == before + 1
    await store.transact(partial(handlers.report_adverse_event, adverse("AE-2", grade=2, causality="unlikely")))
    await store.transact(partial(handlers.report_adverse_event, adverse("AE-2", grade=2, causality="unlikely", serious=True)))
    assert serious_counted(2, False) == before + 1  # serious again after a correction: the same SAE, once


async def test_a_serious_report_that_loses_to_a_concurrent_writer_is_counted_once(store: EventStore) -> None:
    before = serious_counted(4, True)
    serious = partial(handlers.report_adverse_event, adverse("AE-3", grade=4, serious=True))
    biopsy = partial(handlers.record_biopsy,
                     handlers.RecordBiopsyFindings(SUBJECT, RecordBiopsy(performed_on=date(2015, 4, 2)), today=TODAY))
    recorded = await store.transact(contested(store, serious, biopsy, lost=3))
    assert recorded.change == "reported"
    assert serious_counted(4, True) == before + 1
    assert await types(store) == ["PatientEnrolled", "BiopsyRecorded", "AdverseEventReported"]


# --------------------------------------------------------------------------- erasure


async def test_erasure_needs_a_withdrawal_first(store: EventStore) -> None:
    with pytest.raises(Conflict, match="has not withdrawn consent"):
        await store.transact(partial(handlers.erase, handlers.Erase(SUBJECT, today=TODAY)))
    with pytest.raises(NotFound):
        await store.transact(partial(handlers.erase, handlers.Erase("IGA-A-404", today=TODAY)))


async def test_erasure_is_recorded_in_clear_remembered_and_idempotent(store: EventStore) -> None:
    await store.transact(partial(handlers.record_clinical_event, event("withdrawn", date(2015, 1, 1))))
    first = await store.transact(partial(handlers.erase, handlers.Erase(SUBJECT, today=TODAY)))
    assert first.first and first.event.decode() == PatientDataErased(subject_id=SUBJECT, erased_on=TODAY)
    again = await store.transact(partial(handlers.erase, handlers.Erase(SUBJECT, today=date(2026, 12, 6))))
    assert (again.first, again.event.event_id) == (False, first.event.event_id)
    async with store.transaction() as uow:
        assert await uow.erased.all() == [SUBJECT]
    assert await types(store, f"erasure-{SUBJECT}") == ["PatientDataErased"]


async def test_a_concurrent_erasure_that_commits_first_is_answered_with(store: EventStore) -> None:
    await store.transact(partial(handlers.record_clinical_event, event("withdrawn", date(2015, 1, 1))))
    erase = partial(handlers.erase, handlers.Erase(SUBJECT, today=TODAY))
    erasure = await store.transact(contested(store, erase, erase))
    assert not erasure.first
    assert await types(store, f"erasure-{SUBJECT}") == ["PatientDataErased"]
