"""The demo study, patient by patient: sent through the system, it reproduces the abstract.

Published abstract (rounded): group A (CKD G3b–G5), n = 7, mean age 60, mean eGFR 28 → 39
over a mean follow-up of 6.8 years; group B (Lee grade IV–V), n = 3, mean age 25, eGFR
85 → 106 over 9.3 years; one control patient (eGFR 33) started dialysis within two years.
"No significant side-effects were noted": the seed's adverse events are the minor ones MP
pulses cause (grade 1–2 hyperglycaemia, insomnia, facial flushing), none serious. "Follow-up
renal biopsy showed disappearance of mesangial deposits … and of IgA deposition": group B's
diagnostic and follow-up biopsies. Proteinuria (UPCR) falls with therapy in A and B.

Why plain data: ``nephrotrack demo`` must publish every record through the public interfaces
(HTTP commands, lab messages), exactly as sites would, so the cohort numbers it prints are the
system's own. Each :class:`SeedPatient` therefore holds the contract's JSON bodies, in the
order they are sent. Nothing here is random.

How the published means are hit exactly: the values that decide them — the baseline (latest
counted eGFR on or before the first dose) and the post-therapy eGFR (the latest one) — are
reported eGFRs with whole-number values. Creatinine results (mg/dL and µmol/L) sit in between
and carry the creatinine whose CKD-EPI 2021 eGFR is the intended value. Follow-up is counted in
whole days, so a mean of exactly 6.8 (or 9.3) years is impossible; the day totals below are the
closest possible, and the exact means are stated in constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal

import numpy as np

Body = dict[str, Any]
Analyte = Literal["egfr", "mg/dL", "umol/L"]

DAYS_PER_YEAR = 365.25
CYCLE_EVERY_DAYS = 28  # one 3-day pulse cycle every four weeks
MAX_DOSE_MG = 1000.0
DOSE_MG_PER_KG = 25.0
CREATININE_UMOL_PER_MG_DL = 88.4  # µmol/L per mg/dL (KDIGO)
LAB_ID = "LAB-CENTRAL-01"

# Follow-up day totals: 6.8 × 7 × 365.25 = 17385.9 and 9.3 × 3 × 365.25 = 10190.475 days.
GROUP_A_FOLLOWUP_DAYS = 17386
GROUP_B_FOLLOWUP_DAYS = 10190
GROUP_A_MEAN_FOLLOWUP_YEARS = GROUP_A_FOLLOWUP_DAYS / (7 * DAYS_PER_YEAR)  # 6.800039…
GROUP_B_MEAN_FOLLOWUP_YEARS = GROUP_B_FOLLOWUP_DAYS / (3 * DAYS_PER_YEAR)  # 9.299566…

ABSTRACT: dict[str, dict[str, Any]] = {
    "A": {"n": 7, "mean_age": 60, "mean_baseline_egfr": 28, "mean_post_egfr": 39, "mean_followup_years": 6.8},
    "B": {"n": 3, "mean_age": 25, "mean_baseline_egfr": 85, "mean_post_egfr": 106, "mean_followup_years": 9.3},
    "control": {"n": 1, "baseline_egfr": 33, "dialysis_within_years": 2},
}


@dataclass(frozen=True)
class SeedPatient:
    """One patient's records as contract JSON bodies, in sending order.

    ``harvests`` holds (harvest body, release body, infusion body); the infusion body has no
    ``lot_id`` because the lot id is only known from the harvest response — the runner adds it
    (build a new dict; do not mutate these). ``lab_results`` are ``labs.results`` messages; send
    them after the enrollment is known to labs, which needs sex and age for CKD-EPI.
    """

    enrollment: Body
    pulse_doses: list[Body] = field(default_factory=list)
    harvests: list[tuple[Body, Body, Body]] = field(default_factory=list)
    clinical_events: list[Body] = field(default_factory=list)
    lab_results: list[Body] = field(default_factory=list)
    urine_results: list[Body] = field(default_factory=list)
    """UPCR results, ``labs.results`` messages like ``lab_results``."""
    biopsies: list[Body] = field(default_factory=list)
    adverse_events: list[tuple[str, Body]] = field(default_factory=list)
    """(ae_id, body) in sending order: a later body for the same id is a follow-up report."""

    @property
    def subject_id(self) -> str:
        return str(self.enrollment["subject_id"])


# --- CKD-EPI 2021, inverted -------------------------------------------------------------------

def ckd_epi_2021_factor(age_years: int, sex: str) -> float:
    """142 × 0.9938^age (× 1.012 for women): the eGFR at creatinine = κ."""
    return 142.0 * 0.9938**age_years * (1.012 if sex == "F" else 1.0)


def creatinine_for_egfr(egfr: float, age_years: int, sex: str) -> float:
    """Serum creatinine (mg/dL) whose CKD-EPI 2021 eGFR is ``egfr``.

    The equation is 142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^−1.200 × 0.9938^age (× 1.012 F),
    κ = 0.7 F / 0.9 M, α = −0.241 F / −0.302 M; it is strictly decreasing in Scr, so each
    branch inverts in closed form. At Scr = κ the eGFR equals the age/sex factor, which tells
    the branches apart.
    """
    kappa, alpha = (0.7, -0.241) if sex == "F" else (0.9, -0.302)
    ratio = egfr / ckd_epi_2021_factor(age_years, sex)
    exponent = alpha if ratio >= 1 else -1.200
    return kappa * ratio ** (1 / exponent)


def age_on(age_at_enrollment: int, enrolled_on: date, on: date) -> int:
    """Contract age for CKD-EPI: enrollment age plus whole years, by anniversary, since then."""
    years = on.year - enrolled_on.year - ((on.month, on.day) < (enrolled_on.month, enrolled_on.day))
    return age_at_enrollment + years


# --- the plan: the clinical course each patient's records describe ----------------------------

@dataclass(frozen=True)
class _Lab:
    day: int  # days from treatment start (negative: before it)
    egfr: float  # the intended eGFR
    analyte: Analyte = "egfr"
    status: Literal["final", "preliminary"] = "final"
    wrong_first: float | None = None  # sent first as `final`, then corrected to `egfr`


@dataclass(frozen=True)
class _Plan:
    subject_id: str
    sex: Literal["F", "M"]
    age: int
    weight_kg: float
    group: Literal["A", "B", "control"]
    lee_grade: str
    enrolled_on: date
    start: date  # first pulse dose; control: enrolled_on
    baseline: float
    post: float
    followup_days: int
    cycles: int = 0
    infusions: int = 0
    labs: tuple[_Lab, ...] = ()
    dialysis_day: int | None = None

    def day(self, offset: int) -> date:
        return self.start + timedelta(days=offset)


_INTERIM = ((0.08, 1.4), (0.25, -0.9), (0.5, 0.7), (0.75, -0.5))  # (fraction of follow-up, wiggle)


def _course(
    baseline: float,
    post: float,
    followup_days: int,
    *,
    baseline_day: int = 0,
    creatinine_at: dict[int, Analyte] | None = None,
    before: tuple[_Lab, ...] = (),
    final_typo: float | None = None,
    after: tuple[_Lab, ...] = (),
) -> tuple[_Lab, ...]:
    """A treated patient's results: the baseline, four interim results rising from baseline
    towards the post-therapy value (square-root shape plus a fixed wiggle), and the last one.
    ``creatinine_at`` turns interim results (by index) into creatinine measurements."""
    creatinine_at = creatinine_at or {}
    interim = tuple(
        _Lab(round(f * followup_days), round(baseline + (post - baseline) * math.sqrt(f) + wiggle, 1),
             creatinine_at.get(i, "egfr"))
        for i, (f, wiggle) in enumerate(_INTERIM)
    )
    last = _Lab(followup_days, post, wrong_first=final_typo)
    return (*before, _Lab(baseline_day, baseline), *interim, last, *after)


def _treated(
    subject_id: str, sex: Literal["F", "M"], age: int, weight_kg: float, lee_grade: str,
    enrolled_on: str, first_dose_after_days: int, baseline: float, post: float, followup_days: int,
    cycles: int, infusions: int, **course: Any,
) -> _Plan:
    enrolled = date.fromisoformat(enrolled_on)
    return _Plan(
        subject_id=subject_id, sex=sex, age=age, weight_kg=weight_kg,
        group="A" if subject_id.startswith("IGA-A") else "B", lee_grade=lee_grade,
        enrolled_on=enrolled, start=enrolled + timedelta(days=first_dose_after_days),
        baseline=baseline, post=post, followup_days=followup_days, cycles=cycles, infusions=infusions,
        labs=_course(baseline, post, followup_days, **course),
    )


_PLANS: tuple[_Plan, ...] = (
    # Group A: ages sum 420 (mean 60), baselines 196 (28), post 273 (39), days 17386.
    _treated("IGA-A-001", "F", 58, 48.5, "IV", "2014-03-02", 8, 27.0, 38.0, 1900, 6, 3,
             baseline_day=-8, before=(_Lab(-33, 26.0),), creatinine_at={1: "mg/dL"}),
    _treated("IGA-A-002", "M", 52, 49.5, "IV", "2013-05-14", 13, 31.0, 44.0, 2890, 12, 4,
             final_typo=4.4),
    _treated("IGA-A-003", "F", 61, 44.0, "III", "2015-09-21", 14, 22.0, 30.0, 2230, 3, 2,
             before=(_Lab(-14, 22.6, "umol/L"),)),
    _treated("IGA-A-004", "M", 67, 48.0, "V", "2012-01-16", 14, 35.0, 47.0, 3070, 17, 4,
             baseline_day=-3, creatinine_at={2: "mg/dL"}),
    _treated("IGA-A-005", "F", 55, 42.5, "IV", "2016-02-08", 14, 24.0, 33.0, 2120, 8, 2,
             after=(_Lab(2165, 26.0, status="preliminary"),)),
    _treated("IGA-A-006", "F", 63, 45.5, "IV", "2013-10-07", 14, 29.0, 41.0, 2670, 10, 3),
    _treated("IGA-A-007", "F", 64, 39.6, "V", "2014-11-03", 14, 28.0, 40.0, 2506, 5, 3,
             creatinine_at={0: "mg/dL"}),
    # Group B: ages sum 75 (mean 25), baselines 255 (85), post 318 (106), days 10190.
    _treated("IGA-B-001", "F", 22, 47.0, "IV", "2009-06-15", 14, 82.0, 101.0, 3300, 4, 2,
             creatinine_at={1: "mg/dL"}),
    _treated("IGA-B-002", "M", 24, 49.0, "V", "2010-03-08", 14, 88.0, 112.0, 3450, 7, 3,
             before=(_Lab(-14, 87.2, "umol/L"),)),
    _treated("IGA-B-003", "F", 29, 44.5, "IV", "2011-01-24", 14, 85.0, 105.0, 3440, 3, 2),
    # Control: eGFR 33 at enrollment, declining, dialysis at day 660 (1.81 years).
    _Plan(
        subject_id="IGA-C-001", sex="M", age=57, weight_kg=63.0, group="control", lee_grade="III",
        enrolled_on=date(2013, 4, 1), start=date(2013, 4, 1), baseline=33.0, post=23.1,
        followup_days=560, dialysis_day=660,
        labs=(_Lab(0, 33.0), _Lab(240, 29.4), _Lab(420, 26.0, "mg/dL"), _Lab(560, 23.1)),
    ),
)


# --- the rest of the abstract's evidence: proteinuria, adverse events, biopsies -----------------

UPCR_LOINC = "2890-2"  # Protein/Creatinine [Mass Ratio] in Urine
UPCR_SI_LOINC = "34366-5"  # Protein/Creatinine [Ratio] in Urine, sent in mg/mmol
MG_PER_MMOL_PER_G_PER_G = 113.12  # 1 g/g = 113.12 mg/mmol (creatinine 113.12 g/mol)

UrineForm = Literal["g/g", "mg/g", "mg/mmol"]


@dataclass(frozen=True)
class _Upcr:
    day: int  # days from treatment start
    g_per_g: float  # the intended UPCR, g/g
    form: UrineForm = "g/g"  # the unit the lab sends it in


_UPCR: dict[str, tuple[_Upcr, ...]] = {
    # (baseline g/g, post g/g): A 2.6→0.8 partial, 3.1→1.2 none, 1.9→0.25 complete, 3.4→1.6 none,
    # 2.2→0.6 partial, 2.8→0.9 partial, 2.5→0.7 partial; B 1.6→0.18 and 2.2→0.25 complete,
    # 1.4→0.4 partial; control 2.1 rising to 2.9 (no treatment).
    "IGA-A-001": (_Upcr(-8, 2.6, "mg/g"), _Upcr(400, 1.4, "mg/g"), _Upcr(1900, 0.8, "mg/g")),
    "IGA-A-002": (_Upcr(-5, 3.1, "mg/mmol"), _Upcr(700, 1.9, "mg/mmol"), _Upcr(2890, 1.2, "mg/mmol")),
    "IGA-A-003": (_Upcr(-14, 1.9), _Upcr(500, 0.7), _Upcr(2230, 0.25)),
    "IGA-A-004": (_Upcr(-3, 3.4), _Upcr(900, 2.2), _Upcr(3070, 1.6)),
    "IGA-A-005": (_Upcr(-7, 2.2), _Upcr(2120, 0.6)),
    "IGA-A-006": (_Upcr(-7, 2.8, "mg/g"), _Upcr(1200, 1.3, "mg/g"), _Upcr(2670, 0.9, "mg/g")),
    "IGA-A-007": (_Upcr(-7, 2.5), _Upcr(2506, 0.7)),
    "IGA-B-001": (_Upcr(-7, 1.6), _Upcr(365, 0.6), _Upcr(3300, 0.18)),
    "IGA-B-002": (_Upcr(-14, 2.2, "mg/mmol"), _Upcr(3450, 0.25, "mg/mmol")),
    "IGA-B-003": (_Upcr(-7, 1.4), _Upcr(3440, 0.4)),
    "IGA-C-001": (_Upcr(0, 2.1), _Upcr(420, 2.5), _Upcr(560, 2.9)),
}


def _mp_side_effect(term: str, grade: int, onset_day: int, resolved_after: int, causality: str) -> Body:
    """A minor side effect of the MP pulses: related, not serious, recovered."""
    return {"term": term, "onset_day": onset_day, "grade": grade, "serious": False, "related_to": ["mp_pulse"],
            "causality": causality, "outcome": "recovered", "resolved_after": resolved_after}


_ADVERSE_EVENTS: dict[str, tuple[tuple[str, Body], ...]] = {
    "IGA-A-001": (
        ("AE-1", {**_mp_side_effect("hyperglycaemia", 1, 1, 0, "probable"), "outcome": "recovering"}),
        ("AE-1", _mp_side_effect("hyperglycaemia", 2, 1, 4, "probable")),  # the follow-up report
        ("AE-2", _mp_side_effect("insomnia", 1, 2, 3, "possible")),
    ),
    "IGA-A-002": (("AE-1", _mp_side_effect("facial flushing", 1, 1, 2, "probable")),),
    "IGA-A-004": (("AE-1", _mp_side_effect("hyperglycaemia", 2, 29, 6, "probable")),),
    "IGA-A-005": (("AE-1", {"term": "upper respiratory tract infection", "onset_day": 300, "grade": 2,
                            "serious": False, "related_to": [], "causality": "unrelated",
                            "outcome": "recovered", "resolved_after": 10}),),
    "IGA-A-006": (("AE-1", _mp_side_effect("insomnia", 1, 1, 2, "possible")),),
    "IGA-B-001": (("AE-1", _mp_side_effect("facial flushing", 1, 1, 1, "probable")),),
    "IGA-B-002": (("AE-1", _mp_side_effect("hyperglycaemia", 1, 2, 3, "possible")),),
}


_DIAGNOSTIC = {"mesangial_deposits": True, "mesangial_proliferation": True, "foot_process_effacement": True}
_BIOPSIES: dict[str, tuple[tuple[int, Body], ...]] = {
    # (days from treatment start, findings); the diagnostic one on the enrollment day.
    "IGA-B-001": ((-14, {**_DIAGNOSTIC, "iga_immunofluorescence": "3+", "lee_grade": "IV"}),
                  (730, {"mesangial_deposits": False, "iga_immunofluorescence": "negative",
                         "mesangial_proliferation": False, "foot_process_effacement": False, "lee_grade": "II"})),
    "IGA-B-002": ((-14, {**_DIAGNOSTIC, "iga_immunofluorescence": "3+", "lee_grade": "V"}),
                  (760, {"mesangial_deposits": False, "iga_immunofluorescence": "negative",
                         "mesangial_proliferation": False, "foot_process_effacement": False, "lee_grade": "III"})),
    "IGA-B-003": ((-14, {**_DIAGNOSTIC, "iga_immunofluorescence": "2+", "lee_grade": "IV"}),
                  (700, {"mesangial_deposits": False, "iga_immunofluorescence": "negative",
                         "mesangial_proliferation": True, "foot_process_effacement": False, "lee_grade": "IV"})),
}


# --- plan → contract bodies -------------------------------------------------------------------

def daily_dose_mg(weight_kg: float) -> float:
    """25 mg/kg, capped at 1000 mg, to the nearest 10 mg. Within 20–30 mg/kg (no deviation)
    only up to 50 kg: above that the cap falls below 20 mg/kg, so the seed's weights stay ≤ 50."""
    return min(MAX_DOSE_MG, round(DOSE_MG_PER_KG * weight_kg / 10) * 10.0)


