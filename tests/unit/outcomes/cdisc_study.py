"""A small hand-made study for the CDISC export tests: four subjects whose records are worked
out by hand in the tests, built from the contract's events as the projection would hold them."""

from __future__ import annotations

from datetime import date

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated
from contracts.labs import EgfrComputed, UrineResultMeasured
from services.outcomes.cdisc.source import StudyData
from services.outcomes.cdisc.study import Subject
from services.outcomes.domain import compute_outcome, fold
from shared.events import DomainEvent
from tests.unit.outcomes.outcome_events import at, died, dose, egfr, enrolled, infused, transplant, withdrawn

A1, A2, B1, C1 = "IGA-A-001", "IGA-A-002", "IGA-B-001", "IGA-C-001"


def creatinine(result_id: str, mg_dl: float, egfr_value: float, collected: str, sid: str,
               loinc: str = "2160-0") -> EgfrComputed:
    return EgfrComputed(result_id=result_id, subject_id=sid, egfr=egfr_value, collected_at=at(collected),
                        status="final", counted=True, source="mllp", derived_from="creatinine",
                        creatinine_mg_dl=mg_dl, equation="CKD-EPI 2021", sex="F", age_years=58, loinc=loinc)


def reported(result_id: str, value: float, collected: str, sid: str, status: str = "final") -> EgfrComputed:
    return egfr(result_id, value, collected, status=status, sid=sid).model_copy(update={"loinc": "98979-8"})


def upcr(result_id: str, value: float, collected: str, sid: str) -> UrineResultMeasured:
    return UrineResultMeasured(result_id=result_id, subject_id=sid, analyte="upcr", value=value, unit="g/g",
                               loinc="2890-2", collected_at=at(collected), status="final", counted=True,
                               source="broker")


def adverse_event(sid: str, ae_id: str, grade: int = 2, outcome: str = "recovering", update: bool = False,
                  resolved_on: date | None = None) -> AdverseEventReported | AdverseEventUpdated:
    model = AdverseEventUpdated if update else AdverseEventReported
    return model(subject_id=sid, ae_id=ae_id, term="hyperglycaemia", onset_on=date(2014, 3, 11), grade=grade,
                 serious=False, related_to=("mp_pulse",), causality="probable", outcome=outcome,
                 resolved_on=resolved_on)


EGFR = [
    # A1: baseline by creatinine in µmol/L before the first dose, a confirmed 40 % decline after it
    creatinine("A1-R1", 2.0, 28.0, "2014-03-01", A1, loinc="14682-9"),
    reported("A1-R2", 16.0, "2014-09-01", A1),
    reported("A1-R3", 15.0, "2014-10-01", A1),
    reported("A1-R4", 99.0, "2014-11-01", A1, status="preliminary"),
    # A2: one result after start, then a kidney transplant
    reported("A2-R1", 30.0, "2015-01-10", A2),
    # C1 (control): two results, censored at the last
    creatinine("C1-R1", 1.5, 40.0, "2013-05-01", C1),
    reported("C1-R2", 38.0, "2014-05-01", C1),
]
URINE = [upcr("A1-U1", 1.8, "2014-03-01", A1), upcr("A1-U2", 0.6, "2014-09-01", A1)]
ADVERSE_EVENTS = [adverse_event(A1, "AE-1"), adverse_event(A1, "AE-1", grade=3, outcome="recovered", update=True,
                                                            resolved_on=date(2014, 3, 20)),
                  adverse_event(A2, "AE-7", grade=5, outcome="fatal")]


def events() -> dict[str, list[DomainEvent]]:
    return {
        A1: [enrolled(sid=A1, enrolled_on=date(2014, 3, 2), baseline=27.0),
             dose(date(2014, 3, 10), sid=A1), dose(date(2014, 3, 11), day=2, sid=A1),
             infused("LOT-1", date(2014, 5, 1), sid=A1), *[e for e in EGFR if e.subject_id == A1]],
        A2: [enrolled(sid=A2, enrolled_on=date(2014, 3, 2), baseline=20.0, sex="M", age=45),
             dose(date(2014, 4, 1), sid=A2), *[e for e in EGFR if e.subject_id == A2],
             transplant(date(2015, 6, 1), sid=A2), died(date(2015, 7, 1), sid=A2)],
        B1: [enrolled(group="B", sid=B1, enrolled_on=date(2014, 6, 1)), withdrawn(date(2014, 7, 1), sid=B1)],
        C1: [enrolled(group="control", sid=C1, enrolled_on=date(2013, 4, 1), baseline=40.0),
             *[e for e in EGFR if e.subject_id == C1]],
    }


def subjects() -> list[Subject]:
    folded = [fold(sid, evs) for sid, evs in events().items()]
    return [Subject(facts, compute_outcome(facts)) for facts in folded]


def study() -> StudyData:
    return StudyData(subjects(), list(EGFR), list(URINE), list(ADVERSE_EVENTS))
