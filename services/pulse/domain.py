"""Pulse administration domain: the "pulse course" aggregate (one stream per subject), a decider.

A methylprednisolone pulse cycle is three daily intravenous doses on consecutive days, up to
17 cycles, each dose at most 1000 mg and 20–30 mg/kg. A dose that was given is a *fact*: it is
always recorded, and every protocol rule it breaks adds a ``ProtocolDeviationDetected`` after
it, so that outcomes can be analysed per protocol and intention-to-treat alike.

Pure functions only; the adapter passes in what it learned from enrollment as a
:class:`KnownPatient` (None when the subject was never enrolled).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.deviations import DeviationCode, ProtocolDeviationDetected
from contracts.pulse import PulseDoseAdministered
from services.clinical.patients import KnownPatient
from shared.clinical_dates import check_clinical_date
from shared.errors import Conflict, Invalid, NotFound
from shared.events import DomainEvent

MAX_DAILY_DOSE_MG = 1000.0
MIN_MG_PER_KG = 20.0
MAX_MG_PER_KG = 30.0
MAX_CYCLES = 17


class AdministerPulseDose(BaseModel):
    """``POST /v1/patients/{subject_id}/pulse-doses`` (the subject id comes from the path).

    Only shape is checked here; doses outside the protocol are accepted and flagged, because
    refusing them would lose the record of what the patient actually received.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    cycle: int = Field(ge=1)
    day: Literal[1, 2, 3]
    given_on: date
    dose_mg: float = Field(gt=0)
    weight_kg: float = Field(gt=0)


@dataclass(frozen=True)
class PulseCourse:
    """Every dose recorded for one subject and the deviations found, in recording order."""

    subject_id: str | None = None
    doses: tuple[PulseDoseAdministered, ...] = ()
    deviations: tuple[ProtocolDeviationDetected, ...] = ()

    def doses_of_cycle(self, cycle: int) -> list[PulseDoseAdministered]:
        return [d for d in self.doses if d.cycle == cycle]


INITIAL_STATE = PulseCourse()


def evolve(state: PulseCourse, event: DomainEvent) -> PulseCourse:
    """Apply one event. Events this aggregate does not track leave the state unchanged."""
    match event:
        case PulseDoseAdministered():
            return replace(state, subject_id=event.subject_id, doses=(*state.doses, event))
        case ProtocolDeviationDetected():
            return replace(state, deviations=(*state.deviations, event))
    return state


def fold(events: Iterable[DomainEvent]) -> PulseCourse:
    """Rebuild a pulse course from its stream, oldest event first."""
    state = INITIAL_STATE
    for event in events:
        state = evolve(state, event)
    return state


def decide_administer_pulse_dose(
    state: PulseCourse, command: AdministerPulseDose, patient: KnownPatient | None, subject_id: str, *, today: date
) -> list[DomainEvent]:
    """Record a dose, then one deviation per protocol rule it breaks.

    Refused only when the dose cannot be about this study's treatment: a date outside the
    clinical bounds (:mod:`shared.clinical_dates`), unknown subject (404), a control-group
    patient or a date before enrollment (422), or an exact repeat of a dose
    already recorded (409) — the same cycle, day, date, dose and weight is taken to be a
    client's retry, and recording it twice would double the patient's exposure in the data.
    A *different* dose for an already recorded cycle day is a fact and is recorded, flagged
    ``CYCLE_DAY_REPEATED``.
    """
    check_clinical_date("given_on", command.given_on, today=today)
    if patient is None:
        raise NotFound(f"no patient is enrolled with subject id {subject_id}")
    if patient.group == "control":
        raise Invalid(f"{subject_id} is in the control group, which receives no methylprednisolone pulses")
    if command.given_on < patient.enrolled_on:
        raise Invalid(f"dose given on {command.given_on} is before enrollment on {patient.enrolled_on}")
    dose = PulseDoseAdministered(
        subject_id=subject_id, **command.model_dump(), mg_per_kg=command.dose_mg / command.weight_kg
    )
    if any(_same_dose(dose, recorded) for recorded in state.doses):
        raise Conflict(
            f"cycle {dose.cycle} day {dose.day} on {dose.given_on} ({_num(dose.dose_mg)} mg) is already recorded"
        )
    return [dose, *(_deviation(dose, code, detail) for code, detail in _rule_breaks(state, dose))]


def _same_dose(a: PulseDoseAdministered, b: PulseDoseAdministered) -> bool:
    return a.model_dump(exclude={"mg_per_kg"}) == b.model_dump(exclude={"mg_per_kg"})


Finding = tuple[DeviationCode, str] | None
"""A broken rule's deviation code and detail, or None when the rule holds."""


def _rule_breaks(state: PulseCourse, dose: PulseDoseAdministered) -> list[tuple[DeviationCode, str]]:
    """Every protocol rule ``dose`` breaks, given the doses already recorded, with its detail,
    in the order :class:`DeviationCode` declares them (so consumers see a stable order)."""
    checks = (
        _daily_max,
        _mg_per_kg_range,
        _consecutive_days,
        _repeated_day,
        _cycle_order,
        _cycle_limit,
    )
    return [broken for check in checks if (broken := check(state, dose)) is not None]


def _daily_max(_: PulseCourse, dose: PulseDoseAdministered) -> Finding:
    if dose.dose_mg > MAX_DAILY_DOSE_MG:
        return (
            DeviationCode.DOSE_ABOVE_DAILY_MAX,
            f"{_num(dose.dose_mg)} mg exceeds the {_num(MAX_DAILY_DOSE_MG)} mg/day maximum",
        )
    return None


