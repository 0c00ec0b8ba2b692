"""What a run of broker messages changes in the outcomes projection — pure, no I/O.

The live consumer and the rebuild both feed messages through :class:`ProjectionChanges`, so a
rebuilt generation is the same function of the same messages as the live one. That is what
makes "rebuild == live" true by construction rather than by luck.

Why the result is independent of arrival order: :func:`services.outcomes.domain.apply` records
facts in sets and per-key maps, and the non-commutative facts — the effective eGFR and urine
value of a lab result id, the latest report of an adverse event — are guarded here by the
version of the event in its stream (``labresult-<result id>``, ``patient-<subject id>``): an
event older than the one already applied (a redelivery, or the four streams replayed one after
another) is ignored.
Patient rows are serialised canonically (sorted keys, sorted set members), so the same facts
give byte-identical rows whatever order they were recorded in; a timeline row is a function of
its one event (:mod:`services.outcomes.timeline`). Messages arrive parsed
(:mod:`services.outcomes.incoming`).
"""

from __future__ import annotations

import json
from bisect import insort
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, TypeAdapter

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated, PatientDataErased
from contracts.labs import EgfrComputed, UrineResultMeasured
from services.outcomes import domain
from services.outcomes.domain import EgfrPoint, PatientFacts
from services.outcomes.incoming import Incoming
from services.outcomes.timeline import timeline_row
from services.outcomes.wire import Meta
from shared.events import DomainEvent

