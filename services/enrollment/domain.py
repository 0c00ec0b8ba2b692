"""Enrollment domain: the "patient" aggregate (one stream per subject id), as a decider.

Pure functions only (no I/O, no clock): ``decide_*`` turn a command and the current state into
new events or raise a :mod:`shared.errors` refusal; ``evolve``/``fold`` rebuild the state from
events. The adapter loads the stream, folds it, decides, and appends what was decided.

Commands are frozen pydantic models that are also the HTTP request bodies, so their field names
are the contract's JSON names and their field-level validation (types, ranges) lives on them;
rules that need the state or several fields live in the ``decide_*`` functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contracts.enrollment import (
    TREATMENT_RELATED_CAUSALITIES,
    AdverseEventOutcome,
    AdverseEventReported,
    AdverseEventUpdated,
    BiopsyRecorded,
    Causality,
    CtcaeGrade,
    DialysisStarted,
    Group,
    Intervention,
    KidneyTransplanted,
    LeeGrade,
    OxfordMestC,
    PatientDataErased,
    PatientDied,
    PatientEnrolled,
    PatientWithdrawn,
    Sex,
)
from shared.clinical_dates import check_clinical_date
from shared.errors import Conflict, Invalid, NotFound
from shared.events import DomainEvent
from shared.personal_data import check_pseudonym

GROUP_A_MAX_EGFR = 45.0
"""Group A is CKD G3b–G5: baseline eGFR strictly below 45 mL/min/1.73m²."""

GROUP_B_LEE_GRADES: frozenset[str] = frozenset({"IV", "V"})
"""Group B is histologically severe disease: Lee grade IV or V."""

ClinicalEventType = Literal["dialysis_started", "kidney_transplant", "death", "withdrawn"]
IgaImmunofluorescence = Literal["negative", "trace", "1+", "2+", "3+"]
PatientStatus = Literal["active", "withdrawn", "deceased"]

_CLINICAL_EVENT_TYPES: dict[ClinicalEventType, type[DialysisStarted | KidneyTransplanted | PatientDied | PatientWithdrawn]] = {
    "dialysis_started": DialysisStarted,
    "kidney_transplant": KidneyTransplanted,
    "death": PatientDied,
    "withdrawn": PatientWithdrawn,
}
_TYPE_OF_CLINICAL_EVENT = {model: name for name, model in _CLINICAL_EVENT_TYPES.items()}


# --------------------------------------------------------------------------- commands


class _Command(BaseModel):
    # Unknown fields are refused so that a misspelt optional field is not silently dropped, and
    # NaN/Infinity are refused because no clinical measurement can take those values.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class EnrollPatient(_Command):
    """``POST /v1/patients``. ``subject_id`` is checked by :func:`check_pseudonym` in the decider
    (not here) so the refusal carries a specific reason instead of a generic validation error."""

    subject_id: str
    sex: Sex
    age_years: int = Field(ge=0, le=120, description="age at enrollment, whole years")
    weight_kg: float = Field(gt=0)
    group: Group
    enrolled_on: date
    baseline_egfr: float | None = Field(default=None, gt=0, description="mL/min/1.73m²")
    lee_grade: LeeGrade | None = None
    mest_c: OxfordMestC | None = None


class RecordClinicalEvent(_Command):
    """``POST /v1/patients/{subject_id}/events`` (the subject id comes from the path)."""

    type: ClinicalEventType
    on: date


class RecordBiopsy(_Command):
    """Follow-up biopsy findings (the subject id comes from the path)."""

    performed_on: date
    mesangial_deposits: bool | None = None
    iga_immunofluorescence: IgaImmunofluorescence | None = None
    mesangial_proliferation: bool | None = None
    foot_process_effacement: bool | None = None
    lee_grade: LeeGrade | None = None


class ReportAdverseEvent(_Command):
    """``PUT /v1/patients/{subject_id}/adverse-events/{ae_id}``: an adverse event as the site now
    reports it (CTCAE v5 grade; relatedness to each intervention and its causality)."""

    term: str = Field(min_length=1, max_length=200, description="the event as reported, e.g. hyperglycaemia")
    onset_on: date
    grade: CtcaeGrade
    serious: bool
    related_to: tuple[Intervention, ...] = ()
    causality: Causality
    outcome: AdverseEventOutcome
    resolved_on: date | None = None

    @field_validator("related_to")
    @classmethod
    def _as_a_set(cls, value: tuple[Intervention, ...]) -> tuple[Intervention, ...]:
        """A set in a fixed order, so a resend listing the same interventions otherwise is no change."""
        return tuple(sorted(set(value)))


# --------------------------------------------------------------------------- state


class ClinicalEvent(BaseModel):
    """A dated clinical event under its contract ``type`` name (in the state and the view)."""

    model_config = ConfigDict(frozen=True)

    type: ClinicalEventType
    on: date


class AdverseEvent(ReportAdverseEvent):
    """An adverse event as it stands: its latest report, under its id."""

    ae_id: str

    @property
    def treatment_related(self) -> bool:
        """Related to an intervention it names, with a possible, probable or definite causality."""
        return bool(self.related_to) and self.causality in TREATMENT_RELATED_CAUSALITIES


@dataclass(frozen=True)
class PatientState:
    """What enrollment knows about one subject. ``enrollment`` is None until they are enrolled."""

    enrollment: PatientEnrolled | None = None
    clinical_events: tuple[ClinicalEvent, ...] = ()
    biopsies: tuple[BiopsyRecorded, ...] = ()
    adverse_events: tuple[AdverseEvent, ...] = ()
    """The latest report of each adverse event, in the order they were first reported."""

    def adverse_event(self, ae_id: str) -> AdverseEvent | None:
        return next((ae for ae in self.adverse_events if ae.ae_id == ae_id), None)

    def event_on(self, type_: ClinicalEventType) -> date | None:
        """Date of the clinical event of this type, if recorded (each type happens at most once)."""
        return next((e.on for e in self.clinical_events if e.type == type_), None)

    @property
    def status(self) -> PatientStatus:
        if self.event_on("death") is not None:
            return "deceased"
        if self.event_on("withdrawn") is not None:
            return "withdrawn"
        return "active"

    def latest_recorded_date(self) -> date | None:
        """The latest date of anything recorded after enrollment (clinical events, biopsies, adverse
        events' onsets and resolutions)."""
        dates = [e.on for e in self.clinical_events] + [b.performed_on for b in self.biopsies]
        dates += [d for ae in self.adverse_events for d in (ae.onset_on, ae.resolved_on) if d is not None]
        return max(dates, default=None)


INITIAL_STATE = PatientState()


def evolve(state: PatientState, event: DomainEvent) -> PatientState:
    """Apply one event. Events this aggregate does not track leave the state unchanged."""
    match event:
        case PatientEnrolled():
            return replace(state, enrollment=event)
        case DialysisStarted() | KidneyTransplanted() | PatientDied() | PatientWithdrawn():
            recorded = ClinicalEvent(type=_TYPE_OF_CLINICAL_EVENT[type(event)], on=event.on)
            return replace(state, clinical_events=(*state.clinical_events, recorded))
        case BiopsyRecorded():
            return replace(state, biopsies=(*state.biopsies, event))
        case AdverseEventReported() | AdverseEventUpdated():
            report = AdverseEvent(**event.model_dump(exclude={"subject_id"}))
            if state.adverse_event(report.ae_id) is None:
                return replace(state, adverse_events=(*state.adverse_events, report))
            return replace(state, adverse_events=tuple(
                report if ae.ae_id == report.ae_id else ae for ae in state.adverse_events))
    return state


def fold(events: Iterable[DomainEvent]) -> PatientState:
    """Rebuild a patient from their stream, oldest event first."""
    state = INITIAL_STATE
    for event in events:
        state = evolve(state, event)
    return state


# --------------------------------------------------------------------------- deciders


def decide_enroll_patient(state: PatientState, command: EnrollPatient, *, today: date) -> list[DomainEvent]:
    """Enroll a subject once, on a plausible date, into a group whose eligibility criteria they meet."""
    check_clinical_date("enrolled_on", command.enrolled_on, today=today)
    check_pseudonym(command.subject_id)
    if state.enrollment is not None:
        raise Conflict(
            f"subject {command.subject_id} is already enrolled "
            f"(group {state.enrollment.group}, on {state.enrollment.enrolled_on})"
        )
    _check_eligibility(command)
    return [PatientEnrolled.model_validate(command.model_dump())]


def _check_eligibility(command: EnrollPatient) -> None:
    """Group A is advanced CKD (eGFR < 45, G3b–G5); group B is Lee grade IV–V; control: no criteria."""
    if command.group == "A":
        if command.baseline_egfr is None:
            raise Invalid("group A requires a baseline eGFR below 45 mL/min/1.73m² (CKD G3b–G5); none was given")
        if command.baseline_egfr >= GROUP_A_MAX_EGFR:
            raise Invalid(
                f"group A requires a baseline eGFR below 45 mL/min/1.73m² (CKD G3b–G5); "
                f"{command.baseline_egfr:g} is not"
            )
    elif command.group == "B" and command.lee_grade not in GROUP_B_LEE_GRADES:
        given = f"Lee grade {command.lee_grade}" if command.lee_grade else "no Lee grade"
        raise Invalid(f"group B requires Lee grade IV or V; {given} was given")


def decide_record_clinical_event(
    state: PatientState, command: RecordClinicalEvent, subject_id: str, *, today: date
) -> list[DomainEvent]:
    """Record dialysis start, transplant, death or withdrawal, each at most once.

    After death nothing more can be recorded. After withdrawal only death may still be
    recorded: withdrawing consent stops study procedures, but vital status is still ascertained
    (e.g. from registries) in most studies, and survival analyses need it. A death date may not
    precede anything already recorded about the patient, because nothing happens after death.
    """
    check_clinical_date(f"{command.type} on", command.on, today=today)
    enrollment = _enrolled(state, subject_id)
    existing = state.event_on(command.type)
    if existing is not None:
        raise Conflict(f"{command.type} is already recorded for {subject_id} (on {existing})")
    died_on = state.event_on("death")
    if died_on is not None:
        raise Conflict(f"{subject_id} died on {died_on}; nothing more can be recorded")
    withdrawn_on = state.event_on("withdrawn")
    if withdrawn_on is not None and command.type != "death":
        raise Conflict(f"{subject_id} withdrew on {withdrawn_on}; only death may still be recorded")
    if command.on < enrollment.enrolled_on:
        raise Invalid(f"{command.type} on {command.on} is before enrollment on {enrollment.enrolled_on}")
    latest = state.latest_recorded_date()
    if command.type == "death" and latest is not None and command.on < latest:
        raise Invalid(f"death on {command.on} precedes events already recorded for {subject_id} (latest on {latest})")
    return [_CLINICAL_EVENT_TYPES[command.type](subject_id=subject_id, on=command.on)]


def decide_record_biopsy(
    state: PatientState, command: RecordBiopsy, subject_id: str, *, today: date
) -> list[DomainEvent]:
    """Record a follow-up biopsy performed between enrollment and death or withdrawal.

    A biopsy performed before a withdrawal may still be recorded afterwards (data collected
    under consent are kept). One biopsy per date: a second one on the same date is taken to be
    a retried request and refused as a conflict rather than counted twice.
    """
    check_clinical_date("performed_on", command.performed_on, today=today)
    enrollment = _enrolled(state, subject_id)
    performed_on = command.performed_on
    if performed_on < enrollment.enrolled_on:
        raise Invalid(f"biopsy on {performed_on} is before enrollment on {enrollment.enrolled_on}")
    died_on = state.event_on("death")
    if died_on is not None and performed_on > died_on:
        raise Invalid(f"biopsy on {performed_on} is after {subject_id}'s death on {died_on}")
    withdrawn_on = state.event_on("withdrawn")
    if withdrawn_on is not None and performed_on > withdrawn_on:
        raise Invalid(f"biopsy on {performed_on} is after {subject_id} withdrew on {withdrawn_on}")
    if any(b.performed_on == performed_on for b in state.biopsies):
        raise Conflict(f"a biopsy on {performed_on} is already recorded for {subject_id}")
    return [BiopsyRecorded(subject_id=subject_id, **command.model_dump())]


def decide_report_adverse_event(
    state: PatientState, command: ReportAdverseEvent, subject_id: str, ae_id: str, *, today: date
) -> list[DomainEvent]:
    """The first report of ``ae_id`` (``AdverseEventReported``), a follow-up that changes it
    (``AdverseEventUpdated``: the whole report, which replaces the earlier one), or nothing when the
    report is what is recorded already (a resend).

    An adverse event follows the rules of the other records: its onset lies between enrollment
    and death or withdrawal (an event that began under consent may still be reported or followed
    up afterwards, as a biopsy may), and its resolution neither precedes its onset nor follows
    death. Grade 5 is death related to the event (CTCAE v5), so it goes with outcome ``fatal``
    and only with it.
    """
    check_clinical_date("onset_on", command.onset_on, today=today)
    if command.resolved_on is not None:
        check_clinical_date("resolved_on", command.resolved_on, today=today)
    enrollment = _enrolled(state, subject_id)
    if (command.grade == 5) != (command.outcome == "fatal"):
        raise Invalid(f"grade {command.grade} with outcome {command.outcome}: grade 5 (death related to the "
                      "adverse event, CTCAE v5) goes with outcome 'fatal', and only with it")
    if command.resolved_on is not None and command.resolved_on < command.onset_on:
        raise Invalid(f"resolved_on {command.resolved_on} is before onset_on {command.onset_on}")
    if command.onset_on < enrollment.enrolled_on:
        raise Invalid(f"onset_on {command.onset_on} is before enrollment on {enrollment.enrolled_on}")
    died_on = state.event_on("death")
    if died_on is not None:
        for field, on in (("onset_on", command.onset_on), ("resolved_on", command.resolved_on)):
            if on is not None and on > died_on:
                raise Invalid(f"{field} {on} is after {subject_id}'s death on {died_on}")
    withdrawn_on = state.event_on("withdrawn")
    if withdrawn_on is not None and command.onset_on > withdrawn_on:
        raise Invalid(f"onset_on {command.onset_on} is after {subject_id} withdrew on {withdrawn_on}")
    report = AdverseEvent(ae_id=ae_id, **command.model_dump())
    current = state.adverse_event(ae_id)
    if current == report:
        return []
    kind = AdverseEventReported if current is None else AdverseEventUpdated
    return [kind(subject_id=subject_id, **report.model_dump())]


def check_enrollable(command: EnrollPatient, *, today: date) -> None:
    """The checks of an enrollment that need no state: run before the patient's data key is
    created, so no key is ever made for an enrollment refused on its face (an implausible date, an
    id that could identify a person)."""
    check_clinical_date("enrolled_on", command.enrolled_on, today=today)
    check_pseudonym(command.subject_id)
    _check_eligibility(command)


def decide_erase_patient(state: PatientState, subject_id: str, today: date) -> list[DomainEvent]:
    """Erase the data of a patient who withdrew consent (``withdrawn`` recorded first).

    Erasure follows a withdrawal and never replaces it: the withdrawal is the recorded decision
    of the patient, the erasure what is done with their data afterwards. A patient still in the
    study (or who died without withdrawing) is refused, so a slip of the finger cannot destroy a
    participant's data. The caller handles a repeated erasure (idempotent) before deciding.
    """
    _enrolled(state, subject_id)
    if state.event_on("withdrawn") is None:
        raise Conflict(
            f"{subject_id} has not withdrawn consent: erasure is only possible after a withdrawal "
            "(record the event type 'withdrawn' first)"
        )
    return [PatientDataErased(subject_id=subject_id, erased_on=today)]


def _enrolled(state: PatientState, subject_id: str) -> PatientEnrolled:
    if state.enrollment is None:
        raise NotFound(f"no patient is enrolled with subject id {subject_id}")
    return state.enrollment


# --------------------------------------------------------------------------- read model


class Biopsy(RecordBiopsy):
    """A recorded biopsy as the patient view shows it: the findings the command carried."""


class PatientView(BaseModel):
    """``GET /v1/patients/{subject_id}`` on enrollment: the patient as enrollment knows them."""

    model_config = ConfigDict(frozen=True)

    subject_id: str
    sex: Sex
    age_years: int
    weight_kg: float
    group: Group
    enrolled_on: date
    baseline_egfr: float | None
    lee_grade: LeeGrade | None
    mest_c: OxfordMestC | None
    status: PatientStatus
    dialysis_started_on: date | None
    kidney_transplant_on: date | None
    died_on: date | None
    withdrawn_on: date | None
    clinical_events: list[ClinicalEvent]
    biopsies: list[Biopsy]
    adverse_events: list[AdverseEvent]


def patient_view(state: PatientState, subject_id: str) -> PatientView:
    """The serialisable view of an enrolled patient; NotFound if they were never enrolled."""
    enrollment = _enrolled(state, subject_id)
    return PatientView(
        **enrollment.model_dump(),
        status=state.status,
        dialysis_started_on=state.event_on("dialysis_started"),
        kidney_transplant_on=state.event_on("kidney_transplant"),
        died_on=state.event_on("death"),
        withdrawn_on=state.event_on("withdrawn"),
        clinical_events=list(state.clinical_events),
        biopsies=[Biopsy(**b.model_dump(exclude={"subject_id"})) for b in state.biopsies],
        adverse_events=list(state.adverse_events),
    )
