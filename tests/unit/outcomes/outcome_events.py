"""Small builders of the events the outcomes service consumes, for the outcomes unit tests."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

from contracts.cells import CellsInfused
from contracts.deviations import DeviationCode, ProtocolDeviationDetected
from contracts.enrollment import (
    AdverseEventReported,
    AdverseEventUpdated,
    BiopsyRecorded,
    DialysisStarted,
    KidneyTransplanted,
    PatientDied,
    PatientEnrolled,
    PatientWithdrawn,
)
from contracts.labs import EgfrComputed, UrineResultMeasured
from contracts.pulse import PulseDoseAdministered
from services.outcomes.wire import Meta

SID = "IGA-A-900"


def meta(version: int) -> Meta:
    """The envelope's metadata of an event at ``version`` in its stream (the projector guards by it)."""
    now = datetime.now(UTC)
    return Meta(uuid.uuid4(), "test", f"stream-{version}", 1, version, now, now)


def enrolled(group: str = "A", enrolled_on: date = date(2014, 3, 2), baseline: float | None = 27.0,
             age: int = 58, sex: str = "F", sid: str = SID) -> PatientEnrolled:
    return PatientEnrolled(subject_id=sid, sex=sex, age_years=age, weight_kg=48.0, group=group,
                           enrolled_on=enrolled_on, baseline_egfr=baseline, lee_grade="IV")


def dose(on: date, cycle: int = 1, day: int = 1, sid: str = SID) -> PulseDoseAdministered:
    return PulseDoseAdministered(subject_id=sid, cycle=cycle, day=day, given_on=on, dose_mg=1000.0,
                                 weight_kg=48.0, mg_per_kg=1000.0 / 48.0)


def at(value: str) -> datetime:
    """An ISO time; a bare date means 08:00 UTC that day."""
    if "T" not in value:
        value += "T08:00:00+00:00"
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def egfr(result_id: str, value: float, collected: str, status: str = "final", sid: str = SID,
         derived_from: str = "reported") -> EgfrComputed:
    return EgfrComputed(result_id=result_id, subject_id=sid, egfr=value, collected_at=at(collected),
                        status=status, counted=status != "preliminary", source="broker",
                        derived_from=derived_from)


def infused(lot_id: str, on: date, cells: float = 3.0e7, number: int = 1, sid: str = SID) -> CellsInfused:
    return CellsInfused(subject_id=sid, lot_id=lot_id, given_on=on, cell_count=cells, infusion_number=number)


def dialysis(on: date, sid: str = SID) -> DialysisStarted:
    return DialysisStarted(subject_id=sid, on=on)


def transplant(on: date, sid: str = SID) -> KidneyTransplanted:
    return KidneyTransplanted(subject_id=sid, on=on)


def died(on: date, sid: str = SID) -> PatientDied:
    return PatientDied(subject_id=sid, on=on)


def withdrawn(on: date, sid: str = SID) -> PatientWithdrawn:
    return PatientWithdrawn(subject_id=sid, on=on)


def deviation(on: date, sid: str = SID) -> ProtocolDeviationDetected:
    return ProtocolDeviationDetected(subject_id=sid, code=DeviationCode.DOSE_ABOVE_DAILY_MAX,
                                     detail="1200 mg > 1000 mg", occurred_on=on, cycle=1, day=1)


def upcr(result_id: str, value: float, collected: str, status: str = "final", sid: str = SID) -> UrineResultMeasured:
    """A urine protein/creatinine ratio in g/g, as labs publishes it after normalising the unit."""
    return UrineResultMeasured(result_id=result_id, subject_id=sid, analyte="upcr", value=value, unit="g/g",
                               loinc="2890-2", collected_at=at(collected), status=status,
                               counted=status != "preliminary", source="broker")


def biopsy(on: date, deposits: bool | None = None, iga: str | None = None, proliferation: bool | None = None,
           foot: bool | None = None, lee: str | None = None, sid: str = SID) -> BiopsyRecorded:
    return BiopsyRecorded(subject_id=sid, performed_on=on, mesangial_deposits=deposits, iga_immunofluorescence=iga,
                          mesangial_proliferation=proliferation, foot_process_effacement=foot, lee_grade=lee)


def adverse_event(ae_id: str, term: str, onset: date, grade: int = 1, serious: bool = False,
                  related_to: tuple[str, ...] = (), causality: str = "unrelated", outcome: str = "recovering",
                  follow_up: bool = False, sid: str = SID) -> AdverseEventReported | AdverseEventUpdated:
    """A first report, or with ``follow_up`` the whole report as it now stands."""
    kind = AdverseEventUpdated if follow_up else AdverseEventReported
    return kind(subject_id=sid, ae_id=ae_id, term=term, onset_on=onset, grade=grade, serious=serious,
                related_to=related_to, causality=causality, outcome=outcome)
