"""The seed sent, body by body, through every service's pure decider, then into outcomes.

Why besides test_seed_cohort: that test builds the events itself; this one lets enrollment,
pulse, cells and labs decide them from the very JSON bodies ``nephrotrack demo`` sends, so a
seed body the services would refuse, flag as a deviation, or read differently fails here,
in memory, instead of in the demo.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from contracts.deviations import ProtocolDeviationDetected
from nephrotrack.seed import EXPECTED_COHORTS, SEED, SeedPatient
from services.cells import domain as cells
from services.enrollment import domain as enrollment
from services.labs import domain as labs
from services.labs.broker_messages import parse_broker_result
from services.outcomes.domain import compute_outcome, fold
from services.outcomes.statistics import all_cohorts
from services.pulse import domain as pulse

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def enroll(patient: SeedPatient) -> list:
    events = enrollment.decide_enroll_patient(enrollment.INITIAL_STATE, enrollment.EnrollPatient(**patient.enrollment),
                                              today=NOW.date())
    for body in patient.biopsies:
        events += enrollment.decide_record_biopsy(
            enrollment.fold(events), enrollment.RecordBiopsy(**body), patient.subject_id, today=NOW.date())
    for ae_id, body in patient.adverse_events:
        events += enrollment.decide_report_adverse_event(
            enrollment.fold(events), enrollment.ReportAdverseEvent(**body), patient.subject_id, ae_id, today=NOW.date())
    for body in patient.clinical_events:
        state = enrollment.fold(events)
        events += enrollment.decide_record_clinical_event(
            state, enrollment.RecordClinicalEvent(**body), patient.subject_id, today=NOW.date())
    return events


def administer(patient: SeedPatient, enrolled) -> list:
    known = pulse.KnownPatient.from_enrolled(enrolled)
    events: list = []
    for body in patient.pulse_doses:
        events += pulse.decide_administer_pulse_dose(
            pulse.fold(events), pulse.AdministerPulseDose(**body), known, patient.subject_id, today=NOW.date())
    return events


def infuse(patient: SeedPatient, enrolled) -> list:
    known = cells.KnownPatient.from_enrolled(enrolled)
    events: list = []
    for n, (harvest, release, infusion) in enumerate(patient.harvests, start=1):
        lot_id = f"LOT-{patient.subject_id}-{n}"
        events += cells.decide_harvest(cells.fold_patient(events), cells.HarvestAdiposeTissue(**harvest), known,
                                       patient.subject_id, lot_id, today=NOW.date())
        lot_events = [e for e in events if getattr(e, "lot_id", None) == lot_id]
        events += cells.decide_release(cells.fold_lot(lot_events), cells.ReleaseLot(**release), lot_id)
        lot_events = [e for e in events if getattr(e, "lot_id", None) == lot_id]
        events += cells.decide_infusion(cells.fold_lot(lot_events), cells.fold_patient(events), patient.subject_id,
                                        cells.InfuseCells(lot_id=lot_id, **infusion), today=NOW.date())
    return events


def measure(patient: SeedPatient, enrolled) -> list:
    known = labs.known_patient(enrolled)
    streams: dict[str, labs.ResultState | None] = {}
    events: list = []
    for message in [*patient.lab_results, *patient.urine_results]:
        incoming = parse_broker_result(json.dumps(message).encode(), {"Nats-Msg-Id": message["message_id"]})
        decided = labs.decide_result(streams.get(incoming.result_id), incoming, known, now=NOW)
        for event in decided:
            streams[incoming.result_id] = labs.evolve(streams.get(incoming.result_id), event)
        events += decided
    return events


@pytest.fixture(scope="module")
def events_by_patient() -> dict[str, list]:
    result = {}
    for patient in SEED:
        enrolled_events = enroll(patient)
        enrolled = enrolled_events[0]
        result[patient.subject_id] = [*enrolled_events, *administer(patient, enrolled),
                                      *infuse(patient, enrolled), *measure(patient, enrolled)]
    return result


def test_the_services_accept_every_seed_body_without_deviation(events_by_patient):
    for events in events_by_patient.values():
        assert not [e for e in events if isinstance(e, ProtocolDeviationDetected)]


def test_outcomes_of_the_decided_events_are_the_seed_expectations(events_by_patient):
    outcomes = [compute_outcome(fold(sid, events)) for sid, events in events_by_patient.items()]
    rows = {row["group"]: row for row in all_cohorts(outcomes)}
    for group, expected in EXPECTED_COHORTS.items():
        assert rows[group]["mean_egfr_slope"] == pytest.approx(expected["mean_egfr_slope"], rel=1e-9)
        assert {k: rows[group][k] for k in expected if k != "mean_egfr_slope"} == \
            {k: v for k, v in expected.items() if k != "mean_egfr_slope"}
