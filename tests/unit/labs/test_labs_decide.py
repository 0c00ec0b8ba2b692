"""The per-result-id decider: what is recorded, what becomes effective, and idempotency."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.enrollment import PatientEnrolled
from contracts.labs import EgfrComputed, LabResultCorrected
from services.labs.domain import KnownPatient, ResultState, decide_result, fold_result, known_patient, stream_id
from services.labs.egfr import age_on, ckd_epi_2021
from services.labs.events import LabResultRecorded
from services.labs.inputs import IncomingResult, LabRejection

NOW = datetime(2024, 1, 1, tzinfo=UTC)
PATIENT = KnownPatient("IGA-A-001", "F", 58, date(2014, 3, 2))
COLLECTED = datetime(2015, 6, 1, 8, 30, tzinfo=UTC)


def incoming(message_id: str, status: str = "final", value: float = 2.1, **changes) -> IncomingResult:
    fields = dict(
        message_id=message_id, subject_id="IGA-A-001", lab_id="LAB1", source="broker", loinc="2160-0",
        value=value, unit="mg/dL", collected_at=COLLECTED, status=status, result_id="r-1", raw="{}",
    )
    return IncomingResult(**(fields | changes))


def deliver(history: list, result: IncomingResult, patient: KnownPatient | None = PATIENT) -> list:
    """Decide on the fold of ``history``, append what was decided, return the new events."""
    new = decide_result(fold_result(history), result, patient, now=NOW)
    history.extend(new)
    return new


def types(events) -> list[str]:
    return [type(event).__name__ for event in events]


@pytest.mark.parametrize("loinc, value, unit", [("2160-0", 2.1, "mg/dL"), ("14682-9", 185.64, "umol/L"),
                                                ("98979-8", 31.0, "mL/min/1.73m2"), ("33914-3", 31.0, "mL/min/1.73m2")])
def test_the_effective_egfr_names_the_code_the_lab_sent(loinc: str, value: float, unit: str):
    computed = deliver([], incoming("m1", loinc=loinc, value=value, unit=unit))[-1]
    assert isinstance(computed, EgfrComputed) and computed.loinc == loinc


def test_first_final_creatinine_is_recorded_and_computed():
    events = deliver([], incoming("m1"))
    assert types(events) == ["LabResultRecorded", "EgfrComputed"]
    recorded, computed = events
    assert (recorded.analyte, recorded.canonical_value, recorded.canonical_unit) == ("creatinine", 2.1, "mg/dL")
    age = age_on(58, date(2014, 3, 2), date(2015, 6, 1))
    assert age == 59
    assert computed.egfr == ckd_epi_2021(2.1, 59, "F")
    assert (computed.counted, computed.status, computed.derived_from) == (True, "final", "creatinine")
    assert (computed.creatinine_mg_dl, computed.equation, computed.sex, computed.age_years) == (2.1, "CKD-EPI 2021",
                                                                                                "F", 59)


def test_umol_creatinine_keeps_mg_dl():
    _, computed = deliver([], incoming("m1", loinc="14682-9", value=185.64, unit="umol/L"))
    assert computed.creatinine_mg_dl == 185.64 / 88.4 == pytest.approx(2.1)


def test_reported_egfr_is_taken_as_is():
    _, computed = deliver([], incoming("m1", loinc="98979-8", value=27.4, unit="mL/min/{1.73_m2}"))
    assert (computed.egfr, computed.derived_from, computed.creatinine_mg_dl, computed.equation) == (
        27.4, "reported", None, None)


def test_first_preliminary_is_effective_but_not_counted():
    _, computed = deliver([], incoming("m1", "preliminary"))
    assert (computed.status, computed.counted) == ("preliminary", False)


def test_same_message_twice_has_one_effect():
    history: list = []
    deliver(history, incoming("m1"))
    assert deliver(history, incoming("m1")) == []
    assert deliver(history, incoming("m1", value=9.9)) == []  # the id decides, not the content


def test_correction_after_final_replaces_value():
    history: list = []
    deliver(history, incoming("m1", value=2.1))
    events = deliver(history, incoming("m2", "corrected", value=1.8))
    assert types(events) == ["LabResultRecorded", "LabResultCorrected", "EgfrComputed"]
    corrected = events[1]
    assert (corrected.previous_value, corrected.new_value, corrected.canonical_unit) == (2.1, 1.8, "mg/dL")
    assert (events[2].status, events[2].counted, events[2].creatinine_mg_dl) == ("corrected", True, 1.8)


def test_final_after_correction_is_recorded_but_not_effective():
    history: list = []
    deliver(history, incoming("m2", "corrected", value=1.8))
    events = deliver(history, incoming("m1", "final", value=2.1))
    assert types(events) == ["LabResultRecorded"]
    assert fold_result(history).effective.creatinine_mg_dl == 1.8


def test_later_correction_replaces_earlier_correction():
    history: list = []
    deliver(history, incoming("m1"))
    deliver(history, incoming("m2", "corrected", value=1.8))
    events = deliver(history, incoming("m3", "corrected", value=1.7))
    assert types(events) == ["LabResultRecorded", "LabResultCorrected", "EgfrComputed"]
    assert events[1].previous_value == 1.8
    assert fold_result(history).effective.creatinine_mg_dl == 1.7


def test_preliminary_never_replaces_final():
    history: list = []
    deliver(history, incoming("m1", "final", value=2.1))
    assert types(deliver(history, incoming("m0", "preliminary", value=3.0))) == ["LabResultRecorded"]
    assert fold_result(history).status == "final"


def test_final_after_preliminary_becomes_counted():
    history: list = []
    deliver(history, incoming("m0", "preliminary", value=3.0))
    events = deliver(history, incoming("m1", "final", value=2.1))
    assert types(events) == ["LabResultRecorded", "EgfrComputed"]
    assert (events[1].counted, events[1].creatinine_mg_dl) == (True, 2.1)


def test_resent_identical_final_changes_nothing_effective():
    history: list = []
    deliver(history, incoming("m1"))
    assert types(deliver(history, incoming("m1-resent", source="mllp"))) == ["LabResultRecorded"]


def test_result_id_of_another_subject_is_refused():
    history: list = []
    deliver(history, incoming("m1"))
    other = KnownPatient("IGA-B-002", "M", 40, date(2014, 1, 1))
    with pytest.raises(LabRejection) as caught:
        deliver(history, incoming("m2", subject_id="IGA-B-002"), other)
    assert caught.value.code == "result_id_conflict"


def test_result_id_cannot_change_analyte():
    history: list = []
    deliver(history, incoming("m1"))
    with pytest.raises(LabRejection) as caught:
        deliver(history, incoming("m2", "corrected", loinc="98979-8", value=30.0, unit="mL/min/1.73m2"))
    assert caught.value.code == "analyte_mismatch"


def test_unknown_patient_is_refused():
    with pytest.raises(LabRejection) as caught:
        deliver([], incoming("m1"), None)
    assert caught.value.code == "unknown_subject"


def test_decider_applies_the_clock_check():
    with pytest.raises(LabRejection) as caught:
        deliver([], incoming("m1", collected_at=NOW + timedelta(days=1)))
    assert caught.value.code == "collected_in_future"


def test_fold_tracks_subject_messages_and_effective_value():
    history: list = []
    deliver(history, incoming("m1"))
    deliver(history, incoming("m2", "corrected", value=1.8))
    state = fold_result(history)
    assert isinstance(state, ResultState)
    assert (state.result_id, state.subject_id, state.analyte) == ("r-1", "IGA-A-001", "creatinine")
    assert state.seen_message_ids == {"m1", "m2"}
    assert state.effective_egfr == ckd_epi_2021(1.8, 59, "F")
    assert stream_id("r-1") == "labresult-r-1"


def test_known_patient_from_enrollment_event():
    enrolled = PatientEnrolled(subject_id="IGA-A-001", sex="F", age_years=58, weight_kg=61.5, group="A",
                               enrolled_on=date(2014, 3, 2), baseline_egfr=27.0)
    assert known_patient(enrolled) == PATIENT


# --------------------------------------------------------------------------- properties

values = st.floats(min_value=0.3, max_value=12.0, allow_nan=False)
RANK = {"preliminary": 0, "final": 1, "corrected": 2}


@given(st.permutations(["final", "corrected"]), values, values)
def test_final_and_correction_commute(order, final_value, corrected_value):
    value_of = {"final": final_value, "corrected": corrected_value}
    history: list = []
    for status in order:
        deliver(history, incoming(f"m-{status}", status, value_of[status]))
    state = fold_result(history)
    assert (state.status, state.effective.creatinine_mg_dl) == ("corrected", corrected_value)


@given(st.sets(st.sampled_from(["preliminary", "final", "corrected"]), min_size=1).flatmap(
    lambda present: st.permutations(sorted(present))), values)
def test_effective_value_is_independent_of_arrival_order(order, base):
    value_of = {"preliminary": base + 0.1, "final": base + 0.2, "corrected": base + 0.3}
    history: list = []
    for status in order:
        deliver(history, incoming(f"m-{status}", status, value_of[status]))
    best = max(order, key=RANK.get)
    state = fold_result(history)
    assert state.status == best
    assert state.effective.creatinine_mg_dl == value_of[best]
    assert state.effective.counted == (best != "preliminary")


arrivals = st.lists(
    st.tuples(st.sampled_from(["preliminary", "final", "corrected"]), values, st.booleans()),
    min_size=1, max_size=12,
)


@given(arrivals)
def test_effective_is_latest_of_highest_rank_and_duplicates_have_no_effect(sequence):
    history: list = []
    sent: list[IncomingResult] = []
    for number, (status, value, redeliver) in enumerate(sequence):
        if redeliver and sent:
            assert deliver(history, sent[number % len(sent)]) == []
            continue
        message = incoming(f"m{number}", status, value)
        sent.append(message)
        new = deliver(history, message)
        assert isinstance(new[0], LabResultRecorded)
    top = max(RANK[message.status] for message in sent)
    expected = [message for message in sent if RANK[message.status] == top][-1]
    state = fold_result(history)
    assert state.effective.creatinine_mg_dl == expected.value
    assert state.effective.status == expected.status
    assert state.seen_message_ids == {message.message_id for message in sent}
    # Readers keep the latest EgfrComputed: it is the fold's effective value.
    assert [event for event in history if isinstance(event, EgfrComputed)][-1] == state.effective
    # A correction event is always followed by the corrected EgfrComputed it announces.
    for position, event in enumerate(history):
        if isinstance(event, LabResultCorrected):
            following = history[position + 1]
            assert isinstance(following, EgfrComputed) and following.status == "corrected"
            assert following.creatinine_mg_dl == event.new_value
    # Re-deciding everything already seen, in any order, changes nothing.
    for message in reversed(sent):
        assert decide_result(state, message, PATIENT, now=NOW) == []
