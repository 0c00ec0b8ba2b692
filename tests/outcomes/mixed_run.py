"""A long, deterministic, mixed run of every service's events, as they would reach JetStream.

Several patients in every group; pulse cycles with deviations; harvest → lot → infusion chains;
lab results (eGFR and UPCR) with corrections, preliminaries superseded by finals and a few
versions published out of order; diagnostic and follow-up biopsies, adverse events with follow-up
reports, dialysis, transplants, deaths and withdrawals; and events outcomes does not read (lab
raw results, lots) mixed in, as in a real stream.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from nats.js import JetStreamContext

from contracts.cells import AdiposeTissueHarvested, CellLotReleased, CellsInfused
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
from contracts.labs import EgfrComputed, LabResultCorrected, UrineResultMeasured
from contracts.pulse import PulseDoseAdministered
from services.labs.events import LabResultRecorded
from shared.broker import Topology
from shared.events import CommandContext, DomainEvent, Envelope


@dataclass(frozen=True)
class Published:
    source: str
    envelope: Envelope


class _Streams:
    def __init__(self) -> None:
        self.versions: dict[str, int] = {}

    def wrap(self, event: DomainEvent, stream_id: str) -> Envelope:
        version = self.versions[stream_id] = self.versions.get(stream_id, 0) + 1
        return Envelope.wrap(event, stream_id=stream_id, stream_version=version, context=CommandContext())


def _lab_events(streams: _Streams, rng: random.Random, sid: str, n: int, on: date, egfr: float) -> list[Envelope]:
    result_id = f"{sid}-R{n:04d}"
    stream_id = f"labresult-{result_id}"
    collected = datetime(on.year, on.month, on.day, 7, 30, tzinfo=UTC)

    def recorded(value: float, status: str) -> Envelope:
        return streams.wrap(LabResultRecorded(
            result_id=result_id, message_id=f"{result_id}-{status}", subject_id=sid, lab_id="LAB-1", source="broker",
            loinc="98979-8", analyte="egfr", value=value, unit="mL/min/1.73m2", canonical_value=value,
            canonical_unit="mL/min/1.73m2", status=status, collected_at=collected,
        ), stream_id)

    def computed(value: float, status: str) -> Envelope:
        return streams.wrap(EgfrComputed(
            result_id=result_id, subject_id=sid, egfr=value, collected_at=collected, status=status,
            counted=status != "preliminary", source="broker", derived_from="reported",
        ), stream_id)

    kind = rng.random()
    if kind < 0.15:  # a typo, then its correction
        typo = round(egfr / 10, 1)
        events = [recorded(typo, "final"), computed(typo, "final"), recorded(egfr, "corrected"),
                  streams.wrap(LabResultCorrected(result_id=result_id, subject_id=sid, previous_value=typo,
                                                  new_value=egfr, canonical_unit="mL/min/1.73m2"), stream_id),
                  computed(egfr, "corrected")]
    elif kind < 0.25:  # a preliminary, then the final
        events = [recorded(egfr + 3, "preliminary"), computed(egfr + 3, "preliminary"),
                  recorded(egfr, "final"), computed(egfr, "final")]
    elif kind < 0.30:  # a preliminary never followed up: kept, never counted
        events = [recorded(egfr, "preliminary"), computed(egfr, "preliminary")]
    else:
        events = [recorded(egfr, "final"), computed(egfr, "final")]
    if len(events) > 2 and rng.random() < 0.3:
        events[-1], events[1] = events[1], events[-1]  # the newer EgfrComputed overtakes the older
    return events


def _urine_events(streams: _Streams, rng: random.Random, sid: str, n: int, on: date, value: float) -> list[Envelope]:
    """One UPCR result (g/g): final, a typo and its correction, or a preliminary then the final;
    sometimes the newer version overtakes the older."""
    result_id = f"{sid}-U{n:03d}"

    def measured(value: float, status: str) -> Envelope:
        return streams.wrap(UrineResultMeasured(
            result_id=result_id, subject_id=sid, analyte="upcr", value=value, unit="g/g", loinc="2890-2",
            collected_at=datetime(on.year, on.month, on.day, 9, 0, tzinfo=UTC), status=status,
            counted=status != "preliminary", source="broker",
        ), f"labresult-{result_id}")

    kind = rng.random()
    if kind < 0.2:
        events = [measured(value * 10, "final"), measured(value, "corrected")]
    elif kind < 0.35:
        events = [measured(value + 0.2, "preliminary"), measured(value, "final")]
    else:
        events = [measured(value, "final")]
    if len(events) > 1 and rng.random() < 0.4:
        events.reverse()
    return events


def _adverse_events(rng: random.Random, sid: str, start: date) -> list[DomainEvent]:
    """A few adverse events, some followed up (the whole report again, changed)."""
    events: list[DomainEvent] = []
    for n in range(rng.randint(0, 3)):
        onset = start + timedelta(days=rng.randint(1, 400))
        report = {
            "subject_id": sid, "ae_id": f"AE-{n}", "onset_on": onset, "outcome": "recovering",
            "term": rng.choice(["hyperglycaemia", "insomnia", "facial flushing", "pneumonia"]),
            "grade": rng.randint(1, 3), "serious": rng.random() < 0.2,
            "related_to": rng.choice([(), ("mp_pulse",), ("cell_infusion", "fat_harvest")]),
            "causality": rng.choice(["unrelated", "unlikely", "possible", "probable", "definite"]),
        }
        events.append(AdverseEventReported(**report))
        if rng.random() < 0.5:
            events.append(AdverseEventUpdated(**{**report, "grade": min(4, report["grade"] + 1), "outcome": "recovered",
                                                 "resolved_on": onset + timedelta(days=10)}))
    return events


def _patient(streams: _Streams, rng: random.Random, index: int, results: int) -> list[Published]:
    group = ("A", "B", "control")[index % 3]
    sid = f"IGA-{group[0].upper()}-{index:03d}"
    enrolled_on = date(2012, 1, 1) + timedelta(days=37 * index)
    baseline = rng.uniform(15, 44) if group == "A" else rng.uniform(50, 100)
    out = [Published("enrollment", streams.wrap(PatientEnrolled(
        subject_id=sid, sex=rng.choice(["F", "M"]), age_years=rng.randint(20, 70), weight_kg=48.0, group=group,
        enrolled_on=enrolled_on, baseline_egfr=round(baseline, 1), lee_grade="IV"), f"patient-{sid}"))]
    start = enrolled_on + timedelta(days=14)
    if group != "control":
        for cycle in range(1, rng.randint(3, 12)):
            for day in (1, 2, 3):
                given_on = start + timedelta(days=28 * (cycle - 1) + day - 1)
                dose = 1000.0 if rng.random() > 0.1 else 1200.0
                out.append(Published("pulse", streams.wrap(PulseDoseAdministered(
                    subject_id=sid, cycle=cycle, day=day, given_on=given_on, dose_mg=dose, weight_kg=48.0,
                    mg_per_kg=dose / 48.0), f"pulse-{sid}")))
                if dose > 1000:
                    out.append(Published("pulse", streams.wrap(ProtocolDeviationDetected(
                        subject_id=sid, code=DeviationCode.DOSE_ABOVE_DAILY_MAX, detail=f"{dose} mg > 1000 mg",
                        occurred_on=given_on, cycle=cycle, day=day), f"pulse-{sid}")))
        for number in range(1, rng.randint(2, 5)):
            lot = f"LOT-{sid}-{number}"
            given_on = start + timedelta(days=400 + 56 * number)
            out += [Published("cells", streams.wrap(e, f"lot-{lot}")) for e in (
                AdiposeTissueHarvested(subject_id=sid, lot_id=lot, harvested_on=given_on - timedelta(days=21),
                                       fat_grams=120),
                CellLotReleased(subject_id=sid, lot_id=lot, cell_count=3.3e7, viability_pct=91.5),
                CellsInfused(subject_id=sid, lot_id=lot, given_on=given_on, cell_count=3.0e7 + number * 1e5,
                             infusion_number=number),
            )]
    egfr = baseline
    for n in range(results):
        egfr = max(5.0, egfr + rng.uniform(-2, 2.5))
        on = start + timedelta(days=n * 20 - 10)
        out += [Published("labs", e) for e in _lab_events(streams, rng, sid, n, on, round(egfr, 2))]
    upcr = rng.uniform(0.5, 3.0)
    for n in range(results // 10):
        upcr = max(0.05, upcr * rng.uniform(0.6, 1.1))
        on = start + timedelta(days=n * 200 - 5)
        out += [Published("labs", e) for e in _urine_events(streams, rng, sid, n, on, round(upcr, 2))]
    last = start + timedelta(days=results * 20)
    fate = rng.random()
    clinical: list[DomainEvent] = [
        BiopsyRecorded(subject_id=sid, performed_on=enrolled_on, mesangial_deposits=True, iga_immunofluorescence="2+",
                       lee_grade="IV"),
        BiopsyRecorded(subject_id=sid, performed_on=start + timedelta(days=365), mesangial_deposits=rng.random() < 0.5,
                       iga_immunofluorescence=rng.choice(["negative", "trace"]), lee_grade="III"),
        *_adverse_events(rng, sid, start),
    ]
    if fate < 0.25:
        clinical.append(DialysisStarted(subject_id=sid, on=last - timedelta(days=100)))
    elif fate < 0.35:
        clinical.append(KidneyTransplanted(subject_id=sid, on=last - timedelta(days=50)))
    elif fate < 0.45:
        clinical.append(PatientWithdrawn(subject_id=sid, on=last))
    elif fate < 0.5:
        clinical.append(PatientDied(subject_id=sid, on=last + timedelta(days=30)))
    out += [Published("enrollment", streams.wrap(e, f"patient-{sid}")) for e in clinical]
    return out


def mixed_run(patients: int = 9, results: int = 90, seed: int = 7) -> list[Published]:
    """Every patient's events, interleaved across patients and services (each aggregate's own
    events keep their order, except the deliberately overtaking eGFR versions)."""
    rng = random.Random(seed)
    streams = _Streams()
    queues = [_patient(streams, rng, i, results) for i in range(patients)]
    run: list[Published] = []
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        take = rng.randint(1, 6)
        run.extend(queue[:take])
        del queue[:take]
    return run


async def publish(js: JetStreamContext, topology: Topology, run: list[Published], pause: float = 0) -> None:
    """Publish as the services' outbox relays do: on the service subject, Nats-Msg-Id = event id."""
    for i, item in enumerate(run):
        envelope = item.envelope
        await js.publish(topology.event_subject(item.source, envelope.event_type), envelope.model_dump_json().encode(),
                         headers={"Nats-Msg-Id": str(envelope.event_id)})
        if pause and i % 50 == 0:
            await asyncio.sleep(pause)