def _enrollment(p: _Plan) -> Body:
    return {
        "subject_id": p.subject_id, "sex": p.sex, "age_years": p.age, "weight_kg": p.weight_kg,
        "group": p.group, "enrolled_on": p.enrolled_on.isoformat(), "baseline_egfr": p.baseline,
        "lee_grade": p.lee_grade,
    }


def _pulse_doses(p: _Plan) -> list[Body]:
    return [
        {"cycle": c, "day": d, "given_on": p.day(CYCLE_EVERY_DAYS * (c - 1) + d - 1).isoformat(),
         "dose_mg": daily_dose_mg(p.weight_kg), "weight_kg": p.weight_kg}
        for c in range(1, p.cycles + 1)
        for d in (1, 2, 3)
    ]


def _harvests(p: _Plan) -> list[tuple[Body, Body, Body]]:
    """Infusions every eight weeks from two weeks after the last pulse cycle; each from its own
    harvest three weeks earlier (one harvest, one lot, one infusion)."""
    first = CYCLE_EVERY_DAYS * p.cycles + 14
    chain = []
    for i in range(p.infusions):
        given_on = p.day(first + 56 * i)
        chain.append((
            {"harvested_on": (given_on - timedelta(days=21)).isoformat(), "fat_grams": 110 + 10 * i},
            {"cell_count": 3.3e7 + 1e6 * i, "viability_pct": 88 + 2 * i},
            {"given_on": given_on.isoformat(), "cell_count": (2.9e7, 3.0e7, 3.1e7, 3.0e7)[i]},
        ))
    return chain