def _mg_per_kg_range(_: PulseCourse, dose: PulseDoseAdministered) -> Finding:
    if not MIN_MG_PER_KG <= dose.mg_per_kg <= MAX_MG_PER_KG:
        return (
            DeviationCode.DOSE_OUTSIDE_MG_PER_KG,
            f"{_num(dose.mg_per_kg)} mg/kg ({_num(dose.dose_mg)} mg for {_num(dose.weight_kg)} kg) is outside "
            f"the {_num(MIN_MG_PER_KG)}–{_num(MAX_MG_PER_KG)} mg/kg/day range",
        )
    return None


def _repeated_day(state: PulseCourse, dose: PulseDoseAdministered) -> Finding:
    earlier = next((d for d in state.doses_of_cycle(dose.cycle) if d.day == dose.day), None)
    if earlier is not None:
        return (
            DeviationCode.CYCLE_DAY_REPEATED,
            f"cycle {dose.cycle} day {dose.day} was already given on {earlier.given_on}; "
            f"this is a second dose for the same day",
        )
    return None


def _consecutive_days(state: PulseCourse, dose: PulseDoseAdministered) -> Finding:
    """Day d of a cycle falls on day 1's date + (d - 1); checked against every other recorded
    day of the cycle, so the order in which doses are recorded does not matter."""
    for other in state.doses_of_cycle(dose.cycle):
        if other.day == dose.day:
            continue
        expected = other.given_on + timedelta(days=dose.day - other.day)
        if dose.given_on != expected:
            return (
                DeviationCode.CYCLE_DAYS_NOT_CONSECUTIVE,
                f"cycle {dose.cycle} day {dose.day} was given on {dose.given_on} but day {other.day} "
                f"on {other.given_on}, so day {dose.day} was due on {expected}",
            )
    return None


def _cycle_order(state: PulseCourse, dose: PulseDoseAdministered) -> Finding:
    """A cycle starts only after the previous one ended. Checked both ways, so that a dose of an
    earlier cycle recorded late is flagged when it falls on or after a later cycle's start."""
    for other in state.doses:
        if other.cycle < dose.cycle and dose.given_on <= other.given_on:
            earlier, later = other, dose
        elif other.cycle > dose.cycle and dose.given_on >= other.given_on:
            earlier, later = dose, other
        else:
            continue
        return (
            DeviationCode.CYCLE_STARTED_BEFORE_PREVIOUS_ENDED,
            f"cycle {later.cycle} has a dose on {later.given_on}, on or before cycle {earlier.cycle}'s dose "
            f"on {earlier.given_on}: cycle {later.cycle} started before cycle {earlier.cycle} ended",
        )
    return None


def _cycle_limit(_: PulseCourse, dose: PulseDoseAdministered) -> Finding:
    if dose.cycle > MAX_CYCLES:
        return (
            DeviationCode.TOO_MANY_CYCLES,
            f"cycle {dose.cycle} exceeds the protocol maximum of {MAX_CYCLES} cycles",
        )
    return None


def _deviation(dose: PulseDoseAdministered, code: DeviationCode, detail: str) -> ProtocolDeviationDetected:
    return ProtocolDeviationDetected(
        subject_id=dose.subject_id, code=code, detail=detail, occurred_on=dose.given_on, cycle=dose.cycle, day=dose.day
    )


def _num(value: float) -> str:
    """A number as people write it in a reason: ``1200``, ``61.5``, ``19.51``."""
    return f"{round(value, 2):g}"


# --------------------------------------------------------------------------- read model


class CycleDose(BaseModel):
    model_config = ConfigDict(frozen=True)

    day: int
    given_on: date
    dose_mg: float
    weight_kg: float
    mg_per_kg: float


class Deviation(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: DeviationCode
    detail: str
    occurred_on: date
    day: int | None


class Cycle(BaseModel):
    model_config = ConfigDict(frozen=True)

    cycle: int
    days: list[CycleDose]
    total_mg: float
    deviations: list[Deviation]


class PulseCycles(BaseModel):
    """``GET /v1/patients/{subject_id}/pulse-cycles``: cycles in number order, days in day order."""

    model_config = ConfigDict(frozen=True)

    subject_id: str | None
    cycles_count: int
    doses_count: int
    total_mg: float
    deviations_count: int
    cycles: list[Cycle]


def cycles(state: PulseCourse) -> PulseCycles:
    """The course grouped by cycle. ``subject_id`` is None when no dose is recorded yet."""
    numbers = sorted({d.cycle for d in state.doses})
    per_cycle = [_cycle_view(state, n) for n in numbers]
    return PulseCycles(
        subject_id=state.subject_id,
        cycles_count=len(per_cycle),
        doses_count=len(state.doses),
        total_mg=sum(d.dose_mg for d in state.doses),
        deviations_count=len(state.deviations),
        cycles=per_cycle,
    )


def _cycle_view(state: PulseCourse, number: int) -> Cycle:
    doses = sorted(state.doses_of_cycle(number), key=lambda d: (d.day, d.given_on))
    return Cycle(
        cycle=number,
        days=[CycleDose(**d.model_dump(include=set(CycleDose.model_fields))) for d in doses],
        total_mg=sum(d.dose_mg for d in doses),
        deviations=[
            Deviation(code=v.code, detail=v.detail, occurred_on=v.occurred_on, day=v.day)
            for v in state.deviations
            if v.cycle == number
        ],
    )
