"""Per-patient outcome values, computed from the facts other services publish.

Why facts first and values second: events reach the outcomes service from four services over
a broker, so they arrive in any order (a lab result can come before the first pulse dose is
known). ``apply`` therefore only *records* facts — sets and per-key replacements, which commute
— and ``compute_outcome`` derives every contract value from the whole set of facts each time.
Nothing is computed incrementally, so the outcome never depends on arrival order.

Why sets: the broker delivers at least once. Recording a fact as a member of a frozenset makes
a redelivered event a no-op instead of a second dose or a second infusion.

Definitions (contract, "Outcome statistics" and "Outcome statistics (v2)"): dates are UTC
calendar dates, years are days / 365.25, nothing is rounded. The v2 values (proteinuria,
paired biopsies, kidney endpoints, safety) are the pure functions of ``evidence.py`` and
``endpoints.py``, filled here from the same facts.
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_left, insort
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime
from operator import attrgetter
from typing import Any, ClassVar, Generic, Literal, TypeVar, overload

from pydantic import AwareDatetime, BaseModel, ConfigDict

from contracts.cells import CellsInfused
from contracts.deviations import ProtocolDeviationDetected
from contracts.enrollment import (
    AdverseEventReported,
    AdverseEventUpdated,
    BiopsyRecorded,
    DialysisStarted,
    Group,
    KidneyTransplanted,
    LeeGrade,
    PatientDied,
    PatientEnrolled,
    PatientWithdrawn,
    Sex,
)
from contracts.labs import EgfrComputed, Source, Status, UrineAnalyte, UrineResultMeasured, UrineUnit
from contracts.pulse import PulseDoseAdministered
from services.outcomes import endpoints, evidence
from services.outcomes.endpoints import EndpointKind
from services.outcomes.measurements import Measurement, years_between
from shared.events import DomainEvent

_Value = TypeVar("_Value")
_COUNTED = attrgetter("counted")
_ORDER_KEY = attrgetter("order_key")


class _Derived(Generic[_Value]):
    """A value an ``EgfrPoint`` derives from its fields — with its other derived values, on the
    first access of any — and keeps in its ``__dict__``, which answers from then on. The live
    projection keeps a patient's points between batches and computes their outcome with every
    batch; a rebuild makes fresh points at each checkpoint, where ``functools.cached_property``
    (a lock on every first access in Python 3.11, once per value) showed. Frozen models only."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _Derived[_Value]: ...
    @overload
    def __get__(self, instance: EgfrPoint, owner: type | None = None) -> _Value: ...
    def __get__(self, instance: EgfrPoint | None, owner: type | None = None) -> _Value | _Derived[_Value]:
        if instance is None:
            return self
        derived = instance.derive()
        instance.__dict__.update(derived)
        return derived[self.name]  # type: ignore[no-any-return]


class EgfrPoint(BaseModel):
    """The effective eGFR of one lab result id, as the labs service last published it."""

    model_config = ConfigDict(frozen=True, extra="forbid", ignored_types=(_Derived,))

    result_id: str
    egfr: float
    collected_at: AwareDatetime
    status: Status
    counted: bool
    source: Source
    derived_from: Literal["creatinine", "reported"]

    collected_on: ClassVar[_Derived[date]] = _Derived()
    """The UTC calendar date: the contract compares dates, never times of day."""
    order_key: ClassVar[_Derived[tuple[datetime, str]]] = _Derived()
    """The order of "latest": collection time, then (for equal times) the result id, so the
    choice is deterministic whatever order the results arrived in."""
    measurement: ClassVar[_Derived[Measurement]] = _Derived()
    """As the v2 definitions read a counted value (endpoints, slopes)."""

    def derive(self) -> dict[str, Any]:
        """The derived values above, by name."""
        day = self.collected_at.astimezone(UTC).date()
        return {"collected_on": day, "order_key": (self.collected_at, self.result_id),
                "measurement": Measurement(self.result_id, self.egfr, self.collected_at, day)}