def _lab_value(p: _Plan, lab: _Lab) -> tuple[str, float, str]:
    """(LOINC, value, unit) of a result whose eGFR is the intended one."""
    if lab.analyte == "egfr":
        return "98979-8", lab.egfr, "mL/min/1.73m2"
    creatinine = creatinine_for_egfr(lab.egfr, age_on(p.age, p.enrolled_on, p.day(lab.day)), p.sex)
    if lab.analyte == "mg/dL":
        return "2160-0", creatinine, "mg/dL"
    return "14682-9", creatinine * CREATININE_UMOL_PER_MG_DL, "umol/L"


def _lab_results(p: _Plan) -> list[Body]:
    messages: list[Body] = []
    for n, lab in enumerate(sorted(p.labs, key=lambda lab: lab.day), start=1):
        loinc, value, unit = _lab_value(p, lab)
        message_id = f"{p.subject_id}-M{n:02d}"
        result = {
            "message_id": message_id, "subject_id": p.subject_id, "lab_id": LAB_ID,
            "loinc": loinc, "value": value, "unit": unit,
            "collected_at": f"{p.day(lab.day).isoformat()}T07:30:00Z", "status": lab.status,
            "result_id": f"{p.subject_id}-R{n:02d}",
        }
        if lab.wrong_first is not None:
            messages.append({**result, "value": lab.wrong_first})
            result = {**result, "message_id": f"{message_id}C", "status": "corrected"}
        messages.append(result)
    return messages


