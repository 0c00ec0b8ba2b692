"""From lab to cohort table: UPCR sent to labs over the broker (SI and mass-ratio units) reaches
outcomes as ``UrineResultMeasured`` and becomes the patient's baseline and post UPCR and the
group's ``mean_baseline_upcr`` — enrollment, labs and outcomes as real processes on PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats
import pytest

from shared.broker import LAB_RESULTS_SUBJECT
from tests.labs.test_labs_service import forget_lab_consumer
from tests.stack import Stack, eventually

pytestmark = pytest.mark.slow

_LETTERS = str.maketrans("0123456789", "ghijklmnop")


def upcr(subject_id: str, result_id: str, loinc: str, value: float, unit: str, collected_on: str,
         status: str = "final") -> dict[str, Any]:
    return {"message_id": f"m-{result_id}-{status}", "subject_id": subject_id, "lab_id": "LAB1", "loinc": loinc,
            "value": value, "unit": unit, "collected_at": f"{collected_on}T08:00:00Z", "status": status,
            "result_id": result_id}


async def test_upcr_through_labs_is_the_patients_baseline_and_post_upcr_in_outcomes(
    tmp_path: Path, prefix: str, nats_client: nats.NATS
) -> None:
    stack = Stack(tmp_path, prefix, ["enrollment", "labs", "outcomes"], backend="postgresql")
    subject = f"S-{prefix.translate(_LETTERS)}-001"
    try:
        await stack.start()
        async with stack.client(timeout=10) as client:
            enrolled = await client.post(f"{stack.url('enrollment')}/v1/patients", json={
                "subject_id": subject, "sex": "F", "age_years": 50, "weight_kg": 60.0, "group": "control",
                "enrolled_on": "2014-03-02", "baseline_egfr": 33.0, "lee_grade": "IV"})
            assert enrolled.status_code == 201, enrolled.text
            js = nats_client.jetstream()
            for body in (
                upcr(subject, f"{prefix}-u1", "34366-5", 169.68, "mg/mmol", "2014-02-20"),  # 1.5 g/g: baseline
                upcr(subject, f"{prefix}-u2", "2890-2", 900.0, "mg/g", "2015-01-10"),
                upcr(subject, f"{prefix}-u2", "2890-2", 0.6, "g/g", "2015-01-10", "corrected"),  # post: 0.6
                upcr(subject, f"{prefix}-u3", "2890-2", 0.1, "g/g", "2015-06-01", "preliminary"),  # not counted
            ):
                await js.publish(LAB_RESULTS_SUBJECT, json.dumps(body).encode(),
                                 headers={"Nats-Msg-Id": body["message_id"]})

            async def patient() -> dict[str, Any] | None:
                response = await client.get(f"{stack.url('outcomes')}/v1/patients/{subject}")
                if response.status_code != 200:
                    return None
                view = response.json()
                return view if view.get("post_upcr") == pytest.approx(0.6) else None

            view = await eventually(patient, timeout=60)
            assert view["baseline_upcr"] == pytest.approx(1.5)
            assert view["upcr_change_pct"] == pytest.approx(-60.0)
            assert (view["complete_remission"], view["partial_remission"]) == (False, True)
            rows = (await client.get(f"{stack.url('outcomes')}/v1/cohorts")).json()
            (control,) = [row for row in rows if row["group"] == "control"]
            assert control["mean_baseline_upcr"] == pytest.approx(1.5)
            assert control["mean_post_upcr"] == pytest.approx(0.6)
            assert control["partial_remission_count"] == 1
    finally:
        await stack.stop()
        await forget_lab_consumer(nats_client.jetstream(), prefix)
