"""ADaM (ADaMIG 1.3) datasets of the study: ADSL, one record per subject, and ADTTE, the
composite kidney endpoint per subject — pure, subjects in, a dataset out.

ADTTE's values are :func:`services.outcomes.endpoints.composite_endpoint`'s, unchanged: AVAL is
its ``days`` (from treatment start, no ADaM "+1"), CNSR its ``cnsr`` (1 censored, 0 an event).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

from services.outcomes.cdisc.model import Dataset, Variable, dataset
from services.outcomes.cdisc.study import ARMS, SITEID, STUDYID, Subject, treated
from services.outcomes.endpoints import KidneyCourse, TimeToEvent, composite_endpoint
from services.outcomes.measurements import Measurement

TRTN = {"A": 1, "B": 2, "control": 3}
"""TRT01PN / TRTPN: the groups' order in the protocol."""

_TREATMENT = (
    Variable("TRT01P", "Planned Treatment for Period 01"),
    Variable("TRT01PN", "Planned Treatment for Period 01 (N)", "integer"),
    Variable("TRT01A", "Actual Treatment for Period 01"),
    Variable("TRT01AN", "Actual Treatment for Period 01 (N)", "integer"),
)

_SUBJECT = (
    Variable("STUDYID", "Study Identifier"),
    Variable("USUBJID", "Unique Subject Identifier", key=1),
    Variable("SUBJID", "Subject Identifier for the Study"),
    Variable("SITEID", "Study Site Identifier"),
    Variable("AGE", "Age", "integer"),
    Variable("AGEU", "Age Units"),
    Variable("SEX", "Sex"),
)
"""What every ADaM dataset says about the subject first (ADSL's values)."""
_POPULATIONS = (
    Variable("ITTFL", "Intent-To-Treat Population Flag"),
    Variable("SAFFL", "Safety Population Flag"),
)

ADSL_VARIABLES = (
    *_SUBJECT,
    Variable("ARM", "Description of Planned Arm"),
    Variable("ACTARM", "Description of Actual Arm"),
    *_TREATMENT,
    Variable("ENRLDT", "Date of Enrollment", "sas_date"),
    Variable("TRTSDT", "Date of First Exposure to Treatment", "sas_date"),
    Variable("TRTEDT", "Date of Last Exposure to Treatment", "sas_date"),
    *_POPULATIONS,
    Variable("WEIGHTBL", "Baseline Weight (kg)", "float"),
    Variable("EGFRBL", "Baseline eGFR (mL/min/1.73m2)", "float"),
    Variable("EGFRBLSR", "Source of Baseline eGFR"),
    Variable("LEEGRBL", "Lee Grade at Enrollment"),
    Variable("KFFL", "Kidney Failure Flag"),
    Variable("KFDT", "Date of Kidney Failure", "sas_date"),
    Variable("DTHFL", "Subject Died?"),
    Variable("DTHDT", "Date of Death", "sas_date"),
    Variable("EOSSTT", "End of Study Status"),
    Variable("EOSDT", "End of Study Date", "sas_date"),
    Variable("DCSREAS", "Reason for Discontinuation from Study"),
)


def _treatment(subject: Subject) -> dict[str, Any]:
    group = subject.facts.group
    planned = {"TRT01P": ARMS[group][1], "TRT01PN": TRTN[group]}
    actual = {"TRT01A": ARMS[group][1], "TRT01AN": TRTN[group]} if treated(subject) else {}
    return {**planned, **actual}


def _subject(subject: Subject) -> dict[str, Any]:
    """The values of ``_SUBJECT`` and ``_POPULATIONS``: ITT is every enrolled subject, safety
    those treated (control: all)."""
    return {"STUDYID": STUDYID, "USUBJID": subject.usubjid, "SUBJID": subject.subject_id, "SITEID": SITEID,
            "AGE": subject.facts.age_years, "AGEU": "YEARS", "SEX": subject.facts.sex,
            "ITTFL": "Y", "SAFFL": "Y" if treated(subject) else "N"}


def _end_of_study(subject: Subject) -> dict[str, Any]:
    """Discontinued at the first of death and withdrawal; ongoing without either."""
    ends = [(on, reason) for on, reason in ((subject.outcome.died_on, "DEATH"),
                                            (subject.outcome.withdrawn_on, "WITHDRAWAL BY SUBJECT")) if on]
    if not ends:
        return {"EOSSTT": "ONGOING"}
    on, reason = min(ends)
    return {"EOSSTT": "DISCONTINUED", "EOSDT": on, "DCSREAS": reason}