class UrinePoint(BaseModel):
    """The effective value of one urine result id (UPCR, 24-hour protein or UACR), in the unit
    labs keeps the analyte in (UPCR g/g), as the labs service last published it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    result_id: str
    analyte: UrineAnalyte
    value: float
    unit: UrineUnit
    loinc: str
    collected_at: AwareDatetime
    status: Status
    counted: bool
    source: Source


class PatientFacts(BaseModel):
    """Everything the outcomes service knows about one patient, as recorded facts.

    Enrollment fields stay ``None`` until ``PatientEnrolled`` arrives, because other services'
    events may arrive first. Serialisable with ``model_dump(mode="json")`` /
    ``model_validate`` so an adapter can store it as a projection row.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject_id: str
    group: Group | None = None
    sex: Sex | None = None
    age_years: int | None = None
    weight_kg: float | None = None
    enrolled_on: date | None = None
    baseline_egfr: float | None = None
    lee_grade: LeeGrade | None = None
    egfr: dict[str, EgfrPoint] = {}
    urine: dict[str, UrinePoint] = {}
    adverse_events: dict[str, evidence.AdverseEventReport] = {}
    """Per AE id, what the safety statistics read of its latest report (the whole report is on the
    timeline)."""
    doses: frozenset[PulseDoseAdministered] = frozenset()
    infusions: frozenset[CellsInfused] = frozenset()
    dialysis_on: frozenset[date] = frozenset()
    transplant_on: frozenset[date] = frozenset()
    died_on: frozenset[date] = frozenset()
    withdrawn_on: frozenset[date] = frozenset()
    deviations: frozenset[ProtocolDeviationDetected] = frozenset()
    biopsies: frozenset[BiopsyRecorded] = frozenset()

    @property
    def enrolled(self) -> bool:
        return self.group is not None

    @property
    def first_dose_on(self) -> date | None:
        return min((d.given_on for d in self.doses), default=None)

    @property
    def pulse_cycles(self) -> int:
        return len({d.cycle for d in self.doses})

    @property
    def infusion_count(self) -> int:
        return len(self.infusions)

    @property
    def cells_infused(self) -> float:
        """Exact sum: a set's iteration order varies, and the projection's rows must not."""
        return math.fsum(i.cell_count for i in self.infusions)

    @property
    def deviation_count(self) -> int:
        return len(self.deviations)

    @property
    def biopsy_count(self) -> int:
        return len(self.biopsies)

    @property
    def kidney_failure_on(self) -> date | None:
        """The first of dialysis and transplant: kidney failure happens once, at its onset."""
        return min(self.dialysis_on | self.transplant_on, default=None)

    @property
    def treatment_start(self) -> date | None:
        """First MP pulse dose; for control patients, the enrollment date (contract)."""
        if self.group == "control":
            return self.enrolled_on
        return self.first_dose_on

    def counted_points(self) -> list[EgfrPoint]:
        """Counted eGFRs, oldest first. ``counted`` is the labs service's decision (it is
        false for preliminary results); outcomes does not second-guess it."""
        return sorted(filter(_COUNTED, self.egfr.values()), key=_ORDER_KEY)


def keep_counted(counted: list[EgfrPoint], old: EgfrPoint | None, new: EgfrPoint) -> None:
    """Bring ``counted`` (a patient's :meth:`PatientFacts.counted_points`, kept between batches)
    up to date with one result's new point, in place: sorting every point again in every batch
    led the live projection's profile (docs/performance.md)."""
    if old is not None and old.counted:
        del counted[bisect_left(counted, old.order_key, key=_ORDER_KEY)]
    if new.counted:
        insort(counted, new, key=_ORDER_KEY)


