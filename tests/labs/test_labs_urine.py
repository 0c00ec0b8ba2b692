"""Urine protein (UPCR, 24-hour protein, UACR) through the three channels of a real labs process on
PostgreSQL/SQLite and NATS: each value comes out as ``UrineResultMeasured`` in its kept unit, with
corrections, preliminaries, duplicates and refusals (labs.rejected, ACK AE, 422) as for creatinine."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from tests.labs import test_labs_service as service
from tests.labs.test_labs_service import CREATININE, Labs, issue, lab_json, obx, oru_v25, segment

pytestmark = pytest.mark.slow

labs = service.labs  # the module's stack: enrollment and labs as real processes

UCUM = "http://unitsofmeasure.org"


async def measured(labs: Labs, result_id: str, count: int = 1) -> list[dict[str, Any]]:
    return await labs.events("UrineResultMeasured", result_id, count)


# --------------------------------------------------------------------------- broker


async def test_broker_urine_results_in_every_unit_the_demo_sends_are_kept_in_g_per_g(labs: Labs) -> None:
    subject = await labs.enrolled_subject()
    sent = [lab_json(labs, subject, loinc="2890-2", value=1.8, unit="g/g"),
            lab_json(labs, subject, loinc="2890-2", value=950.0, unit="mg/g"),
            lab_json(labs, subject, loinc="34366-5", value=56.56, unit="mg/mmol"),
            lab_json(labs, subject, loinc="2889-4", value=2400.0, unit="mg/(24.h)"),
            lab_json(labs, subject, loinc="9318-7", value=310.0, unit="mg/g")]
    for body in sent:
        await labs.send_json(body)
    values = [(m["analyte"], m["value"], m["unit"], m["counted"])
              for body in sent for m in await measured(labs, body["result_id"])]
    assert values == [("upcr", 1.8, "g/g", True), ("upcr", 0.95, "g/g", True), ("upcr", 0.5, "g/g", True),
                      ("protein_24h", 2.4, "g/day", True), ("uacr", 310.0, "mg/g", True)]
    assert not [m for m in labs.published if m["event_type"] == "EgfrComputed"
                and m["payload"]["result_id"] in {body["result_id"] for body in sent}]


async def test_broker_urine_preliminary_correction_duplicate_and_refusal(labs: Labs) -> None:
    subject = await labs.enrolled_subject()
    preliminary = lab_json(labs, subject, loinc="2890-2", value=2.0, unit="g/g", status="preliminary")
    await labs.send_json(preliminary)
    await labs.send_json(preliminary)  # redelivered: one effect
    result_id = preliminary["result_id"]
    # Each version once the one before it is in: the consumer's workers may take messages sent at
    # once in any order (a final after its correction changes nothing, as for creatinine).
    await measured(labs, result_id, 1)
    final = lab_json(labs, subject, result_id=result_id, loinc="2890-2", value=1.6, unit="g/g")
    await labs.send_json(final)
    await measured(labs, result_id, 2)
    corrected = lab_json(labs, subject, result_id=result_id, loinc="34366-5", value=135.744, unit="mg/mmol",
                         status="corrected")
    await labs.send_json(corrected)
    first, second, third = await measured(labs, result_id, 3)
    assert [(m["status"], m["counted"]) for m in (first, second, third)] == [
        ("preliminary", False), ("final", True), ("corrected", True)]
    assert third["value"] == pytest.approx(1.2) and third["loinc"] == "34366-5"
    (correction,) = await labs.events("LabResultCorrected", result_id)
    assert (correction["previous_value"], correction["canonical_unit"]) == (1.6, "g/g")
    await asyncio.sleep(0.5)
    assert len(await measured(labs, result_id)) == 3

    view = (await labs.get(f"/v1/results/{result_id}")).json()
    assert (view["analyte"], view["effective"]["status"]) == ("upcr", "corrected")

    wrong_unit = lab_json(labs, subject, loinc="2890-2", value=50.0, unit="mg/mmol")
    absurd = lab_json(labs, subject, loinc="2889-4", value=-1.0, unit="g/d")
    for body in (wrong_unit, absurd):
        await labs.send_json(body)
    rejection = await labs.rejection(lambda r: r["message_id"] == wrong_unit["message_id"])
    assert (rejection["source"], rejection["code"]) == ("broker", "unit_mismatch")
    assert "expected mg/g or mg/mg or g/g" in rejection["reason"]
    rejection = await labs.rejection(lambda r: r["message_id"] == absurd["message_id"])
    assert rejection["code"] == "value_out_of_range"


# --------------------------------------------------------------------------- HL7 v2 over MLLP


async def test_hl7_urine_obx_with_ucum_units_is_acknowledged_and_a_wrong_unit_answered_ae(labs: Labs) -> None:
    subject = await labs.enrolled_subject()
    filler, control = labs.unique("FIL"), labs.unique("MSG")
    message = oru_v25(
        control, subject, filler,
        obx(1, "2890-2^Protein/Creatinine [Mass Ratio] in Urine^LN", "1200", "mg/g^mg/g^UCUM"),
        obx(2, "2889-4^Protein [Mass/time] in 24 hour Urine^LN", "1.9", "g/(24.h)^g/(24.h)^UCUM", "P"),
        obx(3, "14585-4^Albumin/Creatinine [Molar ratio] in Urine^LN", "33.936", "mg/mmol"),
    )
    ack = await labs.mllp(message)
    assert segment(ack, "MSA")[0].split("|")[1:3] == ["AA", control]
    (upcr,) = await measured(labs, f"{filler}-2890-2")
    assert (upcr["value"], upcr["unit"], upcr["source"]) == (1.2, "g/g", "mllp")
    (protein,) = await measured(labs, f"{filler}-2889-4")
    assert (protein["value"], protein["unit"], protein["status"], protein["counted"]) == (
        1.9, "g/day", "preliminary", False)
    (uacr,) = await measured(labs, f"{filler}-14585-4")
    assert (uacr["value"], uacr["unit"]) == (pytest.approx(300.0), "mg/g")

    assert segment(await labs.mllp(message), "MSA")[0].startswith("MSA|AA|")  # resent: no new effect
    correction = oru_v25(labs.unique("MSG"), subject, filler,
                         obx(1, "2890-2^Protein/Creatinine [Mass Ratio] in Urine^LN", "0.9", "g/g", "C"))
    assert segment(await labs.mllp(correction), "MSA")[0].startswith("MSA|AA|")
    _, corrected = await measured(labs, f"{filler}-2890-2", 2)
    assert (corrected["value"], corrected["status"]) == (0.9, "corrected")
    (change,) = await labs.events("LabResultCorrected", f"{filler}-2890-2")
    assert (change["previous_value"], change["new_value"]) == (1.2, 0.9)

    bad = labs.unique("MSG")
    ack = await labs.mllp(oru_v25(bad, subject, labs.unique("FIL"),
                                  obx(1, "9318-7^Albumin/Creatinine [Mass Ratio] in Urine^LN", "3.1", "mg/mmol")))
    (msa,) = segment(ack, "MSA")
    assert msa.split("|")[1:3] == ["AE", bad] and "not valid for LOINC 9318-7" in msa
    assert [e.split("|")[5] for e in segment(ack, "ERR")] == ["unit_mismatch"]
    rejection = await labs.rejection(lambda r: r["message_id"] == bad)
    assert (rejection["source"], rejection["code"]) == ("mllp", "unit_mismatch")


# --------------------------------------------------------------------------- FHIR R4


def urine_observation(subject_id: str, result_id: str, loinc: str, value: float, code: str,
                      **changes: Any) -> dict[str, Any]:
    resource = copy.deepcopy(CREATININE)
    del resource["referenceRange"]
    resource["subject"] = {"reference": f"Patient/{subject_id}"}
    resource["identifier"][0]["value"] = result_id
    resource["code"] = {"coding": [{"system": "http://loinc.org", "code": loinc}]}
    resource["valueQuantity"] = {"value": value, "unit": code, "system": UCUM, "code": code}
    return resource | changes


async def test_fhir_urine_observations_are_normalised_corrected_and_refused_422(labs: Labs) -> None:
    subject = await labs.enrolled_subject()
    result_id = labs.unique("obs")
    upcr = urine_observation(subject, result_id, "34366-5", 84.84, "mg/mmol", status="preliminary")
    assert (await labs.post("/fhir/Observation", upcr)).status_code == 201
    assert (await labs.post("/fhir/Observation", upcr)).status_code == 200  # the same resource: no effect
    (first,) = await measured(labs, result_id)
    assert (first["value"], first["unit"], first["counted"], first["source"]) == (0.75, "g/g", False, "fhir")

    amended = urine_observation(subject, result_id, "2890-2", 700.0, "mg/g", status="amended")
    assert (await labs.post("/fhir/Observation", amended)).status_code == 201
    _, second = await measured(labs, result_id, 2)
    assert (second["value"], second["status"], second["counted"]) == (0.7, "corrected", True)

    day = labs.unique("obs")
    assert (await labs.post("/fhir/Observation",
                            urine_observation(subject, day, "2889-4", 3.2, "g/(24.h)"))).status_code == 201
    assert [(m["value"], m["unit"]) for m in await measured(labs, day)] == [(3.2, "g/day")]

    wrong = urine_observation(subject, labs.unique("obs"), "2889-4", 3.2, "g/g")
    refused = await labs.post("/fhir/Observation", wrong)
    assert refused.status_code == 422
    assert (issue(refused)["code"], "not valid for LOINC 2889-4" in issue(refused)["diagnostics"]) == (
        "code-invalid", True)
    rejection = await labs.rejection(lambda r: r["source"] == "fhir" and wrong["identifier"][0]["value"] in r["raw"])
    assert rejection["code"] == "unit_mismatch"


async def test_asyncapi_documents_urine_result_measured(labs: Labs) -> None:
    document = (await labs.get("/asyncapi.json")).json()
    assert f"{labs.prefix}.labs.UrineResultMeasured" in str(document)
