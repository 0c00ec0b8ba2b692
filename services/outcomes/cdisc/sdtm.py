"""SDTM (SDTMIG 3.4) datasets of the study: DM, EX, LB, AE and DS — pure, subjects and events in,
a :class:`~services.outcomes.cdisc.model.Dataset` out.

Variable names, labels and the controlled terms are the implementation guide's and CDISC CT's
where they define them; the choices they leave to the sponsor (arm codes, treatment names,
terms the study has no code list for) are listed in docs/exports.md, with every derivation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated, Causality
from contracts.labs import EgfrComputed, UrineResultMeasured
from services.outcomes.cdisc.model import Dataset, Variable, dataset
from services.outcomes.cdisc.study import ARMS, SITEID, STUDYID, Subject, by_subject, sequenced, study_day, treated
from shared.moments import as_utc

AdverseEventReport = AdverseEventReported | AdverseEventUpdated


def _identifiers(domain: str, seq: bool = True) -> tuple[Variable, ...]:
    head = (
        Variable("STUDYID", "Study Identifier", key=1),
        Variable("DOMAIN", "Domain Abbreviation"),
        Variable("USUBJID", "Unique Subject Identifier", key=2),
    )
    return (*head, Variable(f"{domain}SEQ", "Sequence Number", "integer")) if seq else head


def _common(domain: str, subject: Subject) -> dict[str, Any]:
    return {"STUDYID": STUDYID, "DOMAIN": domain, "USUBJID": subject.usubjid}


# --- DM ---------------------------------------------------------------------------------------

DM_VARIABLES = (
    *_identifiers("DM", seq=False),
    Variable("SUBJID", "Subject Identifier for the Study"),
    Variable("RFSTDTC", "Subject Reference Start Date/Time", "iso_date"),
    Variable("RFENDTC", "Subject Reference End Date/Time", "iso_date"),
    Variable("RFXSTDTC", "Date/Time of First Study Treatment", "iso_date"),
    Variable("RFXENDTC", "Date/Time of Last Study Treatment", "iso_date"),
    Variable("RFPENDTC", "Date/Time of End of Participation", "iso_date"),
    Variable("DTHDTC", "Date/Time of Death", "iso_date"),
    Variable("DTHFL", "Subject Death Flag"),
    Variable("SITEID", "Study Site Identifier"),
    Variable("AGE", "Age", "integer"),
    Variable("AGEU", "Age Units"),
    Variable("SEX", "Sex"),
    Variable("RACE", "Race"),
    Variable("ETHNIC", "Ethnicity"),
    Variable("ARMCD", "Planned Arm Code"),
    Variable("ARM", "Description of Planned Arm"),
    Variable("ACTARMCD", "Actual Arm Code"),
    Variable("ACTARM", "Description of Actual Arm"),
    Variable("ARMNRS", "Reason Arm and/or Actual Arm is Null"),
)


def dm(subjects: Iterable[Subject]) -> Dataset:
    """One record per enrolled subject."""
    records = []
    for s in sorted(subjects, key=lambda s: s.usubjid):
        armcd, arm = ARMS[s.facts.group]
        exposure = s.exposure_dates
        died_on = s.outcome.died_on
        records.append({
            **_common("DM", s), "SUBJID": s.subject_id,
            "RFSTDTC": s.reference_start, "RFENDTC": s.last_known_date,
            "RFXSTDTC": exposure[0] if exposure else None, "RFXENDTC": exposure[-1] if exposure else None,
            "RFPENDTC": s.last_known_date, "DTHDTC": died_on, "DTHFL": "Y" if died_on else None,
            "SITEID": SITEID, "AGE": s.facts.age_years, "AGEU": "YEARS", "SEX": s.facts.sex,
            "ARMCD": armcd, "ARM": arm,
            **({"ACTARMCD": armcd, "ACTARM": arm} if treated(s) else {"ARMNRS": "NOT TREATED"}),
        })
    return dataset("DM", "Demographics", DM_VARIABLES, records)


# --- EX ---------------------------------------------------------------------------------------

MP = "METHYLPREDNISOLONE"
CELLS = "AUTOLOGOUS ADIPOSE-DERIVED SVF/MSC"

EX_VARIABLES = (
    *_identifiers("EX"),
    Variable("EXSPID", "Sponsor-Defined Identifier"),
    Variable("EXTRT", "Name of Treatment", key=3),
    Variable("EXCAT", "Category of Treatment"),
    Variable("EXDOSE", "Dose", "float"),
    Variable("EXDOSU", "Dose Units"),
    Variable("EXDOSFRM", "Dose Form"),
    Variable("EXDOSFRQ", "Dosing Frequency per Interval"),
    Variable("EXROUTE", "Route of Administration"),
    Variable("EXLOT", "Lot Number"),
    Variable("EPOCH", "Epoch"),
    Variable("EXSTDTC", "Start Date/Time of Treatment", "iso_date", key=4),
    Variable("EXENDTC", "End Date/Time of Treatment", "iso_date"),
    Variable("EXSTDY", "Study Day of Start of Treatment", "integer"),
    Variable("EXENDY", "Study Day of End of Treatment", "integer"),
)


def ex(subjects: Iterable[Subject]) -> Dataset:
    """One record per MP pulse dose (mg) and per cell infusion (cells), each given on one day."""
    records = []
    for s in subjects:
        for d in s.facts.doses:
            records.append({**_given(s, d.given_on), "EXSPID": f"CYCLE {d.cycle} DAY {d.day}", "EXTRT": MP,
                            "EXCAT": "MP PULSE", "EXDOSE": d.dose_mg, "EXDOSU": "mg", "EXDOSFRM": "INJECTION",
                            "EXDOSFRQ": "QD"})
        for i in s.facts.infusions:
            records.append({**_given(s, i.given_on), "EXSPID": f"INFUSION {i.infusion_number}", "EXTRT": CELLS,
                            "EXCAT": "CELL INFUSION", "EXDOSE": i.cell_count, "EXDOSU": "cells",
                            "EXDOSFRM": "SUSPENSION", "EXDOSFRQ": "ONCE", "EXLOT": i.lot_id})
    return dataset("EX", "Exposure", EX_VARIABLES, sequenced(records, "EXSEQ", ("EXSTDTC", "EXTRT", "EXSPID")))


def _given(subject: Subject, on: date) -> dict[str, Any]:
    day = study_day(on, subject.reference_start)
    return {**_common("EX", subject), "EPOCH": "TREATMENT", "EXROUTE": "INTRAVENOUS",
            "EXSTDTC": on, "EXENDTC": on, "EXSTDY": day, "EXENDY": day}


# --- LB ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LabTest:
    testcd: str
    test: str
    category: str
    specimen: str
    unit: str


CREATININE = LabTest("CREAT", "Creatinine", "CHEMISTRY", "SERUM OR PLASMA", "mg/dL")
EGFR = LabTest("GFRBSA", "Glomerular Filtration Rate Adj for BSA", "CHEMISTRY", "SERUM OR PLASMA", "mL/min/1.73m2")
URINE: dict[str, LabTest] = {
    "upcr": LabTest("PROTCRT", "Protein/Creatinine", "URINALYSIS", "URINE", "g/g"),
    "protein_24h": LabTest("PROT", "Protein", "URINALYSIS", "URINE", "g/day"),
    "uacr": LabTest("ALBCREAT", "Albumin/Creatinine", "URINALYSIS", "URINE", "mg/g"),
}
CKD_EPI_2021_LOINC = "98979-8"
"""The code of the eGFR labs computes from creatinine (CKD-EPI 2021, race-free)."""
CREATININE_LOINC = {"mg/dL": "2160-0", "umol/L": "14682-9"}
UMOL_PER_MG_DL = 88.4
"""KDIGO's factor, as labs converts (contract): µmol/L = mg/dL × 88.4."""