def _urine_value(upcr: _Upcr) -> tuple[str, float, str]:
    """(LOINC, value, unit) of a UPCR sent in the lab's unit."""
    if upcr.form == "mg/g":
        return UPCR_LOINC, upcr.g_per_g * 1000, "mg/g"
    if upcr.form == "mg/mmol":
        return UPCR_SI_LOINC, upcr.g_per_g * MG_PER_MMOL_PER_G_PER_G, "mg/mmol"
    return UPCR_LOINC, upcr.g_per_g, "g/g"


def _urine_results(p: _Plan) -> list[Body]:
    messages = []
    for n, upcr in enumerate(_UPCR.get(p.subject_id, ()), start=1):
        loinc, value, unit = _urine_value(upcr)
        messages.append({
            "message_id": f"{p.subject_id}-U{n:02d}", "subject_id": p.subject_id, "lab_id": LAB_ID,
            "loinc": loinc, "value": value, "unit": unit,
            "collected_at": f"{p.day(upcr.day).isoformat()}T08:00:00Z", "status": "final",
            "result_id": f"{p.subject_id}-UR{n:02d}",
        })
    return messages


def _adverse_events(p: _Plan) -> list[tuple[str, Body]]:
    reports = []
    for ae_id, plan in _ADVERSE_EVENTS.get(p.subject_id, ()):
        body = {key: value for key, value in plan.items() if key not in ("onset_day", "resolved_after")}
        onset = p.day(plan["onset_day"])
        resolved = onset + timedelta(days=plan["resolved_after"]) if plan["outcome"] == "recovered" else None
        reports.append((ae_id, {**body, "onset_on": onset.isoformat(),
                                "resolved_on": None if resolved is None else resolved.isoformat()}))
    return reports


