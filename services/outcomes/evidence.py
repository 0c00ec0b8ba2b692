"""Clinical evidence per patient and per group (contract, "Outcome statistics (v2)"): proteinuria
remission, paired biopsies, adverse events, and the cohort row's v2 counts and means.

Pure functions over small frozen inputs of their own (the events carrying urine results and
adverse events are still being designed), filled from facts later. Same conventions as
``domain.py``: treatment start is time zero, dates are UTC calendar dates, nothing is rounded,
and a value that cannot be defined is ``None`` rather than a guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from datetime import date
from typing import Any, Literal

from contracts.enrollment import LeeGrade
from services.outcomes.endpoints import TimeToEvent
from services.outcomes.measurements import Measurement, at_most_percent, latest_after, latest_on_or_before, mean

# --- proteinuria ------------------------------------------------------------------------------

COMPLETE_REMISSION_BELOW = 0.3
"""g/g: post-therapy UPCR strictly below this is complete remission."""
PARTIAL_REMISSION_BELOW = 1.0
"""g/g: partial remission also needs post-therapy UPCR strictly below this…"""
PARTIAL_REMISSION_AT_MOST_PCT = 50
"""…and at most this percentage of baseline."""


@dataclass(frozen=True, slots=True)
class Proteinuria:
    """UPCR in g/g before and after treatment start, and the remission it shows."""

    baseline_upcr: float | None
    post_upcr: float | None
    upcr_change_pct: float | None
    complete_remission: bool | None
    partial_remission: bool | None


def _partial_remission(post: float | None, baseline: float | None, complete: bool | None) -> bool | None:
    """Not complete, post < 1.0 g/g and post ≤ 50 % of baseline. Decided without a baseline when
    the other conditions already fail (complete, or post ≥ 1.0): partial remission is then
    false whatever the baseline was; otherwise it needs one."""
    if post is None:
        return None
    if complete or post >= PARTIAL_REMISSION_BELOW:
        return False
    if baseline is None:
        return None
    return at_most_percent(post, baseline, PARTIAL_REMISSION_AT_MOST_PCT)


def proteinuria(start: date | None, upcr: Iterable[Measurement]) -> Proteinuria:
    """Baseline: the latest counted UPCR collected on or before treatment start (no fallback);
    post: the latest collected after it; change % = (post − baseline) / baseline × 100, undefined
    for a zero baseline. Complete remission needs only the post value."""
    upcr = list(upcr)
    before = latest_on_or_before(upcr, start) if start is not None else None
    after = latest_after(upcr, start) if start is not None else None
    baseline = before.value if before is not None else None
    post = after.value if after is not None else None
    change_pct = (post - baseline) / baseline * 100 if post is not None and baseline not in (None, 0) else None
    complete = post < COMPLETE_REMISSION_BELOW if post is not None else None
    return Proteinuria(baseline, post, change_pct, complete, _partial_remission(post, baseline, complete))


# --- biopsies ---------------------------------------------------------------------------------

IgaStain = Literal["negative", "trace", "1+", "2+", "3+"]
_LEE_ORDER: tuple[LeeGrade, ...] = ("I", "II", "III", "IV", "V")


@dataclass(frozen=True, slots=True)
class Biopsy:
    """One biopsy's findings; every finding may be missing (``None``)."""

    performed_on: date
    mesangial_deposits: bool | None = None
    iga_immunofluorescence: IgaStain | None = None
    mesangial_proliferation: bool | None = None
    foot_process_effacement: bool | None = None
    lee_grade: LeeGrade | None = None

    @property
    def order_key(self) -> tuple[date, int, tuple[str, ...]]:
        """The order of "latest". Biopsies carry no time of day nor recording order, so of two
        performed on the same date the one reporting more findings is taken as the later (the
        fuller report of that day), and between equally full ones the larger findings as text —
        arbitrary, but never dependent on the order the biopsies were given in."""
        findings = astuple(self)[1:]
        return (self.performed_on, sum(f is not None for f in findings),
                tuple("" if f is None else str(f) for f in findings))


@dataclass(frozen=True, slots=True)
class BiopsyChanges:
    """Changes from the diagnostic to the follow-up biopsy. A finding missing on either side
    counts as not changed: a change must be seen, not assumed."""

    deposits_cleared: bool
    iga_cleared: bool
    proliferation_resolved: bool
    foot_process_improved: bool
    lee_grade_improved: bool


