"""Pulse decider: a dose is always recorded; every broken protocol rule adds a deviation."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.deviations import DeviationCode, ProtocolDeviationDetected
from contracts.enrollment import PatientEnrolled
from contracts.pulse import PulseDoseAdministered
from services.pulse.domain import (
    INITIAL_STATE,
    AdministerPulseDose,
    KnownPatient,
    PulseCourse,
    cycles,
    decide_administer_pulse_dose,
    evolve,
    fold,
)
from shared.errors import Conflict, Invalid, NotFound
from shared.events import DomainEvent, registry

SUBJECT = "IGA-A-001"
ENROLLED_ON = date(2014, 3, 2)
PATIENT = KnownPatient(subject_id=SUBJECT, group="A", enrolled_on=ENROLLED_ON)
DAY_1 = date(2014, 3, 10)
TODAY = date(2026, 12, 5)


def dose(cycle: int = 1, day: int = 1, given_on: date = DAY_1, dose_mg: float = 1000, weight_kg: float = 40.0):
    return AdministerPulseDose(cycle=cycle, day=day, given_on=given_on, dose_mg=dose_mg, weight_kg=weight_kg)


def give(state: PulseCourse, command: AdministerPulseDose) -> tuple[PulseCourse, list[DomainEvent]]:
    events = decide_administer_pulse_dose(state, command, PATIENT, SUBJECT, today=TODAY)
    for event in events:
        state = evolve(state, event)
    return state, events


def course(*commands: AdministerPulseDose) -> PulseCourse:
    state = INITIAL_STATE
    for command in commands:
        state, _ = give(state, command)
    return state


def full_cycle(cycle: int, first_day: date) -> list[AdministerPulseDose]:
    return [dose(cycle, day, first_day + timedelta(days=day - 1)) for day in (1, 2, 3)]


def codes(events: list[DomainEvent]) -> list[DeviationCode]:
    return [e.code for e in events if isinstance(e, ProtocolDeviationDetected)]


# --------------------------------------------------------------------------- recording


def test_a_protocol_dose_is_recorded_without_deviation() -> None:
    _, events = give(INITIAL_STATE, dose(dose_mg=1000, weight_kg=40))
    assert events == [
        PulseDoseAdministered(
            subject_id=SUBJECT, cycle=1, day=1, given_on=DAY_1, dose_mg=1000, weight_kg=40, mg_per_kg=25.0
        )
    ]


def test_mg_per_kg_is_unrounded() -> None:
    _, events = give(INITIAL_STATE, dose(dose_mg=1000, weight_kg=61.5))
    assert events[0].mg_per_kg == 1000 / 61.5


def test_contract_example_command_reads_the_json() -> None:
    command = AdministerPulseDose.model_validate_json(
        '{"cycle": 1, "day": 1, "given_on": "2014-03-10", "dose_mg": 1000, "weight_kg": 61.5}'
    )
    assert command == dose(weight_kg=61.5)


def test_a_1_2_g_dose_is_recorded_and_flagged_above_the_daily_maximum() -> None:
    _, events = give(INITIAL_STATE, dose(dose_mg=1200, weight_kg=50))

    assert isinstance(events[0], PulseDoseAdministered) and events[0].dose_mg == 1200
    assert events[1:] == [
        ProtocolDeviationDetected(
            subject_id=SUBJECT,
            code=DeviationCode.DOSE_ABOVE_DAILY_MAX,
            detail="1200 mg exceeds the 1000 mg/day maximum",
            occurred_on=DAY_1,
            cycle=1,
            day=1,
        )
    ]


def test_a_1_2_g_dose_for_61_5_kg_is_also_below_20_mg_per_kg() -> None:
    _, events = give(INITIAL_STATE, dose(dose_mg=1200, weight_kg=61.5))
    assert codes(events) == [DeviationCode.DOSE_ABOVE_DAILY_MAX, DeviationCode.DOSE_OUTSIDE_MG_PER_KG]
    assert events[2].detail == "19.51 mg/kg (1200 mg for 61.5 kg) is outside the 20–30 mg/kg/day range"


@pytest.mark.parametrize(("dose_mg", "weight_kg", "flagged"), [(600, 30, False), (900, 30, False), (599, 30, True), (901, 30, True)])
def test_mg_per_kg_range_is_20_to_30_inclusive(dose_mg: float, weight_kg: float, flagged: bool) -> None:
    _, events = give(INITIAL_STATE, dose(dose_mg=dose_mg, weight_kg=weight_kg))
    assert (DeviationCode.DOSE_OUTSIDE_MG_PER_KG in codes(events)) is flagged


def test_1000_mg_is_within_the_daily_maximum() -> None:
    _, events = give(INITIAL_STATE, dose(dose_mg=1000, weight_kg=40))
    assert codes(events) == []


# --------------------------------------------------------------------------- cycles


def test_consecutive_days_are_not_flagged() -> None:
    state = course(*full_cycle(1, DAY_1))
    assert state.deviations == ()


def test_non_consecutive_cycle_is_recorded_and_flagged() -> None:
    state = course(dose(1, 1, DAY_1), dose(1, 2, DAY_1 + timedelta(days=1)))

    state, events = give(state, dose(1, 3, DAY_1 + timedelta(days=3)))

    assert len(state.doses) == 3
    assert codes(events) == [DeviationCode.CYCLE_DAYS_NOT_CONSECUTIVE]
    assert events[1].detail == (
        "cycle 1 day 3 was given on 2014-03-13 but day 1 on 2014-03-10, so day 3 was due on 2014-03-12"
    )
    assert (events[1].cycle, events[1].day, events[1].occurred_on) == (1, 3, date(2014, 3, 13))


def test_consecutiveness_is_checked_whatever_the_arrival_order() -> None:
    in_order = course(dose(1, 3, DAY_1 + timedelta(days=2)), dose(1, 1, DAY_1))
    assert in_order.deviations == ()

    _, events = give(course(dose(1, 3, DAY_1 + timedelta(days=3))), dose(1, 1, DAY_1))
    assert codes(events) == [DeviationCode.CYCLE_DAYS_NOT_CONSECUTIVE]


def test_a_day_recorded_twice_is_recorded_and_flagged() -> None:
    state = course(dose(1, 1, DAY_1))
    state, events = give(state, dose(1, 1, DAY_1, dose_mg=800))
    assert len(state.doses) == 2
    assert codes(events) == [DeviationCode.CYCLE_DAY_REPEATED]
    assert "already given on 2014-03-10" in events[1].detail


def test_an_exact_repeat_is_a_conflict_so_retries_do_not_double_record() -> None:
    state = course(dose(1, 1, DAY_1))
    with pytest.raises(Conflict, match="cycle 1 day 1 on 2014-03-10 \\(1000 mg\\) is already recorded"):
        give(state, dose(1, 1, DAY_1))


def test_a_cycle_starting_before_the_previous_ended_is_flagged() -> None:
    state = course(*full_cycle(1, DAY_1))
    _, events = give(state, dose(2, 1, DAY_1 + timedelta(days=2)))
    assert codes(events) == [DeviationCode.CYCLE_STARTED_BEFORE_PREVIOUS_ENDED]
    assert events[1].detail == (
        "cycle 2 has a dose on 2014-03-12, on or before cycle 1's dose on 2014-03-12: "
        "cycle 2 started before cycle 1 ended"
    )


def test_a_cycle_starting_the_day_after_the_previous_ended_is_not_flagged() -> None:
    state = course(*full_cycle(1, DAY_1), *full_cycle(2, DAY_1 + timedelta(days=3)))
    assert state.deviations == ()


def test_an_earlier_cycle_recorded_late_is_flagged_when_it_overlaps() -> None:
    state = course(*full_cycle(2, DAY_1 + timedelta(days=28)))
    _, events = give(state, dose(1, 1, DAY_1 + timedelta(days=28)))
    assert codes(events) == [DeviationCode.CYCLE_STARTED_BEFORE_PREVIOUS_ENDED]


def test_cycle_18_exceeds_the_maximum() -> None:
    _, events = give(course(), dose(cycle=18))
    assert codes(events) == [DeviationCode.TOO_MANY_CYCLES]
    assert events[1].detail == "cycle 18 exceeds the protocol maximum of 17 cycles"
    assert codes(give(course(), dose(cycle=17))[1]) == []


# --------------------------------------------------------------------------- refusals


def test_unknown_patient_is_not_found() -> None:
    with pytest.raises(NotFound, match="IGA-X-9"):
        decide_administer_pulse_dose(INITIAL_STATE, dose(), None, "IGA-X-9", today=TODAY)


def test_control_patients_receive_no_pulses() -> None:
    control = KnownPatient(subject_id="CTRL-01", group="control", enrolled_on=ENROLLED_ON)
    with pytest.raises(Invalid, match="control group"):
        decide_administer_pulse_dose(INITIAL_STATE, dose(), control, "CTRL-01", today=TODAY)


def test_dose_before_enrollment_is_invalid() -> None:
    with pytest.raises(Invalid, match="before enrollment on 2014-03-02"):
        give(INITIAL_STATE, dose(given_on=ENROLLED_ON - timedelta(days=1)))


@pytest.mark.parametrize(
    "fields",
    [{"cycle": 0}, {"day": 4}, {"day": 0}, {"dose_mg": 0}, {"weight_kg": -1}, {"dose_mg": float("inf")}, {"extra": 1}],
)
def test_malformed_doses_are_refused_by_the_command(fields: dict[str, object]) -> None:
    body = {"cycle": 1, "day": 1, "given_on": "2014-03-10", "dose_mg": 1000, "weight_kg": 61.5} | fields
    with pytest.raises(ValidationError):
        AdministerPulseDose.model_validate(body)


def test_known_patient_is_learned_from_the_enrollment_event() -> None:
    enrolled = PatientEnrolled(
        subject_id=SUBJECT, sex="F", age_years=58, weight_kg=61.5, group="A", enrolled_on=ENROLLED_ON
    )
    assert KnownPatient.from_enrolled(enrolled) == PATIENT


# --------------------------------------------------------------------------- read model


def test_cycles_read_model_groups_doses_and_deviations_by_cycle() -> None:
    state = course(
        *full_cycle(1, DAY_1),
        dose(2, 2, DAY_1 + timedelta(days=31), dose_mg=1200, weight_kg=50),
        dose(2, 1, DAY_1 + timedelta(days=30)),
    )

    view = cycles(state)

    assert (view.subject_id, view.cycles_count, view.doses_count, view.total_mg) == (SUBJECT, 2, 5, 5200)
    assert [c.cycle for c in view.cycles] == [1, 2]
    assert [d.day for d in view.cycles[1].days] == [1, 2]
    assert view.cycles[1].total_mg == 2200
    assert view.cycles[0].deviations == []
    assert [(v.code, v.day) for v in view.cycles[1].deviations] == [(DeviationCode.DOSE_ABOVE_DAILY_MAX, 2)]
    assert view.cycles[0].days[0].model_dump(mode="json") == {
        "day": 1,
        "given_on": "2014-03-10",
        "dose_mg": 1000.0,
        "weight_kg": 40.0,
        "mg_per_kg": 25.0,
    }


def test_cycles_of_an_empty_course() -> None:
    view = cycles(INITIAL_STATE)
    assert (view.subject_id, view.cycles_count, view.total_mg, view.cycles) == (None, 0, 0, [])


# --------------------------------------------------------------------------- properties

dose_commands = st.builds(
    AdministerPulseDose,
    cycle=st.integers(min_value=1, max_value=19),
    day=st.sampled_from([1, 2, 3]),
    given_on=st.integers(min_value=0, max_value=40).map(lambda n: DAY_1 + timedelta(days=n)),
    dose_mg=st.sampled_from([250.0, 500.0, 750.0, 1000.0, 1200.0, 1500.0]) | st.floats(min_value=1, max_value=2000),
    weight_kg=st.sampled_from([25.0, 40.0, 50.0, 61.5]) | st.floats(min_value=20, max_value=150),
)


def expected_codes(prior: list[PulseDoseAdministered], c: AdministerPulseDose) -> set[DeviationCode]:
    """The protocol, stated independently of the decider, against the doses recorded before."""
    same_cycle = [p for p in prior if p.cycle == c.cycle]
    broken = {
        DeviationCode.DOSE_ABOVE_DAILY_MAX: c.dose_mg > 1000,
        DeviationCode.DOSE_OUTSIDE_MG_PER_KG: not 20 <= c.dose_mg / c.weight_kg <= 30,
        DeviationCode.CYCLE_DAY_REPEATED: any(p.day == c.day for p in same_cycle),
        DeviationCode.CYCLE_DAYS_NOT_CONSECUTIVE: any(
            (c.given_on - p.given_on).days != c.day - p.day for p in same_cycle if p.day != c.day
        ),
        DeviationCode.CYCLE_STARTED_BEFORE_PREVIOUS_ENDED: any(
            (p.cycle < c.cycle and p.given_on >= c.given_on) or (p.cycle > c.cycle and p.given_on <= c.given_on)
            for p in prior
        ),
        DeviationCode.TOO_MANY_CYCLES: c.cycle > 17,
    }
    return {code for code, is_broken in broken.items() if is_broken}


@settings(deadline=None)
@given(st.lists(dose_commands, max_size=25))
def test_every_dose_is_recorded_once_and_flagged_iff_it_breaks_a_rule(commands: list[AdministerPulseDose]) -> None:
    state = INITIAL_STATE
    for command in commands:
        try:
            new_state, events = give(state, command)
        except Conflict:
            assert any(
                (d.cycle, d.day, d.given_on, d.dose_mg, d.weight_kg)
                == (command.cycle, command.day, command.given_on, command.dose_mg, command.weight_kg)
                for d in state.doses
            )
            continue
        recorded, *deviations = events
        assert isinstance(recorded, PulseDoseAdministered)
        assert recorded.model_dump(include=set(AdministerPulseDose.model_fields)) == command.model_dump()
        assert recorded.mg_per_kg == command.dose_mg / command.weight_kg
        assert all(isinstance(d, ProtocolDeviationDetected) for d in deviations)
        assert [d.code for d in deviations] == sorted(
            expected_codes(list(state.doses), command), key=list(DeviationCode).index
        )
        assert all((d.cycle, d.day, d.occurred_on) == (command.cycle, command.day, command.given_on) for d in deviations)
        state = new_state
    assert len(state.doses) == len({(d.cycle, d.day, d.given_on, d.dose_mg, d.weight_kg) for d in state.doses})


@settings(deadline=None)
@given(
    st.permutations([1, 2, 3]),
    st.lists(st.integers(min_value=-2, max_value=4), min_size=3, max_size=3),
)
def test_a_complete_cycle_is_flagged_not_consecutive_iff_its_dates_are_not(
    arrival: list[int], offsets: list[int]
) -> None:
    """Whatever order the three days arrive in, the cycle is flagged iff day d ≠ day 1 + (d - 1)."""
    dates = {day: DAY_1 + timedelta(days=offset) for day, offset in zip((1, 2, 3), offsets, strict=True)}
    state = course(*(dose(1, day, dates[day]) for day in arrival))

    consecutive = all(dates[d] == dates[1] + timedelta(days=d - 1) for d in (2, 3))
    flagged = any(v.code == DeviationCode.CYCLE_DAYS_NOT_CONSECUTIVE for v in state.deviations)
    assert flagged is not consecutive


@settings(deadline=None)
@given(st.lists(dose_commands, max_size=25))
def test_replaying_the_stored_events_rebuilds_the_same_course(commands: list[AdministerPulseDose]) -> None:
    state, history = INITIAL_STATE, []
    for command in commands:
        try:
            state, events = give(state, command)
        except Conflict:
            continue
        history += events

    stored = [registry.decode(e.event_type, e.schema_version, e.model_dump(mode="json")) for e in history]

    assert fold(history) == state
    assert fold(stored) == state
    assert cycles(fold(stored)) == cycles(state)
    assert cycles(state).total_mg == pytest.approx(sum(c.dose_mg for c in state.doses))
    assert sum(len(c.deviations) for c in cycles(state).cycles) == len(state.deviations)