def _biopsies(p: _Plan) -> list[Body]:
    return [{"performed_on": p.day(day).isoformat(), **findings} for day, findings in _BIOPSIES.get(p.subject_id, ())]


def _clinical_events(p: _Plan) -> list[Body]:
    if p.dialysis_day is None:
        return []
    return [{"type": "dialysis_started", "on": p.day(p.dialysis_day).isoformat()}]


def _seed_patient(p: _Plan) -> SeedPatient:
    return SeedPatient(
        enrollment=_enrollment(p), pulse_doses=_pulse_doses(p), harvests=_harvests(p),
        clinical_events=_clinical_events(p), lab_results=_lab_results(p), urine_results=_urine_results(p),
        biopsies=_biopsies(p), adverse_events=_adverse_events(p),
    )


def build_seed() -> list[SeedPatient]:
    """Fresh bodies each call, so a caller that mutates them cannot change the next demo."""
    return [_seed_patient(p) for p in _PLANS]


SEED: list[SeedPatient] = build_seed()


# --- what the system must compute from it -----------------------------------------------------

def _intended_slope(p: _Plan) -> float | None:
    """Least squares (numpy, independent of the outcomes code) over the counted results after
    treatment start, x in years from whole days."""
    points = [(lab.day / DAYS_PER_YEAR, lab.egfr) for lab in p.labs if lab.day > 0 and lab.status != "preliminary"]
    if len(points) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    return float(np.polyfit(xs, ys, 1)[0])


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _expected(group: str) -> dict[str, Any]:
    plans = [p for p in _PLANS if p.group == group]
    slopes = [s for p in plans if (s := _intended_slope(p)) is not None]
    return {
        "group": group,
        "n": len(plans),
        "mean_age": _mean([p.age for p in plans]),
        "mean_baseline_egfr": _mean([p.baseline for p in plans]),
        "mean_post_egfr": _mean([p.post for p in plans]),
        "mean_followup_years": _mean([p.followup_days / DAYS_PER_YEAR for p in plans]),
        "mean_egfr_slope": _mean(slopes) if slopes else None,
        "kidney_failure_count": sum(p.dialysis_day is not None for p in plans),
        **_expected_evidence(plans),
    }