class PatientOutcome(BaseModel):
    """The contract's per-patient values plus the context analysts read next to them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject_id: str
    group: Group
    sex: Sex
    age_years: int
    enrolled_on: date
    treatment_start: date | None
    baseline_egfr: float | None
    baseline_source: Literal["lab", "enrollment"] | None
    post_egfr: float | None
    post_egfr_on: date | None
    followup_years: float | None
    egfr_slope: float | None
    egfr_change: float | None
    egfr_change_pct: float | None
    decline_40pct: bool | None
    kidney_failure: bool
    kidney_failure_on: date | None
    kidney_failure_years: float | None
    died_on: date | None
    withdrawn_on: date | None
    pulse_cycles: int
    infusions: int
    cells_infused: float
    deviations: int
    biopsies: int
    counted_egfr_n: int
    # v2 (contract, "Outcome statistics (v2)"). Defaults: rows written before v2 still read.
    baseline_upcr: float | None = None
    post_upcr: float | None = None
    upcr_change_pct: float | None = None
    complete_remission: bool | None = None
    partial_remission: bool | None = None
    paired_biopsies: bool = False
    deposits_cleared: bool | None = None
    iga_cleared: bool | None = None
    proliferation_resolved: bool | None = None
    foot_process_improved: bool | None = None
    lee_grade_improved: bool | None = None
    decline_40_on: date | None = None
    decline_57_on: date | None = None
    composite_endpoint: EndpointKind | None = None
    composite_endpoint_days: int | None = None
    composite_endpoint_years: float | None = None
    kidney_failure_competing: Literal["kidney_failure", "death"] | None = None
    kidney_failure_competing_days: int | None = None
    adverse_events: int = 0
    highest_ae_grade: int | None = None
    any_serious_ae: bool = False
    any_significant_related_ae: bool = False


class PatientNotEnrolled(ValueError):
    """Outcomes need the enrollment facts (group, age, dates); they have not arrived yet."""


# --- applying events --------------------------------------------------------------------------

_ENROLLMENT_FIELDS = ("group", "sex", "age_years", "weight_kg", "enrolled_on", "baseline_egfr", "lee_grade")
_SET_FIELDS = ("doses", "infusions", "dialysis_on", "transplant_on", "died_on", "withdrawn_on", "deviations", "biopsies")


def _on(e: Any) -> date:
    return e.on


def _itself(e: Any) -> Hashable:
    return e


_COLLECTED: Mapping[type[DomainEvent], tuple[str, Callable[[Any], Hashable]]] = {
    PulseDoseAdministered: ("doses", _itself),
    CellsInfused: ("infusions", _itself),
    DialysisStarted: ("dialysis_on", _on),
    KidneyTransplanted: ("transplant_on", _on),
    PatientDied: ("died_on", _on),
    PatientWithdrawn: ("withdrawn_on", _on),
    ProtocolDeviationDetected: ("deviations", _itself),
    BiopsyRecorded: ("biopsies", _itself),
}
"""Events recorded as a member (the event itself, or its date) of one of the facts' sets."""

_AE_REPORTS = (AdverseEventReported, AdverseEventUpdated)

CONSUMED_EVENTS: tuple[type[DomainEvent], ...] = (
    PatientEnrolled, EgfrComputed, UrineResultMeasured, *_AE_REPORTS, *_COLLECTED,
)
"""The event types ``apply`` records; the adapter subscribes to exactly these."""
_CONSUMED = frozenset(CONSUMED_EVENTS)

EgfrFact = tuple[float, datetime, Status, bool, Source, Literal["creatinine", "reported"]]
"""An ``EgfrPoint`` without its result id, as a tuple: a fifth of the model's memory."""