LB_VARIABLES = (
    *_identifiers("LB"),
    Variable("LBSPID", "Sponsor-Defined Identifier"),
    Variable("LBTESTCD", "Lab Test or Examination Short Name", key=3),
    Variable("LBTEST", "Lab Test or Examination Name"),
    Variable("LBCAT", "Category for Lab Test"),
    Variable("LBORRES", "Result or Finding in Original Units"),
    Variable("LBORRESU", "Original Units"),
    Variable("LBSTRESC", "Character Result/Finding in Std Format"),
    Variable("LBSTRESN", "Numeric Result/Finding in Standard Units", "float"),
    Variable("LBSTRESU", "Standard Units"),
    Variable("LBLOINC", "LOINC Code"),
    Variable("LBSPEC", "Specimen Type"),
    Variable("LBLOBXFL", "Last Observation Before Exposure Flag"),
    Variable("LBDRVFL", "Derived Flag"),
    Variable("LBDTC", "Date/Time of Specimen Collection", "iso_datetime", key=4),
    Variable("LBDY", "Study Day of Specimen Collection", "integer"),
)


@dataclass(frozen=True, slots=True)
class LabRecord:
    """One LB record before numbering: which result, what was measured, when, and its values."""

    subject: Subject
    result_id: str
    test: LabTest
    collected_at: datetime
    value: float
    loinc: str | None
    original: tuple[float, str] | None  # (value, unit) as the lab reported it; None when derived

    def record(self) -> dict[str, Any]:
        s, t = self.subject, self.test
        original_value, original_unit = self.original if self.original else (None, None)
        return {
            **_common("LB", s), "LBSPID": self.result_id, "LBTESTCD": t.testcd, "LBTEST": t.test,
            "LBCAT": t.category, "LBORRES": _number(original_value), "LBORRESU": original_unit,
            "LBSTRESC": _number(self.value), "LBSTRESN": self.value, "LBSTRESU": t.unit, "LBLOINC": self.loinc,
            "LBSPEC": t.specimen, "LBDRVFL": None if self.original else "Y",
            "LBDTC": self.collected_at, "LBDY": study_day(self.collected_on, s.reference_start),
        }

    @property
    def collected_on(self) -> date:
        """The UTC calendar date, as the contract compares dates."""
        return self.collected_at.astimezone(UTC).date()


