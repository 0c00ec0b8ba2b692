"""A large, realistic event log for the rebuild and analyst-query benchmarks.

``events(total, patients)`` yields exactly ``total`` broker messages — the envelopes the
services' outbox relays publish — for ``patients`` patients in the three groups:
enrollments, biopsies and clinical outcomes (enrollment); methylprednisolone pulse cycles with
dose deviations (pulse); harvest → lot release → infusion chains (cells); and the bulk of the
log, lab results (labs): an ``EgfrComputed`` per result, with typo corrections
(``LabResultCorrected`` and a second ``EgfrComputed``), preliminaries superseded by finals and a
few preliminaries never followed up. Messages are interleaved across patients in time order, as
a study running for years would publish them, and each aggregate's events keep their order.

It is what the relays publish, no more: each arrival's ``LabResultRecorded`` stays in the labs
store (it takes its stream version there, so the ``EgfrComputed`` versions have the same gaps as
in production), and with ``seal`` every payload about a patient is sealed as the services' codec
seals it on the broker (``{"$sealed": …}``, shared/sealing.py), so a reader pays for opening it.

The JSON is built directly (a million pydantic round trips would make the benchmark's set-up
longer than what it measures); :func:`check_sample` decodes the first messages of every event
type with the real models, so a drift between this file and the event models fails loudly.
"""

from __future__ import annotations

import base64
import json
import os
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.broker import Topology
from shared.events import EventRef
from shared.keys import KEY_BYTES
from shared.sealing import SEALED_FIELD, seal

ENVELOPE_KEYS = ("event_id", "event_type", "schema_version", "stream_id", "stream_version", "occurred_at",
                 "recorded_at", "correlation_id", "causation_id", "actor", "payload")
SOURCES = ("enrollment", "pulse", "cells", "labs")


Sealer = Callable[[EventRef, str, bytes], str]
"""(the event, its subject id, the payload's JSON) -> the payload JSON the broker carries instead."""


class PatientKeys:
    """A :data:`Sealer` that seals as the services' codec does on the broker, with a new key per
    patient (``keys``: subject id -> key, for the stack's key bucket)."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self._ciphers: dict[str, AESGCM] = {}

    def __call__(self, event: EventRef, subject_id: str, plaintext: bytes) -> str:
        cipher = self._ciphers.get(subject_id)
        if cipher is None:
            self.keys[subject_id] = os.urandom(KEY_BYTES)
            cipher = self._ciphers[subject_id] = AESGCM(self.keys[subject_id])
        sealed = base64.b64encode(seal(subject_id, cipher, plaintext, event)).decode()
        return _dumps({SEALED_FIELD: sealed})  # compact, as pydantic writes the envelope


@dataclass(frozen=True)
class Message:
    source: str
    event_type: str
    data: bytes
    event_id: str


class _Log:
    """Numbers aggregate streams and stamps envelopes with increasing recorded times."""

    def __init__(self, seed: int, seal: Sealer | None = None) -> None:
        self.rng = random.Random(seed)
        self.seal = seal
        self.versions: dict[str, int] = {}
        self.clock = datetime(2014, 1, 1, tzinfo=UTC)
        self.ids = self.rng.getrandbits(62)

    def _event_id(self) -> uuid.UUID:
        # UUIDv7-shaped (time-ordered), like shared.ids.new_event_id, but from the synthetic clock.
        self.ids += 1
        ms = int(self.clock.timestamp() * 1000)
        value = (ms << 80) | (0x7 << 76) | (((self.ids >> 62) & 0xFFF) << 64) | (0b10 << 62) | (self.ids & ((1 << 62) - 1))
        return uuid.UUID(int=value)

    def wrap(self, source: str, event_type: str, stream_id: str, payload: dict, actor: str) -> Message:
        version = self.versions[stream_id] = self.versions.get(stream_id, 0) + 1
        self.clock += timedelta(milliseconds=self.rng.randint(50, 5000))
        stamp = self.clock.isoformat().replace("+00:00", "Z")
        event_id = self._event_id()
        body = _dumps(payload)
        if self.seal is not None:
            body = self.seal(EventRef(event_id, event_type, stream_id), payload["subject_id"], body.encode())
        # The envelope exactly as Envelope.model_dump_json() writes it (field order included);
        # every string spliced in is plain ASCII without quotes, so no escaping is needed.
        data = _ENVELOPE % (event_id, event_type, stream_id, version, stamp, stamp, event_id, actor, body)
        return Message(source, event_type, data.encode(), str(event_id))

    def unpublished(self, stream_id: str) -> None:
        """An event that stays in its service's store: it takes a stream version, no message."""
        self.versions[stream_id] = self.versions.get(stream_id, 0) + 1