def adsl(subjects: Iterable[Subject]) -> Dataset:
    records = []
    for s in sorted(subjects, key=lambda s: s.usubjid):
        f, o = s.facts, s.outcome
        exposure = s.exposure_dates
        records.append({
            **_subject(s), "ARM": ARMS[f.group][1],
            "ACTARM": ARMS[f.group][1] if treated(s) else None, **_treatment(s),
            "ENRLDT": f.enrolled_on, "TRTSDT": exposure[0] if exposure else None,
            "TRTEDT": exposure[-1] if exposure else None,
            "WEIGHTBL": f.weight_kg,
            "EGFRBL": o.baseline_egfr, "EGFRBLSR": o.baseline_source.upper() if o.baseline_source else None,
            "LEEGRBL": f.lee_grade, "KFFL": "Y" if o.kidney_failure else "N", "KFDT": o.kidney_failure_on,
            "DTHFL": "Y" if o.died_on else None, "DTHDT": o.died_on, **_end_of_study(s),
        })
    return dataset("ADSL", "Subject-Level Analysis Dataset", ADSL_VARIABLES, records)


# --- ADTTE ------------------------------------------------------------------------------------

PARAMCD = "COMPKID"
PARAM = "Time to Composite Kidney Endpoint (days)"

ADTTE_VARIABLES = (
    *_SUBJECT,
    Variable("TRTP", "Planned Treatment"),
    Variable("TRTPN", "Planned Treatment (N)", "integer"),
    Variable("TRTA", "Actual Treatment"),
    Variable("TRTAN", "Actual Treatment (N)", "integer"),
    Variable("PARAM", "Parameter"),
    Variable("PARAMCD", "Parameter Code", key=2),
    Variable("AVAL", "Analysis Value", "integer"),
    Variable("STARTDT", "Time to Event Origin Date for Subject", "sas_date"),
    Variable("ADT", "Analysis Date", "sas_date"),
    Variable("CNSR", "Censor", "integer"),
    Variable("EVNTDESC", "Event or Censoring Description"),
    Variable("CNSDTDSC", "Censor Date Description"),
    *_POPULATIONS,
)

EVENT_DESCRIPTIONS = {
    "decline_40": "CONFIRMED 40% EGFR DECLINE",
    "kidney_failure": "KIDNEY FAILURE",
    "death": "DEATH",
}
CENSORED = "CENSORED AT LAST COUNTED EGFR"
CENSOR_DATE = "LAST COUNTED EGFR AFTER TREATMENT START"
NO_EGFR = "NO COUNTED EGFR AFTER TREATMENT START"


def kidney_course(subject: Subject) -> KidneyCourse:
    """What the composite endpoint reads, from the projection's facts and contract values:
    treatment start, the contract baseline eGFR, the counted eGFRs, kidney failure and death."""
    f, o = subject.facts, subject.outcome
    return KidneyCourse(
        treatment_start=o.treatment_start, baseline_egfr=o.baseline_egfr,
        egfr=tuple(Measurement(p.result_id, p.egfr, p.collected_at) for p in f.counted_points()),
        kidney_failure_on=f.kidney_failure_on, died_on=o.died_on,
    )


def _describe(endpoint: TimeToEvent) -> dict[str, Any]:
    if endpoint.event is not None:
        return {"EVNTDESC": EVENT_DESCRIPTIONS[endpoint.event]}
    if endpoint.days:
        return {"EVNTDESC": CENSORED, "CNSDTDSC": CENSOR_DATE}
    return {"EVNTDESC": NO_EGFR, "CNSDTDSC": "TREATMENT START"}


def adtte(subjects: Iterable[Subject]) -> Dataset:
    """One COMPKID record per subject at risk (a treatment start, no kidney failure or death
    before it); a subject never at risk has no time to the endpoint and no record."""
    records = []
    for s in sorted(subjects, key=lambda s: s.usubjid):
        endpoint = composite_endpoint(kidney_course(s))
        if endpoint is None:
            continue
        start: date = s.outcome.treatment_start  # type: ignore[assignment]  # at risk: there is a start
        treatment = _treatment(s)
        records.append({
            **_subject(s), "TRTP": treatment["TRT01P"], "TRTPN": treatment["TRT01PN"],
            "TRTA": treatment.get("TRT01A"), "TRTAN": treatment.get("TRT01AN"),
            "PARAM": PARAM, "PARAMCD": PARAMCD, "AVAL": endpoint.days, "STARTDT": start,
            "ADT": start + timedelta(days=endpoint.days), "CNSR": endpoint.cnsr, **_describe(endpoint),
        })
    return dataset("ADTTE", "Time-to-Event Analysis Dataset", ADTTE_VARIABLES, records)