def _number(value: float | None) -> str | None:
    """A result as text: up to 15 significant digits, so 2.0 × 88.4 reads 176.8, not 176.80000000000001."""
    return None if value is None else format(value, ".15g")


def lb(subjects: Iterable[Subject], egfr: Iterable[EgfrComputed], urine: Iterable[UrineResultMeasured]) -> Dataset:
    """Every counted creatinine, eGFR and urine protein result of an enrolled subject. ``egfr``
    and ``urine``: the effective event of each result id (its latest by labs stream version);
    preliminaries are not counted, so not reported."""
    known = by_subject(subjects)
    results = [*egfr_results(known, egfr), *urine_results(known, urine)]
    flagged = _last_before_exposure(results)
    records = [{**r.record(), "LBLOBXFL": "Y" if i in flagged else None} for i, r in enumerate(results)]
    return dataset("LB", "Laboratory Test Results", LB_VARIABLES,
                   sequenced(records, "LBSEQ", ("LBDTC", "LBTESTCD", "LBSPID")))


def egfr_results(subjects: dict[str, Subject], egfr: Iterable[EgfrComputed]) -> list[LabRecord]:
    """A reported eGFR is one record; one computed from creatinine is two — the creatinine as the
    lab reported it (µmol/L back from mg/dL when sent as 14682-9), and the eGFR labs derived from
    it (``LBDRVFL`` Y, no original result, the CKD-EPI 2021 code)."""
    results = []
    for e in egfr:
        if not e.counted or e.subject_id not in subjects:
            continue
        s = subjects[e.subject_id]
        if e.creatinine_mg_dl is None:
            results.append(LabRecord(s, e.result_id, EGFR, as_utc(e.collected_at), e.egfr, e.loinc, (e.egfr, EGFR.unit)))
            continue
        loinc = e.loinc or CREATININE_LOINC["mg/dL"]
        mg_dl = e.creatinine_mg_dl
        original = (mg_dl * UMOL_PER_MG_DL, "umol/L") if loinc == CREATININE_LOINC["umol/L"] else (mg_dl, "mg/dL")
        results.append(LabRecord(s, e.result_id, CREATININE, as_utc(e.collected_at), mg_dl, loinc, original))
        results.append(LabRecord(s, e.result_id, EGFR, as_utc(e.collected_at), e.egfr, CKD_EPI_2021_LOINC, None))
    return results


def urine_results(subjects: dict[str, Subject], urine: Iterable[UrineResultMeasured]) -> list[LabRecord]:
    """The LB records of the counted urine protein results (``UrineResultMeasured``, the effective
    value of each result id), in the analyte's kept unit under the code the lab sent."""
    return [
        LabRecord(subjects[u.subject_id], u.result_id, URINE[u.analyte], as_utc(u.collected_at), u.value, u.loinc,
                (u.value, u.unit))
        for u in urine if u.counted and u.subject_id in subjects
    ]


def _last_before_exposure(results: Sequence[LabRecord]) -> set[int]:
    """LBLOBXFL: per subject and test, the latest result collected on or before the reference
    start — the contract's baseline rule ("latest counted … on or before treatment start")."""
    latest: dict[tuple[str, str], tuple[tuple[datetime, str], int]] = {}
    for i, r in enumerate(results):
        start = r.subject.reference_start
        if start is None or r.collected_on > start:
            continue
        key, order = (r.subject.subject_id, r.test.testcd), (r.collected_at, r.result_id)
        if key not in latest or order > latest[key][0]:
            latest[key] = (order, i)
    return {i for _, i in latest.values()}