SOURCES: tuple[str, ...] = ("enrollment", "pulse", "cells", "labs")
"""The services whose event streams the outcomes service consumes."""


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, floats as their shortest exact repr. (``json.dumps`` with
    these options, minus building a new encoder on every call: profiled at 20 % of it.)"""
    return _canonical(value)


_DATETIME = TypeAdapter(AwareDatetime)


def _json_datetime(moment: datetime) -> str:
    """An aware datetime exactly as pydantic writes it in JSON mode: ISO 8601, a zero offset as
    ``Z``. (Pydantic drops an offset's odd seconds, which ``isoformat`` keeps: those go to it.)"""
    offset = moment.utcoffset()
    if offset is None or offset.seconds % 60 or offset.microseconds:
        return _DATETIME.dump_python(moment, mode="json")
    text = moment.isoformat()
    return text if offset else text[:-6] + "Z"


def _egfr_point_json(result_id: str, fact: domain.EgfrFact, as_read: Mapping[str, tuple[domain.EgfrFact, Any]]) -> dict[str, Any]:
    """One eGFR point as ``PatientFacts.model_dump(mode="json")`` has it, straight from the
    recorder's tuple — or, for a point unchanged since its row was read (``as_read``: the tuple
    read, and the point in JSON form), as it was read: a point is written again as it was."""
    read = as_read.get(result_id)
    if read is not None and read[0] is fact:
        return read[1]
    value, collected_at, status, counted, source, derived_from = fact
    return {"collected_at": _json_datetime(collected_at), "counted": counted, "derived_from": derived_from,
            "egfr": value, "result_id": result_id, "source": source, "status": status}


def _egfr_member(result_id: str, fact: domain.EgfrFact, as_read: Mapping[str, tuple[domain.EgfrFact, Any]]) -> str:
    """One eGFR point as a member of the eGFR map in the canonical facts JSON: ``"<id>":{…}``."""
    return f"{_canonical(result_id)}:{_canonical(_egfr_point_json(result_id, fact, as_read))}"


def _facts_json(facts: PatientFacts, egfr_json: str) -> str:
    """The facts as ``PatientFacts.model_dump(mode="json")`` in canonical JSON: the eGFR map's
    (``egfr_json``, made by the caller) spliced in between the fields that sort before and after
    it, the rest through pydantic. Set-valued fields come out of a frozenset in hash order; sort
    them so equal facts are equal strings (every list in the facts dump is a set)."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for key, value in facts.model_dump(mode="json", exclude={"egfr"}).items():
        (before if key < "egfr" else after)[key] = sorted(value, key=canonical_json) if isinstance(value, list) else value
    parts = (_canonical(before)[1:-1], f'"egfr":{egfr_json}', _canonical(after)[1:-1])
    return "{" + ",".join(part for part in parts if part) + "}"


def _read(facts_json: str) -> tuple[domain.FactsRecorder, dict[str, tuple[domain.EgfrFact, Any]]]:
    """The recorder of a stored facts JSON, and each eGFR point read: its tuple in the
    recorder and its JSON form. The eGFR map (nearly all of it) goes straight into the
    recorder's tuples rather than through a pydantic ``EgfrPoint`` each: it is our own write of
    validated values."""
    dumped = json.loads(facts_json)
    egfr = dumped.pop("egfr", {})
    recorder = domain.FactsRecorder(PatientFacts.model_validate(dumped))
    as_read = {
        result_id: ((float(p["egfr"]), datetime.fromisoformat(p["collected_at"]), p["status"], p["counted"],
                     p["source"], p["derived_from"]), p)
        for result_id, p in egfr.items()
    }
    recorder.egfr = {result_id: fact for result_id, (fact, _) in as_read.items()}
    return recorder, as_read


LabResultFact = tuple[str, str, int | None, Any]
"""One lab result's fact as a patient holds it: its kind (``egfr`` or ``urine``), its result id,
the labs stream version applied (``None``: read from a row written without one) and the
recorder's value for it."""


class ProjectedPatient:
    """One patient's facts (recorded in place: :class:`~services.outcomes.domain.FactsRecorder`)
    plus the guards that make the newest version win whatever the arrival order: per lab result
    id the labs stream version of the applied ``EgfrComputed``, and in ``report_versions`` the
    stream version of the applied urine result (``urine``, per result id) and adverse-event
    report (``adverse_event``, per AE id).

    ``remembered``: the patient outlives the batch that wrote it (the live projection keeps it
    for the next batch, services/outcomes/remembered.py), so ``row()`` keeps what it derived
    from each eGFR result — its pydantic point (which caches its dates) and its JSON text — and
    the next ``row()`` derives again only the results recorded since (``apply`` is the one way
    a result changes). Others (a rebuild holds every patient) keep nothing: memory stays per
    patient."""

    __slots__ = ("recorder", "egfr_versions", "report_versions", "remembered", "_points", "_members", "_order",
                 "_counted", "_recorded", "_as_read")

    def __init__(self, facts: PatientFacts | domain.FactsRecorder, egfr_versions: dict[str, int] | None = None,
                 report_versions: dict[str, dict[str, int]] | None = None, *, remembered: bool = False,
                 as_read: dict[str, tuple[domain.EgfrFact, Any]] | None = None) -> None:
        self.recorder = facts if isinstance(facts, domain.FactsRecorder) else domain.FactsRecorder(facts)
        self.egfr_versions = egfr_versions if egfr_versions is not None else {}
        self.report_versions = report_versions if report_versions is not None else {}
        self.remembered = remembered
        self._as_read = as_read if as_read is not None else {}
        self._points: dict[str, EgfrPoint] = {}
        self._members: dict[str, str] = {}
        self._order: list[str] = []
        self._counted: list[EgfrPoint] = []
        self._recorded: set[str] | None = None
        """Result ids recorded since the points were derived; None: none derived yet."""

    @classmethod
    def new(cls, subject_id: str) -> ProjectedPatient:
        return cls(PatientFacts(subject_id=subject_id))

    @property
    def facts(self) -> PatientFacts:
        return self.recorder.facts()

    @property
    def size(self) -> int:
        """Roughly what the patient holds: their eGFR results (nearly all of their facts)."""
        return len(self.recorder.egfr) + 1

    def apply(self, envelope: Meta, event: DomainEvent) -> None:
        guarded = self._versions_of(event)
        if guarded is not None:
            versions, key = guarded
            applied = versions.get(key)
            if applied is not None and applied >= envelope.stream_version:
                return
            versions[key] = envelope.stream_version
            if versions is self.egfr_versions and self._recorded is not None:
                self._recorded.add(key)
        self.recorder.record(event)

    def _versions_of(self, event: DomainEvent) -> tuple[dict[str, int], str] | None:
        """The versions applied and the key of an event of which only the newest counts."""
        if isinstance(event, EgfrComputed):
            return self.egfr_versions, event.result_id
        if isinstance(event, UrineResultMeasured):
            return self.report_versions.setdefault("urine", {}), event.result_id
        if isinstance(event, AdverseEventReported | AdverseEventUpdated):
            return self.report_versions.setdefault("adverse_event", {}), event.ae_id
        return None

    def take_results(self) -> list[LabResultFact]:
        """Take every lab result's fact (eGFR and urine) and its version out of memory: what a
        patient holds beyond them does not grow with the log. :meth:`put_results` puts them back
        (a rebuild keeps them on disk in between: services/outcomes/rebuild/spill.py)."""
        taken: list[LabResultFact] = []
        for kind, facts in (("egfr", self.recorder.egfr), ("urine", self.recorder.urine)):
            if facts:
                versions = self._result_versions(kind, create=False)
                taken.extend((kind, key, versions.pop(key, None), value) for key, value in facts.items())
                facts.clear()
        self._as_read = {}
        return taken

    def put_results(self, results: Iterable[LabResultFact]) -> None:
        """Put taken facts back, in the order they were taken: of two for one result the newer
        version stays, as when they were applied (:meth:`apply`'s guard)."""
        for kind, key, version, value in results:
            facts = self.recorder.egfr if kind == "egfr" else self.recorder.urine
            versions = self._result_versions(kind, create=version is not None)
            applied = versions.get(key)
            if applied is not None and (version is None or version <= applied):
                continue
            facts[key] = value
            if version is not None:
                versions[key] = version

    def _result_versions(self, kind: str, *, create: bool) -> dict[str, int]:
        """The versions guarding one kind of lab result (an absent urine map is created only
        to be written to: the row of a patient without urine results has none)."""
        if kind == "egfr":
            return self.egfr_versions
        return self.report_versions.setdefault("urine", {}) if create else self.report_versions.get("urine", {})

    def row(self) -> dict[str, Any]:
        facts, egfr_json = self._remembered_facts() if self.remembered else self._facts_once()
        counted = self._counted if self.remembered else None
        outcome = domain.compute_outcome(facts, counted) if self.recorder.enrolled else None
        return {
            "subject_id": self.recorder.subject_id,
            "group": self.recorder.enrollment["group"],
            "facts_json": _facts_json(facts, egfr_json),
            "outcome_json": canonical_json(outcome.model_dump(mode="json")) if outcome else None,
            "egfr_versions_json": canonical_json(self.egfr_versions),
            "report_versions_json": canonical_json(self.report_versions),
        }

    def _facts_once(self) -> tuple[PatientFacts, str]:
        """The facts and the eGFR map's JSON, derived from every result and kept by nobody (one
        encoding of the whole map is cheaper than a text per result to splice)."""
        as_read, self._as_read = self._as_read, {}
        egfr = self.recorder.egfr
        return self.recorder.facts(), _canonical({r: _egfr_point_json(r, fact, as_read) for r, fact in egfr.items()})

    def _remembered_facts(self) -> tuple[PatientFacts, str]:
        """The facts and the eGFR map's JSON from the points and texts kept, brought up to date:
        all of them the first time (after a read, a point unchanged since is written as it was
        read), then those recorded since the last ``row()``; the counted points in order with them."""
        egfr = self.recorder.egfr
        if self._recorded is None:
            as_read, self._as_read = self._as_read, {}
            self._order = sorted(egfr)
            self._points = {result_id: domain.egfr_point(result_id, egfr[result_id]) for result_id in self._order}
            self._members = {result_id: _egfr_member(result_id, egfr[result_id], as_read) for result_id in self._order}
            facts = self.recorder.facts(egfr=self._points)
            self._counted = facts.counted_points()
        else:
            for result_id in self._recorded:
                old = self._points.get(result_id)
                if old is None:
                    insort(self._order, result_id)
                point = self._points[result_id] = domain.egfr_point(result_id, egfr[result_id])
                domain.keep_counted(self._counted, old, point)
                self._members[result_id] = _egfr_member(result_id, egfr[result_id], {})
            facts = self.recorder.facts(egfr=self._points)
        self._recorded = set()
        members = self._members
        return facts, "{" + ",".join([members[r] for r in self._order]) + "}"

    @classmethod
    def from_row(cls, facts_json: str, egfr_versions_json: str, report_versions_json: str, *,
                 remembered: bool = False) -> ProjectedPatient:
        recorder, as_read = _read(facts_json)
        return cls(recorder, json.loads(egfr_versions_json), json.loads(report_versions_json),
                   remembered=remembered, as_read=as_read)


@dataclass
class SourceMark:
    """How far into one stream the projection has applied, and the newest event time seen."""

    last_sequence: int = 0
    last_event_recorded_at: datetime | None = None

    def advance(self, sequence: int, recorded_at: datetime | None) -> None:
        self.last_sequence = max(self.last_sequence, sequence)
        if recorded_at is not None:
            recorded_at = recorded_at if recorded_at.tzinfo else recorded_at.replace(tzinfo=UTC)
            if self.last_event_recorded_at is None or recorded_at > self.last_event_recorded_at:
                self.last_event_recorded_at = recorded_at


class ProjectionChanges:
    """Applies messages to ``patients`` (the caller's map: the rows locked by a live batch, or
    every patient during a rebuild) and collects what must be written: the touched patients,
    new timeline rows, the erased patients whose rows go, and each stream's new mark.

    Erasure. ``PatientDataErased`` removes the patient from what is held and marks them erased;
    any later event about them is ignored — as is any event about a subject ``is_erased`` names
    (the key mirror's answer: an event opened a moment before its key was deleted, by a batch
    that commits after the erasure's)."""

    def __init__(
        self, patients: MutableMapping[str, ProjectedPatient], is_erased: Callable[[str], bool] = lambda s: False
    ) -> None:
        self.patients = patients
        self.is_erased = is_erased
        self.touched: set[str] = set()
        self.timeline: list[dict[str, Any]] = []
        self.erased: set[str] = set()
        self.marks: dict[str, SourceMark] = {}
        self.applied = 0

    def mark(self, stream: str) -> SourceMark:
        return self.marks.setdefault(stream, SourceMark())

    def add(self, item: Incoming) -> None:
        self.mark(item.stream).advance(item.sequence, item.envelope.recorded_at)
        self.applied += 1
        if item.event is None:
            return
        subject_id = item.subject
        if subject_id is not None and (
            isinstance(item.event, PatientDataErased) or subject_id in self.erased or self.is_erased(subject_id)
        ):
            self.erase(subject_id)
            return
        row = timeline_row(item.envelope, item.event, item.source)
        if row is not None:
            self.timeline.append(row)
        subject_id = item.patient_subject
        if subject_id is not None:
            patient = self.patients.get(subject_id)
            if patient is None:
                patient = self.patients[subject_id] = ProjectedPatient.new(subject_id)
            patient.apply(item.envelope, item.event)
            self.touched.add(subject_id)

    def erase(self, subject_id: str) -> None:
        """Forget the patient: nothing of theirs is written, and their rows are deleted."""
        if subject_id in self.erased:
            return
        self.erased.add(subject_id)
        self.patients.pop(subject_id, None)
        self.touched.discard(subject_id)
        self.timeline = [row for row in self.timeline if row["subject_id"] != subject_id]

    def skip(self, stream: str, sequence: int) -> None:
        """Count a message that could not be decoded as read, without any effect."""
        self.mark(stream).advance(sequence, None)
        self.applied += 1

    def patient_rows(self) -> list[dict[str, Any]]:
        return [self.patients[s].row() for s in sorted(self.touched)]

    def take_timeline(self) -> list[dict[str, Any]]:
        """Hand over the timeline rows gathered so far (the rebuild writes them in between its
        checkpoints: inserting by event id makes writing one twice harmless)."""
        rows, self.timeline = self.timeline, []
        return rows

    def clear(self) -> None:
        """Forget what was written (the marks stay: they are cumulative positions; so do the
        erased subjects, whose later events must stay ignored)."""
        self.touched.clear()
        self.timeline.clear()

    @property
    def pending(self) -> int:
        """Timeline rows and touched patients not yet written."""
        return len(self.timeline) + len(self.touched)