def _upcr_pair(p: _Plan) -> tuple[float | None, float | None]:
    """(baseline, post) UPCR in g/g: the latest on or before treatment start, the latest after."""
    results = sorted(_UPCR.get(p.subject_id, ()), key=lambda u: u.day)
    before = [u.g_per_g for u in results if u.day <= 0]
    after = [u.g_per_g for u in results if u.day > 0]
    return (before[-1] if before else None), (after[-1] if after else None)


def _remission(p: _Plan) -> str | None:
    baseline, post = _upcr_pair(p)
    if post is None:
        return None
    if post < 0.3:
        return "complete"
    if baseline is not None and post < 1.0 and post <= 0.5 * baseline:
        return "partial"
    return None


def _final_reports(p: _Plan) -> list[Body]:
    """Each adverse event's latest report (a follow-up replaces the report before it)."""
    return list(dict(_adverse_events(p)).values())


def _significant_related(report: Body) -> bool:
    related = bool(report["related_to"]) and report["causality"] in ("possible", "probable", "definite")
    return related and (report["grade"] >= 3 or report["serious"])


def _expected_evidence(plans: list[_Plan]) -> dict[str, Any]:
    baselines = [b for p in plans if (b := _upcr_pair(p)[0]) is not None]
    posts = [v for p in plans if (v := _upcr_pair(p)[1]) is not None]
    return {
        "mean_baseline_upcr": _mean(baselines) if baselines else None,
        "mean_post_upcr": _mean(posts) if posts else None,
        "complete_remission_count": sum(_remission(p) == "complete" for p in plans),
        "partial_remission_count": sum(_remission(p) == "partial" for p in plans),
        "decline_40_count": 0,  # no eGFR of the seed falls to 60 % of its baseline
        "composite_endpoint_count": sum(p.dialysis_day is not None for p in plans),
        "patients_with_ae": sum(bool(_final_reports(p)) for p in plans),
        "patients_with_serious_ae": sum(any(r["serious"] for r in _final_reports(p)) for p in plans),
        "patients_with_significant_related_ae": sum(any(map(_significant_related, _final_reports(p))) for p in plans),
    }