# --- AE ---------------------------------------------------------------------------------------

AEREL: dict[Causality, str] = {
    "unrelated": "NOT RELATED", "unlikely": "UNLIKELY RELATED", "possible": "POSSIBLY RELATED",
    "probable": "PROBABLY RELATED", "definite": "RELATED",
}
AEOUT = {
    "recovered": "RECOVERED/RESOLVED", "recovering": "RECOVERING/RESOLVING",
    "not_recovered": "NOT RECOVERED/NOT RESOLVED", "recovered_with_sequelae": "RECOVERED/RESOLVED WITH SEQUELAE",
    "fatal": "FATAL", "unknown": "UNKNOWN",
}
"""CDISC CT "Outcome of Event" (OUT) for each contract outcome."""

AE_VARIABLES = (
    *_identifiers("AE"),
    Variable("AESPID", "Sponsor-Defined Identifier"),
    Variable("AETERM", "Reported Term for the Adverse Event"),
    Variable("AEDECOD", "Dictionary-Derived Term", key=3),
    Variable("AESER", "Serious Event"),
    Variable("AEREL", "Causality"),
    Variable("AEOUT", "Outcome of Adverse Event"),
    Variable("AESDTH", "Results in Death"),
    Variable("AETOXGR", "Standard Toxicity Grade"),
    Variable("AESTDTC", "Start Date/Time of Adverse Event", "iso_date", key=4),
    Variable("AEENDTC", "End Date/Time of Adverse Event", "iso_date"),
    Variable("AESTDY", "Study Day of Start of Adverse Event", "integer"),
    Variable("AEENDY", "Study Day of End of Adverse Event", "integer"),
)


def ae(subjects: Iterable[Subject], reports: Iterable[AdverseEventReport]) -> Dataset:
    """One record per adverse event of an enrolled subject: its latest report (``reports`` in
    the order they were recorded), as the contract makes the latest report the AE's state."""
    known = by_subject(subjects)
    latest: dict[tuple[str, str], AdverseEventReport] = {}
    for report in reports:
        if report.subject_id in known:
            latest[(report.subject_id, report.ae_id)] = report
    records = []
    for (subject_id, ae_id), r in latest.items():
        s = known[subject_id]
        related = AEREL[r.causality] if r.related_to else "NOT RELATED"
        records.append({
            **_common("AE", s), "AESPID": ae_id, "AETERM": r.term, "AESER": "Y" if r.serious else "N",
            "AEREL": related, "AEOUT": AEOUT[r.outcome], "AESDTH": "Y" if r.outcome == "fatal" else "N",
            "AETOXGR": str(r.grade), "AESTDTC": r.onset_on, "AEENDTC": r.resolved_on,
            "AESTDY": study_day(r.onset_on, s.reference_start), "AEENDY": study_day(r.resolved_on, s.reference_start),
        })
    return dataset("AE", "Adverse Events", AE_VARIABLES, sequenced(records, "AESEQ", ("AESTDTC", "AESPID")))


# --- DS ---------------------------------------------------------------------------------------

DS_VARIABLES = (
    *_identifiers("DS"),
    Variable("DSTERM", "Reported Term for the Disposition Event"),
    Variable("DSDECOD", "Standardized Disposition Term", key=4),
    Variable("DSCAT", "Category for Disposition Event", key=3),
    Variable("DSSTDTC", "Start Date/Time of Disposition Event", "iso_date", key=5),
    Variable("DSSTDY", "Study Day of Start of Disposition Event", "integer"),
)


def ds(subjects: Iterable[Subject]) -> Dataset:
    """Per subject: enrollment (a protocol milestone), then death and withdrawal by subject
    (disposition events), each on its first recorded date."""
    records = []
    for s in subjects:
        events = [("ENROLLED", "PROTOCOL MILESTONE", s.facts.enrolled_on),
                  ("DEATH", "DISPOSITION EVENT", s.outcome.died_on),
                  ("WITHDRAWAL BY SUBJECT", "DISPOSITION EVENT", s.outcome.withdrawn_on)]
        records.extend(
            {**_common("DS", s), "DSTERM": term, "DSDECOD": term, "DSCAT": category, "DSSTDTC": on,
             "DSSTDY": study_day(on, s.reference_start)}
            for term, category, on in events if on is not None
        )
    return dataset("DS", "Disposition", DS_VARIABLES, sequenced(records, "DSSEQ", ("DSSTDTC", "DSCAT", "DSDECOD")))