BIOPSY_CHANGES: tuple[str, ...] = tuple(f.name for f in fields(BiopsyChanges))
"""The fields of ``BiopsyChanges``, in order (a patient's values and the group counts use them)."""


def paired_biopsies(start: date | None, biopsies: Iterable[Biopsy]) -> tuple[Biopsy, Biopsy] | None:
    """(diagnostic, follow-up): the latest biopsy performed on or before treatment start and the
    latest after it; ``None`` unless both exist."""
    if start is None:
        return None
    ordered = sorted(biopsies, key=lambda b: b.order_key)
    before = [b for b in ordered if b.performed_on <= start]
    after = [b for b in ordered if b.performed_on > start]
    return (before[-1], after[-1]) if before and after else None


def _true_to_false(before: bool | None, after: bool | None) -> bool:
    return before is True and after is False


def _lee_improved(before: LeeGrade | None, after: LeeGrade | None) -> bool:
    return before is not None and after is not None and _LEE_ORDER.index(after) < _LEE_ORDER.index(before)


def biopsy_changes(start: date | None, biopsies: Iterable[Biopsy]) -> BiopsyChanges | None:
    """The changes of a patient's paired biopsies; ``None`` when they are not paired."""
    pair = paired_biopsies(start, biopsies)
    if pair is None:
        return None
    before, after = pair
    return BiopsyChanges(
        deposits_cleared=_true_to_false(before.mesangial_deposits, after.mesangial_deposits),
        iga_cleared=(before.iga_immunofluorescence not in (None, "negative")
                     and after.iga_immunofluorescence == "negative"),
        proliferation_resolved=_true_to_false(before.mesangial_proliferation, after.mesangial_proliferation),
        foot_process_improved=_true_to_false(before.foot_process_effacement, after.foot_process_effacement),
        lee_grade_improved=_lee_improved(before.lee_grade, after.lee_grade),
    )


def biopsy_summary(changes: Iterable[BiopsyChanges | None]) -> dict[str, int]:
    """``GET /v1/cohorts/{group}/biopsies``: patients with paired biopsies and, among them, those
    with each change. One entry per patient of the group (``None``: not paired)."""
    paired = [c for c in changes if c is not None]
    return {
        "paired": len(paired),
        "deposits_cleared": sum(c.deposits_cleared for c in paired),
        "iga_cleared": sum(c.iga_cleared for c in paired),
        "proliferation_resolved": sum(c.proliferation_resolved for c in paired),
        "foot_process_improved": sum(c.foot_process_improved for c in paired),
        "lee_grade_improved": sum(c.lee_grade_improved for c in paired),
    }


# --- adverse events ---------------------------------------------------------------------------

Intervention = Literal["mp_pulse", "cell_infusion", "fat_harvest"]
Causality = Literal["unrelated", "unlikely", "possible", "probable", "definite"]
INTERVENTIONS: tuple[Intervention, ...] = ("mp_pulse", "cell_infusion", "fat_harvest")
_RELATED_CAUSALITY = frozenset({"possible", "probable", "definite"})
GRADES = (1, 2, 3, 4, 5)
"""CTCAE v5 grades."""


@dataclass(frozen=True, slots=True)
class AdverseEventReport:
    """One report (first or follow-up) of an adverse event, with what the statistics read."""

    ae_id: str
    term: str
    grade: int
    serious: bool
    causality: Causality
    related_to: tuple[Intervention, ...] = ()

    @property
    def treatment_related(self) -> bool:
        return bool(self.related_to) and self.causality in _RELATED_CAUSALITY

    @property
    def significant(self) -> bool:
        return self.grade >= 3 or self.serious

    @property
    def significant_related(self) -> bool:
        return self.significant and self.treatment_related


def adverse_events(reports: Iterable[AdverseEventReport]) -> list[AdverseEventReport]:
    """Each adverse event's state: its latest report, the reports being in the order given
    (the order they were recorded in). In ``ae_id`` order. Every AE counts, whenever its onset:
    the contract does not restrict safety to treatment-emergent events."""
    latest: dict[str, AdverseEventReport] = {}
    for report in reports:
        latest[report.ae_id] = report
    return [latest[ae_id] for ae_id in sorted(latest)]


@dataclass(frozen=True, slots=True)
class PatientSafety:
    adverse_events: int
    highest_grade: int | None
    any_serious: bool
    any_significant_related: bool


