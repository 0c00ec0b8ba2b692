"""The SDTM and ADaM datasets on the hand-made study (tests/unit/outcomes/cdisc_study.py): every
value below is worked out by hand from that study's events."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from services.outcomes.cdisc import adam, sdtm
from services.outcomes.cdisc.study import study_day
from services.outcomes.endpoints import composite_endpoint
from tests.unit.outcomes.cdisc_study import A1, A2, B1, C1, URINE, adverse_event, study, subjects

ARM_A = "Group A: MP pulses then autologous cells"


def by(records: list[dict], **where: object) -> list[dict]:
    return [r for r in records if all(r[k] == v for k, v in where.items())]


def one(records: list[dict], **where: object) -> dict:
    found = by(records, **where)
    assert len(found) == 1, found
    return found[0]


def test_study_days_have_no_day_zero() -> None:
    assert [study_day(date(2014, 3, d), date(2014, 3, 10)) for d in (8, 9, 10, 11)] == [-2, -1, 1, 2]
    assert study_day(date(2014, 3, 10), None) is None


def test_dm_has_one_record_per_subject_with_the_reference_dates_and_arms() -> None:
    rows = sdtm.dm(subjects()).records()
    assert [r["USUBJID"] for r in rows] == [f"NEPHROTRACK-{s}" for s in (A1, A2, B1, C1)]
    assert {r["STUDYID"] for r in rows} == {"NEPHROTRACK"} and {r["DOMAIN"] for r in rows} == {"DM"}
    a1 = one(rows, SUBJID=A1)
    assert (a1["RFSTDTC"], a1["RFXSTDTC"], a1["RFXENDTC"]) == ("2014-03-10", "2014-03-10", "2014-05-01")
    assert (a1["ARMCD"], a1["ARM"], a1["ACTARMCD"], a1["ARMNRS"]) == ("A", ARM_A, "A", None)
    assert (a1["AGE"], a1["AGEU"], a1["SEX"], a1["DTHFL"]) == (58, "YEARS", "F", None)
    a2 = one(rows, SUBJID=A2)
    assert (a2["DTHDTC"], a2["DTHFL"], a2["RFPENDTC"]) == ("2015-07-01", "Y", "2015-07-01")
    b1 = one(rows, SUBJID=B1)  # enrolled, withdrawn before any dose: planned arm only
    assert (b1["ARMCD"], b1["ACTARMCD"], b1["ACTARM"], b1["ARMNRS"], b1["RFSTDTC"]) == ("B", None, None, "NOT TREATED", None)
    c1 = one(rows, SUBJID=C1)  # control: treatment start is enrollment, and the arm is its own
    assert (c1["RFSTDTC"], c1["ACTARMCD"], c1["RFXSTDTC"]) == ("2013-04-01", "CONTROL", None)


def test_ex_holds_every_pulse_dose_and_every_infusion() -> None:
    rows = sdtm.ex(subjects()).records()
    assert [(r["USUBJID"][-9:], r["EXSEQ"], r["EXTRT"], r["EXDOSE"], r["EXDOSU"], r["EXSTDTC"], r["EXSTDY"]) for r in rows] == [
        (A1, 1, "METHYLPREDNISOLONE", 1000.0, "mg", "2014-03-10", 1),
        (A1, 2, "METHYLPREDNISOLONE", 1000.0, "mg", "2014-03-11", 2),
        (A1, 3, "AUTOLOGOUS ADIPOSE-DERIVED SVF/MSC", 3.0e7, "cells", "2014-05-01", 53),
        (A2, 1, "METHYLPREDNISOLONE", 1000.0, "mg", "2014-04-01", 1),
    ]
    assert one(rows, EXLOT="LOT-1")["EXSPID"] == "INFUSION 1"
    assert [r["EXSPID"] for r in by(rows, EXCAT="MP PULSE")][:2] == ["CYCLE 1 DAY 1", "CYCLE 1 DAY 2"]


def test_lb_reports_every_counted_result_with_its_loinc_code() -> None:
    rows = sdtm.lb(subjects(), study().egfr, URINE).records()
    a1 = by(rows, USUBJID=f"NEPHROTRACK-{A1}")
    assert [(r["LBSEQ"], r["LBSPID"], r["LBTESTCD"], r["LBLOINC"], r["LBSTRESN"]) for r in a1] == [
        (1, "A1-R1", "CREAT", "14682-9", 2.0),  # sent in µmol/L
        (2, "A1-R1", "GFRBSA", "98979-8", 28.0),  # labs computed it (CKD-EPI 2021)
        (3, "A1-U1", "PROTCRT", "2890-2", 1.8),
        (4, "A1-R2", "GFRBSA", "98979-8", 16.0),
        (5, "A1-U2", "PROTCRT", "2890-2", 0.6),
        (6, "A1-R3", "GFRBSA", "98979-8", 15.0),
    ]  # A1-R4 is preliminary: never counted, not reported
    creat = one(a1, LBTESTCD="CREAT")
    assert (creat["LBORRES"], creat["LBORRESU"], creat["LBSTRESU"], creat["LBDRVFL"]) == ("176.8", "umol/L", "mg/dL", None)
    derived = one(a1, LBSPID="A1-R1", LBTESTCD="GFRBSA")
    assert (derived["LBORRES"], derived["LBSTRESC"], derived["LBDRVFL"]) == (None, "28", "Y")
    assert (derived["LBDTC"], derived["LBDY"], derived["LBSPEC"]) == ("2014-03-01T08:00:00", -9, "SERUM OR PLASMA")
    # the latest result of each test on or before treatment start: the contract's baseline rule
    assert [(r["LBSPID"], r["LBTESTCD"]) for r in by(rows, LBLOBXFL="Y")] == [
        ("A1-R1", "CREAT"), ("A1-R1", "GFRBSA"), ("A1-U1", "PROTCRT")]
    c1_creat = one(rows, USUBJID=f"NEPHROTRACK-{C1}", LBTESTCD="CREAT")
    assert (c1_creat["LBLOINC"], c1_creat["LBORRES"], c1_creat["LBORRESU"]) == ("2160-0", "1.5", "mg/dL")


def test_lb_maps_urine_protein_results_in_their_kept_units() -> None:
    rows = sdtm.lb(subjects(), [], URINE).records()
    assert [(r["LBTESTCD"], r["LBCAT"], r["LBSPEC"], r["LBORRES"], r["LBORRESU"], r["LBLOINC"]) for r in rows] == [
        ("PROTCRT", "URINALYSIS", "URINE", "1.8", "g/g", "2890-2"), ("PROTCRT", "URINALYSIS", "URINE", "0.6", "g/g", "2890-2")]
    stranger = URINE[0].model_copy(update={"subject_id": "IGA-X-404"})
    preliminary = URINE[0].model_copy(update={"result_id": "A1-U9", "status": "preliminary", "counted": False})
    assert len(sdtm.lb(subjects(), [], [stranger, preliminary]).rows) == 0


def test_ae_reports_the_latest_report_of_each_adverse_event() -> None:
    rows = sdtm.ae(subjects(), study().adverse_events).records()
    assert [(r["USUBJID"][-9:], r["AESEQ"], r["AESPID"]) for r in rows] == [(A1, 1, "AE-1"), (A2, 1, "AE-7")]
    followed_up = rows[0]  # the follow-up report replaced the first one
    assert (followed_up["AETOXGR"], followed_up["AEOUT"], followed_up["AEENDTC"], followed_up["AEENDY"]) == (
        "3", "RECOVERED/RESOLVED", "2014-03-20", 11)
    assert (followed_up["AETERM"], followed_up["AESER"], followed_up["AEREL"], followed_up["AESTDY"]) == (
        "hyperglycaemia", "N", "PROBABLY RELATED", 2)
    fatal = rows[1]
    assert (fatal["AEOUT"], fatal["AESDTH"], fatal["AETOXGR"]) == ("FATAL", "Y", "5")
    unrelated = adverse_event(A1, "AE-2").model_copy(update={"related_to": ()})
    assert sdtm.ae(subjects(), [unrelated]).records()[0]["AEREL"] == "NOT RELATED"


def test_ds_records_enrollment_death_and_withdrawal() -> None:
    rows = sdtm.ds(subjects()).records()
    assert [(r["USUBJID"][-9:], r["DSSEQ"], r["DSDECOD"], r["DSCAT"], r["DSSTDTC"]) for r in rows] == [
        (A1, 1, "ENROLLED", "PROTOCOL MILESTONE", "2014-03-02"),
        (A2, 1, "ENROLLED", "PROTOCOL MILESTONE", "2014-03-02"),
        (A2, 2, "DEATH", "DISPOSITION EVENT", "2015-07-01"),
        (B1, 1, "ENROLLED", "PROTOCOL MILESTONE", "2014-06-01"),
        (B1, 2, "WITHDRAWAL BY SUBJECT", "DISPOSITION EVENT", "2014-07-01"),
        (C1, 1, "ENROLLED", "PROTOCOL MILESTONE", "2013-04-01"),
    ]


def test_adsl_has_the_populations_treatments_and_baseline_values() -> None:
    rows = adam.adsl(subjects()).records()
    a1, a2, b1, c1 = rows
    assert (a1["TRT01P"], a1["TRT01PN"], a1["TRT01A"], a1["TRTSDT"], a1["TRTEDT"]) == (
        ARM_A, 1, ARM_A, date(2014, 3, 10), date(2014, 5, 1))
    assert (a1["EGFRBL"], a1["EGFRBLSR"], a1["ITTFL"], a1["SAFFL"], a1["EOSSTT"]) == (28.0, "LAB", "Y", "Y", "ONGOING")
    assert (a2["KFFL"], a2["KFDT"], a2["DTHFL"], a2["DTHDT"], a2["DCSREAS"]) == (
        "Y", date(2015, 6, 1), "Y", date(2015, 7, 1), "DEATH")
    assert (b1["TRT01A"], b1["SAFFL"], b1["EOSSTT"], b1["EOSDT"], b1["DCSREAS"]) == (
        None, "N", "DISCONTINUED", date(2014, 7, 1), "WITHDRAWAL BY SUBJECT")
    assert (c1["TRT01PN"], c1["TRTSDT"], c1["EGFRBL"], c1["EGFRBLSR"]) == (3, None, 40.0, "ENROLLMENT")


def test_adtte_is_the_composite_endpoint_of_every_subject_at_risk() -> None:
    rows = adam.adtte(subjects()).records()
    assert {r["PARAMCD"] for r in rows} == {"COMPKID"}
    assert [(r["USUBJID"][-9:], r["AVAL"], r["CNSR"], r["STARTDT"], r["ADT"], r["EVNTDESC"]) for r in rows] == [
        (A1, 175, 0, date(2014, 3, 10), date(2014, 9, 1), "CONFIRMED 40% EGFR DECLINE"),  # 16 ≤ 60 % of 28, 15 confirms
        (A2, 426, 0, date(2014, 4, 1), date(2015, 6, 1), "KIDNEY FAILURE"),  # the transplant, before death
        (C1, 395, 1, date(2013, 4, 1), date(2014, 5, 1), "CENSORED AT LAST COUNTED EGFR"),
    ]  # B1 never started treatment: never at risk, no record
    for subject in subjects():
        endpoint = composite_endpoint(adam.kidney_course(subject))
        found = by(rows, USUBJID=subject.usubjid)
        assert [(r["AVAL"], r["CNSR"]) for r in found] == ([] if endpoint is None else [(endpoint.days, endpoint.cnsr)])


@pytest.mark.parametrize("build", [
    lambda: sdtm.dm(subjects()), lambda: sdtm.ex(subjects()), lambda: sdtm.lb(subjects(), study().egfr, URINE),
    lambda: sdtm.ae(subjects(), study().adverse_events), lambda: sdtm.ds(subjects()),
    lambda: adam.adsl(subjects()), lambda: adam.adtte(subjects()),
])
def test_every_dataset_keeps_the_v5_limits(build) -> None:  # type: ignore[no-untyped-def]
    built = build()
    assert len(built.name) <= 8 and len(built.label) <= 40
    for variable in built.variables:
        assert len(variable.name) <= 8 and variable.name.isupper() and len(variable.label) <= 40
    assert all(len(v.encode()) <= 200 for row in built.rows for v in row if isinstance(v, str))


def test_docs_name_every_variable_of_every_dataset() -> None:
    text = (Path(__file__).parents[3] / "docs" / "exports.md").read_text()
    for variables in (sdtm.DM_VARIABLES, sdtm.EX_VARIABLES, sdtm.LB_VARIABLES, sdtm.AE_VARIABLES, sdtm.DS_VARIABLES,
                      adam.ADSL_VARIABLES, adam.ADTTE_VARIABLES):
        missing = [v.name for v in variables if f"`{v.name}`" not in text]
        assert not missing, f"docs/exports.md does not describe {missing}"