_ENVELOPE = (
    '{"event_id":"%s","event_type":"%s","schema_version":1,"stream_id":"%s","stream_version":%d,'
    '"occurred_at":"%s","recorded_at":"%s","correlation_id":"%s","causation_id":null,"actor":"%s","payload":%s}'
)
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _iso(day: date) -> str:
    return day.isoformat()


def _patient_events(log: _Log, index: int) -> tuple[list[Message], list[list[Message]], dict]:
    """(the events of the first months, the patient's lab results one list each, context)."""
    rng = log.rng
    group = ("A", "B", "control")[index % 3]
    sid = f"BENCH-{group[0]}-{index:05d}"
    enrolled_on = date(2012, 1, 1) + timedelta(days=index % 1500)
    baseline = rng.uniform(15, 44) if group == "A" else rng.uniform(50, 100)
    weight = round(rng.uniform(45, 95), 1)
    early = [log.wrap("enrollment", "PatientEnrolled", f"patient-{sid}", {
        "subject_id": sid, "sex": rng.choice(["F", "M"]), "age_years": rng.randint(20, 70), "weight_kg": weight,
        "group": group, "enrolled_on": _iso(enrolled_on), "baseline_egfr": round(baseline, 1),
        "lee_grade": rng.choice(["III", "IV", "V"]) if group != "control" else "II", "mest_c": None,
    }, "staff:coordinator")]
    start = enrolled_on + timedelta(days=14)
    if group != "control":
        for cycle in range(1, rng.randint(3, 17) + 1):
            for day in (1, 2, 3):
                given_on = start + timedelta(days=28 * (cycle - 1) + day - 1)
                dose = 1000.0 if rng.random() > 0.05 else 1250.0
                early.append(log.wrap("pulse", "PulseDoseAdministered", f"pulse-{sid}", {
                    "subject_id": sid, "cycle": cycle, "day": day, "given_on": _iso(given_on), "dose_mg": dose,
                    "weight_kg": weight, "mg_per_kg": dose / weight,
                }, "staff:nurse"))
                if dose > 1000:
                    early.append(log.wrap("pulse", "ProtocolDeviationDetected", f"pulse-{sid}", {
                        "subject_id": sid, "code": "DOSE_ABOVE_DAILY_MAX", "detail": f"{dose} mg > 1000 mg",
                        "occurred_on": _iso(given_on), "cycle": cycle, "day": day, "lot_id": None,
                    }, "staff:nurse"))
        for number in range(1, rng.randint(1, 4) + 1):
            lot = f"LOT-{uuid.UUID(int=rng.getrandbits(128)).hex.upper()}"
            given_on = start + timedelta(days=400 + 56 * number)
            early += [
                log.wrap("cells", "AdiposeTissueHarvested", f"lot-{lot}", {
                    "subject_id": sid, "lot_id": lot, "harvested_on": _iso(given_on - timedelta(days=21)),
                    "fat_grams": 120.0}, "staff:lab"),
                log.wrap("cells", "CellLotReleased", f"lot-{lot}", {
                    "subject_id": sid, "lot_id": lot, "cell_count": 3.3e7, "viability_pct": 91.5}, "staff:qc"),
                log.wrap("cells", "CellsInfused", f"patient-{sid}", {
                    "subject_id": sid, "lot_id": lot, "given_on": _iso(given_on), "cell_count": 3.0e7 + number * 1e5,
                    "infusion_number": number}, "staff:nurse"),
            ]
    early.append(log.wrap("enrollment", "BiopsyRecorded", f"patient-{sid}", {
        "subject_id": sid, "performed_on": _iso(start + timedelta(days=365)), "mesangial_deposits": rng.random() < 0.5,
        "iga_immunofluorescence": "trace", "mesangial_proliferation": None, "foot_process_effacement": None,
        "lee_grade": "III"}, "staff:pathologist"))
    return early, [], {"sid": sid, "start": start, "egfr": baseline, "n": 0, "group": group}