def patient_safety(reports: Iterable[AdverseEventReport]) -> PatientSafety:
    """Number of AEs, highest grade (``None`` without AEs), any serious, any treatment-related
    and significant — from each AE's latest report."""
    states = adverse_events(reports)
    return PatientSafety(
        adverse_events=len(states),
        highest_grade=max((ae.grade for ae in states), default=None),
        any_serious=any(ae.serious for ae in states),
        any_significant_related=any(ae.significant_related for ae in states),
    )


def _term_row(term: str, events: Sequence[tuple[int, AdverseEventReport]]) -> dict[str, Any]:
    return {
        "term": term,
        "events": len(events),
        "patients": len({patient for patient, _ in events}),
        "max_grade": max(ae.grade for _, ae in events),
        "serious": sum(ae.serious for _, ae in events),
        "related": sum(ae.treatment_related for _, ae in events),
        "significant_related": sum(ae.significant_related for _, ae in events),
    }


def safety_summary(patients: Iterable[Iterable[AdverseEventReport]]) -> dict[str, Any]:
    """``GET /v1/cohorts/{group}/safety``: AEs by term, grade, seriousness and relatedness, from
    each AE's latest report. One entry per patient of the group (empty when they have none).

    ``patients`` and ``patients_with_*`` count patients; every other number counts AEs.
    ``related`` is treatment-related (an intervention named and causality possible, probable or
    definite), ``significant_related`` also significant (grade ≥ 3 or serious);
    ``related_by_intervention`` counts the treatment-related AEs naming each intervention (an
    AE naming two counts under both). ``by_grade`` has every CTCAE grade, zeros included;
    ``by_term`` is sorted by term, terms as reported (no MedDRA coding)."""
    states = [adverse_events(reports) for reports in patients]
    events = [(patient, ae) for patient, aes in enumerate(states) for ae in aes]
    by_term: dict[str, list[tuple[int, AdverseEventReport]]] = {}
    for patient, ae in events:
        by_term.setdefault(ae.term, []).append((patient, ae))
    return {
        "patients": len(states),
        "patients_with_ae": sum(bool(aes) for aes in states),
        "patients_with_serious_ae": sum(any(ae.serious for ae in aes) for aes in states),
        "patients_with_significant_related_ae": sum(any(ae.significant_related for ae in aes) for aes in states),
        "events": len(events),
        "serious": sum(ae.serious for _, ae in events),
        "related": sum(ae.treatment_related for _, ae in events),
        "significant_related": sum(ae.significant_related for _, ae in events),
        "by_grade": {str(g): sum(ae.grade == g for _, ae in events) for g in GRADES},
        "related_by_intervention": {
            i: sum(ae.treatment_related and i in ae.related_to for _, ae in events) for i in INTERVENTIONS
        },
        "by_term": [_term_row(term, rows) for term, rows in sorted(by_term.items())],
    }


# --- the cohort row ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PatientEvidence:
    """One patient's v2 values that the cohort row aggregates."""

    proteinuria: Proteinuria
    decline_40_on: date | None
    composite: TimeToEvent | None
    safety: PatientSafety


def cohort_evidence(patients: Iterable[PatientEvidence]) -> dict[str, Any]:
    """The v2 keys of a ``GET /v1/cohorts`` row: means over the patients where the value is
    defined (unrounded, ``None`` when none defines it) and counts of patients. A patient never
    at risk for the composite endpoint (``composite`` None) does not count as reaching it."""
    patients = list(patients)
    return {
        "mean_baseline_upcr": mean([p.proteinuria.baseline_upcr for p in patients
                                    if p.proteinuria.baseline_upcr is not None]),
        "mean_post_upcr": mean([p.proteinuria.post_upcr for p in patients if p.proteinuria.post_upcr is not None]),
        "complete_remission_count": sum(p.proteinuria.complete_remission is True for p in patients),
        "partial_remission_count": sum(p.proteinuria.partial_remission is True for p in patients),
        "decline_40_count": sum(p.decline_40_on is not None for p in patients),
        "composite_endpoint_count": sum(p.composite is not None and p.composite.observed for p in patients),
        "patients_with_ae": sum(p.safety.adverse_events > 0 for p in patients),
        "patients_with_serious_ae": sum(p.safety.any_serious for p in patients),
        "patients_with_significant_related_ae": sum(p.safety.any_significant_related for p in patients),
    }