def _expected_biopsies(group: str) -> dict[str, int]:
    """``GET /v1/cohorts/{group}/biopsies``: the paired diagnostic → follow-up comparisons."""
    pairs = [(b[0][1], b[-1][1]) for p in _PLANS if p.group == group
             if len(b := _BIOPSIES.get(p.subject_id, ())) >= 2]
    lee = ("I", "II", "III", "IV", "V")
    return {
        "paired": len(pairs),
        "deposits_cleared": sum(d["mesangial_deposits"] and not f["mesangial_deposits"] for d, f in pairs),
        "iga_cleared": sum(d["iga_immunofluorescence"] != "negative" and f["iga_immunofluorescence"] == "negative"
                           for d, f in pairs),
        "proliferation_resolved": sum(d["mesangial_proliferation"] and not f["mesangial_proliferation"] for d, f in pairs),
        "foot_process_improved": sum(d["foot_process_effacement"] and not f["foot_process_effacement"] for d, f in pairs),
        "lee_grade_improved": sum(lee.index(f["lee_grade"]) < lee.index(d["lee_grade"]) for d, f in pairs),
    }


EXPECTED_COHORTS: dict[str, dict[str, Any]] = {g: _expected(g) for g in ("A", "B", "control")}
EXPECTED_BIOPSIES: dict[str, dict[str, int]] = {g: _expected_biopsies(g) for g in ("A", "B", "control")}
"""The contract's cohort numbers the system must compute from the seed, unrounded. Means that
involve creatinine-derived eGFRs (only the slope) match to floating-point precision."""