def _lab_result(log: _Log, patient: dict) -> list[Message]:
    rng = log.rng
    sid = patient["sid"]
    n = patient["n"] = patient["n"] + 1
    patient["egfr"] = egfr = max(5.0, patient["egfr"] + rng.uniform(-1.2, 1.3))
    result_id = f"R-{sid}-{n:05d}"
    stream_id = f"labresult-{result_id}"
    on = patient["start"] + timedelta(days=n * 9 - 10)
    collected = f"{_iso(on)}T07:30:00Z"

    def computed(value: float, status: str, *, arrived: bool = True) -> Message:
        if arrived:
            log.unpublished(stream_id)  # the arrival's LabResultRecorded, kept in the labs store
        return log.wrap("labs", "EgfrComputed", stream_id, {
            "result_id": result_id, "subject_id": sid, "egfr": value, "collected_at": collected, "status": status,
            "counted": status != "preliminary", "source": "broker", "derived_from": "reported",
            "creatinine_mg_dl": None, "equation": None, "sex": None, "age_years": None, "loinc": "98979-8",
        }, "lab:broker")

    value = round(egfr, 2)
    kind = rng.random()
    if kind < 0.15:  # a typo, then its correction
        typo = round(value / 10, 2)
        first = computed(typo, "final")
        log.unpublished(stream_id)  # the correction's arrival
        return [first,
                log.wrap("labs", "LabResultCorrected", stream_id, {
                    "result_id": result_id, "subject_id": sid, "previous_value": typo, "new_value": value,
                    "canonical_unit": "mL/min/1.73m2"}, "lab:broker"),
                computed(value, "corrected", arrived=False)]
    if kind < 0.25:  # a preliminary, then the final
        return [computed(value + 3, "preliminary"), computed(value, "final")]
    if kind < 0.30:  # a preliminary never followed up
        return [computed(value, "preliminary")]
    return [computed(value, "final")]


def _fate(log: _Log, patient: dict) -> list[Message]:
    rng, sid = log.rng, patient["sid"]
    last = patient["start"] + timedelta(days=patient["n"] * 9)
    fate = rng.random()
    kinds = {0.12: ("DialysisStarted", -100), 0.18: ("KidneyTransplanted", -50), 0.24: ("PatientWithdrawn", 0),
             0.27: ("PatientDied", 30)}
    for bound, (event_type, offset) in kinds.items():
        if fate < bound:
            return [log.wrap("enrollment", event_type, f"patient-{sid}",
                             {"subject_id": sid, "on": _iso(last + timedelta(days=offset))}, "staff:coordinator")]
    return []


def events(total: int, patients: int = 2_000, seed: int = 11, seal: Sealer | None = None) -> Iterator[Message]:
    """Exactly ``total`` messages (if ``total`` leaves room for every patient's first months);
    ``seal``: see the module doc."""
    log = _Log(seed, seal)
    emitted = 0
    states = []
    # Enrollment waves: each patient's early events (enrollment, pulses, cells, biopsy) in turn.
    for index in range(patients):
        early, _, state = _patient_events(log, index)
        states.append(state)
        for message in early:
            if emitted == total:
                return
            emitted += 1
            yield message
    # Then years of follow-up: lab results round the cohort, and a few clinical outcomes at the end.
    reserve = [_fate(log, state) for state in states]
    reserved = sum(len(f) for f in reserve)
    while emitted < total - reserved:
        for state in states:
            for message in _lab_result(log, state):
                if emitted == total - reserved:
                    break
                emitted += 1
                yield message
            if emitted == total - reserved:
                break
    for fate in reserve:
        for message in fate:
            if emitted == total:
                return
            emitted += 1
            yield message


def subject(topology: Topology, message: Message) -> str:
    return topology.event_subject(message.source, message.event_type)


def check_sample(count: int = 20_000) -> dict[str, int]:
    """Decode the first ``count`` messages with the real envelope and event models; returns the
    count per event type (and raises on any drift)."""
    from contracts import register_all
    from services.labs import events as labs_private
    from shared.events import Envelope, registry

    register_all(registry, *labs_private.EVENTS)

    seen: dict[str, int] = {}
    for message in events(count, patients=max(count // 500, 3)):
        envelope = Envelope.model_validate_json(message.data)
        decoded = envelope.decode()
        assert decoded.model_dump(mode="json") == envelope.payload, message.data
        assert envelope.model_dump(mode="json") == json.loads(message.data), message.data
        seen[message.event_type] = seen.get(message.event_type, 0) + 1
    return seen
