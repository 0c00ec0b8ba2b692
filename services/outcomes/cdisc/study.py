"""What every CDISC dataset of the study shares: its identifiers, the subjects, study days, and
the sequence numbers SDTM gives each subject's records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from contracts.enrollment import Group
from services.outcomes.domain import PatientFacts, PatientOutcome

STUDYID = "NEPHROTRACK"
SITEID = "001"
"""The system knows no sites: every subject is reported at one (documented in docs/exports.md)."""

ARMS: dict[Group, tuple[str, str]] = {
    "A": ("A", "Group A: MP pulses then autologous cells"),
    "B": ("B", "Group B: MP pulses then autologous cells"),
    "control": ("CONTROL", "Control"),
}
"""ARMCD and ARM of each group (sponsor-defined: the protocol's groups)."""


def usubjid(subject_id: str) -> str:
    """``NEPHROTRACK-<subject_id>`` (contract, "Standard exports (v2)")."""
    return f"{STUDYID}-{subject_id}"


@dataclass(frozen=True, slots=True)
class Subject:
    """An enrolled patient as the projection holds them: the recorded facts and the contract
    values computed from them."""

    facts: PatientFacts
    outcome: PatientOutcome

    @property
    def subject_id(self) -> str:
        return self.facts.subject_id

    @property
    def usubjid(self) -> str:
        return usubjid(self.subject_id)

    @property
    def reference_start(self) -> date | None:
        """RFSTDTC: the contract's treatment start (first MP pulse dose; control: enrollment)."""
        return self.outcome.treatment_start

    @property
    def exposure_dates(self) -> list[date]:
        """Every MP pulse dose and cell infusion date, oldest first."""
        return sorted([d.given_on for d in self.facts.doses] + [i.given_on for i in self.facts.infusions])

    @property
    def last_known_date(self) -> date:
        """The latest date the study recorded anything about the subject: end of participation."""
        f = self.facts
        dates = [f.enrolled_on, *self.exposure_dates, *(p.collected_on for p in f.egfr.values()),
                 *f.dialysis_on, *f.transplant_on, *f.died_on, *f.withdrawn_on, *(b.performed_on for b in f.biopsies)]
        return max(d for d in dates if d is not None)


def treated(subject: Subject) -> bool:
    """Received the arm's treatment: control patients by definition, the others once a pulse
    dose or an infusion is recorded."""
    return subject.facts.group == "control" or bool(subject.exposure_dates)


def by_subject(subjects: Iterable[Subject]) -> dict[str, Subject]:
    return {s.subject_id: s for s in subjects}


def study_day(day: date | None, reference: date | None) -> int | None:
    """SDTM study day: the reference date is day 1, the day before it day -1 (there is no day 0)."""
    if day is None or reference is None:
        return None
    delta = (day - reference).days
    return delta + 1 if delta >= 0 else delta


def sequenced(records: Iterable[Mapping[str, Any]], seq: str, order: tuple[str, ...]) -> list[dict[str, Any]]:
    """Records sorted by USUBJID then ``order`` (missing values first), with ``seq`` numbering each
    subject's records from 1 — so a sequence number is stable for the same data."""

    def key(record: Mapping[str, Any]) -> tuple[Any, ...]:
        values = (record.get(name) for name in order)
        return (record["USUBJID"], *((v is not None, v if v is not None else 0) for v in values))

    numbered: list[dict[str, Any]] = []
    previous, n = None, 0
    for record in sorted(records, key=key):
        n = n + 1 if record["USUBJID"] == previous else 1
        previous = record["USUBJID"]
        numbered.append({**record, seq: n})
    return numbered