def _writable(moment: datetime) -> datetime:
    """A collection time as a stored row keeps it: naive read as UTC, and an offset with
    seconds (which pydantic's JSON drops, moving the instant) as the same instant in UTC — so
    the facts held in memory are the facts read back from their row, and a patient computes the
    same outcome whether projected live, read back or rebuilt."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    offset = moment.utcoffset()
    return moment.astimezone(UTC) if offset is not None and (offset.seconds % 60 or offset.microseconds) else moment


def egfr_point(result_id: str, fact: EgfrFact) -> EgfrPoint:
    value, collected_at, status, counted, source, derived_from = fact
    return EgfrPoint(result_id=result_id, egfr=value, collected_at=collected_at, status=status, counted=counted,
                     source=source, derived_from=derived_from)


class FactsRecorder:
    """Records events into one patient's facts in place — the one implementation of what each
    event means (:func:`apply` and :func:`fold` go through it).

    Why mutable: a projection applies tens of thousands of events per patient, and an immutable
    ``PatientFacts`` copied per event (its ``egfr`` map with it) made applying quadratic in the
    patient's results and kept a pydantic ``EgfrPoint`` per result (~1 KB each) alive. The
    recorder holds sets, plain scalars and a tuple per result, and builds the frozen
    ``PatientFacts`` only when one is needed (a row to write, an outcome to compute)."""

    __slots__ = ("subject_id", "enrollment", "egfr", "urine", "adverse_events", "sets")

    def __init__(self, facts: PatientFacts) -> None:
        self.subject_id = facts.subject_id
        self.enrollment: dict[str, Any] = {name: getattr(facts, name) for name in _ENROLLMENT_FIELDS}
        self.egfr: dict[str, EgfrFact] = {
            result_id: (p.egfr, p.collected_at, p.status, p.counted, p.source, p.derived_from)
            for result_id, p in facts.egfr.items()
        }
        self.urine: dict[str, UrinePoint] = dict(facts.urine)
        self.adverse_events: dict[str, evidence.AdverseEventReport] = dict(facts.adverse_events)
        self.sets: dict[str, set[Any]] = {name: set(getattr(facts, name)) for name in _SET_FIELDS}

    @classmethod
    def empty(cls, subject_id: str) -> FactsRecorder:
        return cls(PatientFacts(subject_id=subject_id))

    @property
    def enrolled(self) -> bool:
        return self.enrollment["group"] is not None

    def record(self, event: DomainEvent) -> None:
        """Record one event's fact. Events of other types change nothing, so an adapter may
        feed a whole stream. Every consumed event carries ``subject_id``; a mismatch is a
        routing bug and raises."""
        kind = type(event)
        if kind not in _CONSUMED:
            return
        collected = _COLLECTED.get(kind)
        subject_id = getattr(event, "subject_id")
        if subject_id != self.subject_id:
            raise ValueError(f"event for {subject_id} applied to the facts of {self.subject_id}")
        if collected is not None:
            name, member = collected
            self.sets[name].add(member(event))
        elif kind is EgfrComputed:
            self._egfr(event)  # type: ignore[arg-type]
        elif kind is UrineResultMeasured:
            self._urine(event)  # type: ignore[arg-type]
        elif kind in _AE_REPORTS:
            self._adverse_event(event)  # type: ignore[arg-type]
        else:
            self.enrollment.update({name: getattr(event, name) for name in _ENROLLMENT_FIELDS})

    def _egfr(self, e: EgfrComputed) -> None:
        """Last writer wins per result id: the adapter only passes an ``EgfrComputed`` newer (by
        labs stream version) than the one it stored, so the newest is the effective value. A
        naive collection time (labs always sends UTC) is read as UTC rather than dropped."""
        collected_at = _writable(e.collected_at)
        self.egfr[e.result_id] = (e.egfr, collected_at, e.status, e.counted, e.source, e.derived_from)

    def _urine(self, e: UrineResultMeasured) -> None:
        """Last writer wins per result id, as for eGFR (the adapter guards by stream version)."""
        point = e.model_dump(exclude={"subject_id"})
        point["collected_at"] = _writable(point["collected_at"])
        self.urine[e.result_id] = UrinePoint(**point)

    def _adverse_event(self, e: AdverseEventReported | AdverseEventUpdated) -> None:
        """A follow-up replaces the whole report: the latest is the AE (the adapter guards by the
        version in the patient's stream). Only what the statistics read is kept."""
        self.adverse_events[e.ae_id] = evidence.AdverseEventReport(e.ae_id, e.term, e.grade, e.serious, e.causality,
                                                                   e.related_to)

    def facts(self, *, egfr: Mapping[str, EgfrPoint] | None = None) -> PatientFacts:
        """The frozen facts recorded so far (a new object; the recorder stays usable). ``egfr``:
        the eGFR map to put in them instead of one built from the tuples (the projection keeps
        the points of a patient it rewrites with every batch)."""
        return PatientFacts(
            subject_id=self.subject_id,
            **self.enrollment,
            egfr={result_id: egfr_point(result_id, fact) for result_id, fact in self.egfr.items()}
            if egfr is None else egfr,
            urine=dict(self.urine),
            adverse_events=dict(self.adverse_events),
            **{name: frozenset(members) for name, members in self.sets.items()},
        )


def apply(facts: PatientFacts, event: DomainEvent) -> PatientFacts:
    """Record one event's fact and return the new facts (the input is never changed; events of
    other types return it as it is)."""
    if type(event) not in _CONSUMED:
        return facts
    recorder = FactsRecorder(facts)
    recorder.record(event)
    return recorder.facts()


def fold(subject_id: str, events: Iterable[DomainEvent]) -> PatientFacts:
    """The facts of one patient from scratch (rebuilds and tests)."""
    recorder = FactsRecorder.empty(subject_id)
    for e in events:
        recorder.record(e)
    return recorder.facts()


# --- computing outcomes -----------------------------------------------------------------------

def least_squares_slope(xs: list[float], ys: list[float]) -> float | None:
    """Ordinary least-squares slope; ``None`` with fewer than two distinct x (no line)."""
    try:
        return statistics.linear_regression(xs, ys).slope
    except statistics.StatisticsError:
        return None


def _baseline(
    facts: PatientFacts, start: date | None, counted: list[tuple[date, EgfrPoint]]
) -> tuple[float | None, Literal["lab", "enrollment"] | None]:
    """Latest counted eGFR collected on or before the start date, else the enrollment value.
    Without a treatment start no result can be "on or before" it, so enrollment's value.
    ``counted``: (collection date, point), oldest first — so the latest is the last."""
    if start is not None:
        before = [p for day, p in counted if day <= start]
        if before:
            return before[-1].egfr, "lab"
    if facts.baseline_egfr is None:
        return None, None
    return facts.baseline_egfr, "enrollment"


def _years_or_none(start: date | None, end: date | None) -> float | None:
    return years_between(start, end) if start is not None and end is not None else None


def _slope(start: date | None, after: list[tuple[date, EgfrPoint]]) -> float | None:
    """x is years since treatment start from calendar dates, as the contract says for all
    of its dates; two results on the same day therefore share an x."""
    if start is None:
        return None
    return least_squares_slope([years_between(start, day) for day, _ in after], [p.egfr for _, p in after])


def _change(post: float | None, baseline: float | None) -> tuple[float | None, float | None, bool | None]:
    """Change, percent change and the ≥40 % decline flag; undefined when either end is."""
    if post is None or baseline is None:
        return None, None, None
    pct = (post - baseline) / baseline * 100 if baseline != 0 else None
    return post - baseline, pct, post <= 0.6 * baseline


def compute_outcome(facts: PatientFacts, counted_points: Sequence[EgfrPoint] | None = None) -> PatientOutcome:
    """Every contract value of one patient, from the facts alone (see module docstring);
    ``counted_points``: their :meth:`PatientFacts.counted_points`, when the caller keeps them."""
    if not facts.enrolled:
        raise PatientNotEnrolled(f"{facts.subject_id} has no enrollment yet")
    start = facts.treatment_start
    # Sorted once, each collection date computed once (a checkpoint computes every patient's
    # outcome: sorting three times and converting time zones per comparison showed there).
    points = facts.counted_points() if counted_points is None else counted_points
    counted = [(p.collected_on, p) for p in points]
    baseline, baseline_source = _baseline(facts, start, counted)
    after = [(day, p) for day, p in counted if start is not None and day > start]
    post_on, post = after[-1] if after else (None, None)
    post_egfr = post.egfr if post is not None else None
    change, change_pct, decline = _change(post_egfr, baseline)
    failure_on = facts.kidney_failure_on
    return PatientOutcome(
        subject_id=facts.subject_id,
        group=facts.group,
        sex=facts.sex,
        age_years=facts.age_years,
        enrolled_on=facts.enrolled_on,
        treatment_start=start,
        baseline_egfr=baseline,
        baseline_source=baseline_source,
        post_egfr=post_egfr,
        post_egfr_on=post_on,
        followup_years=_years_or_none(start, post_on),
        egfr_slope=_slope(start, after),
        egfr_change=change,
        egfr_change_pct=change_pct,
        decline_40pct=decline,
        kidney_failure=failure_on is not None,
        kidney_failure_on=failure_on,
        kidney_failure_years=_years_or_none(start, failure_on),
        died_on=min(facts.died_on, default=None),
        withdrawn_on=min(facts.withdrawn_on, default=None),
        pulse_cycles=facts.pulse_cycles,
        infusions=facts.infusion_count,
        cells_infused=facts.cells_infused,
        deviations=facts.deviation_count,
        biopsies=facts.biopsy_count,
        counted_egfr_n=len(counted),
        **_evidence(facts, start, baseline, counted),
    )


def _evidence(facts: PatientFacts, start: date | None, baseline_egfr: float | None,
              counted: list[tuple[date, EgfrPoint]]) -> dict[str, Any]:
    """The v2 values: proteinuria (counted UPCRs, g/g), the paired biopsies, the kidney endpoints
    (from the contract baseline eGFR, enrollment's when no lab value precedes the start) and
    safety (each AE's latest report)."""
    upcr = [Measurement(u.result_id, u.value, u.collected_at)
            for u in facts.urine.values() if u.counted and u.analyte == "upcr"]
    protein = evidence.proteinuria(start, upcr)
    changes = evidence.biopsy_changes(
        start, (evidence.Biopsy(**b.model_dump(exclude={"subject_id"})) for b in facts.biopsies))
    course = endpoints.KidneyCourse(
        treatment_start=start, baseline_egfr=baseline_egfr,
        egfr=tuple(p.measurement for _, p in counted),
        kidney_failure_on=facts.kidney_failure_on, died_on=min(facts.died_on, default=None),
    )
    kidney = endpoints.patient_endpoints(course)
    composite, competing = kidney.composite, kidney.kidney_failure
    safety = evidence.patient_safety(facts.adverse_events.values())
    return {
        "baseline_upcr": protein.baseline_upcr,
        "post_upcr": protein.post_upcr,
        "upcr_change_pct": protein.upcr_change_pct,
        "complete_remission": protein.complete_remission,
        "partial_remission": protein.partial_remission,
        "paired_biopsies": changes is not None,
        **(asdict(changes) if changes is not None else dict.fromkeys(evidence.BIOPSY_CHANGES)),
        "decline_40_on": kidney.decline_40_on,
        "decline_57_on": kidney.decline_57_on,
        "composite_endpoint": composite.event if composite else None,
        "composite_endpoint_days": composite.days if composite else None,
        "composite_endpoint_years": composite.years if composite else None,
        "kidney_failure_competing": competing.event if competing else None,
        "kidney_failure_competing_days": competing.days if competing else None,
        "adverse_events": safety.adverse_events,
        "highest_ae_grade": safety.highest_grade,
        "any_serious_ae": safety.any_serious,
        "any_significant_related_ae": safety.any_significant_related,
    }

