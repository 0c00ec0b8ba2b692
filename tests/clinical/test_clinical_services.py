"""Pulse administration and cell processing, end to end: enrollment, pulse and cells run as real
processes (``tests/stack.py``) over real NATS, each on PostgreSQL and on SQLite; every request
goes through HTTP, and the store and the broker are then read directly to check what was kept
and what was published.

One stack per backend for the whole module (starting processes is the slow part); every test
uses its own subject ids, so tests do not see each other's patients.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cells.domain import fold_lot, fold_patient, infusions
from services.pulse.domain import cycles, fold
from shared.broker import Topology
from shared.store import EventStore, open_store
from tests.conftest import BACKENDS
from tests.keys import stack_codec
from tests.stack import Stack, eventually, running

pytestmark = pytest.mark.slow

UNKNOWN_PATIENT_WAIT = 1.0

_numbers = itertools.count(1)


@dataclass
class Clinical:
    stack: Stack
    prefix: str
    http: httpx.AsyncClient
    js: Any
    stores: dict[str, EventStore]

    def url(self, service: str, path: str) -> str:
        return f"{self.stack.url(service)}{path}"

    async def post(self, service: str, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post(self.url(service, path), json=body)

    async def get(self, service: str, path: str) -> httpx.Response:
        return await self.http.get(self.url(service, path))

    async def enroll(self, group: str = "A", **overrides: Any) -> str:
        subject_id = overrides.pop("subject_id", None) or new_subject(group)
        response = await self.post("enrollment", "/v1/patients", enrollment(subject_id, group, **overrides))
        assert response.status_code == 201, response.text
        return subject_id

    async def dose(self, subject_id: str, **overrides: Any) -> httpx.Response:
        body = {"cycle": 1, "day": 1, "given_on": "2014-03-10", "dose_mg": 1000, "weight_kg": 45.0, **overrides}
        return await self.post("pulse", f"/v1/patients/{subject_id}/pulse-doses", body)

    async def post_harvest(
        self, subject_id: str, harvested_on: str = "2014-06-01", fat_grams: float = 120
    ) -> httpx.Response:
        body = {"harvested_on": harvested_on, "fat_grams": fat_grams}
        return await self.post("cells", f"/v1/patients/{subject_id}/harvests", body)

    async def harvest(self, subject_id: str, harvested_on: str = "2014-06-01", fat_grams: float = 120) -> str:
        response = await self.post_harvest(subject_id, harvested_on, fat_grams)
        assert response.status_code == 201, response.text
        return response.json()["lot_id"]

    async def release(self, lot_id: str, cell_count: float = 3.1e7, viability_pct: float = 92) -> httpx.Response:
        body = {"cell_count": cell_count, "viability_pct": viability_pct}
        return await self.post("cells", f"/v1/lots/{lot_id}/release", body)

    async def released_lot(self, subject_id: str, **harvest: Any) -> str:
        lot_id = await self.harvest(subject_id, **harvest)
        response = await self.release(lot_id)
        assert response.status_code == 201, response.text
        return lot_id

    async def infuse(
        self, subject_id: str, lot_id: str, given_on: str = "2014-07-01", cell_count: float = 3.0e7
    ) -> httpx.Response:
        body = {"lot_id": lot_id, "given_on": given_on, "cell_count": cell_count}
        return await self.post("cells", f"/v1/patients/{subject_id}/infusions", body)

    async def deviation_count(self, service: str, code: str) -> float:
        text = (await self.get(service, "/metrics")).text
        line = f'nephrotrack_protocol_deviations_total{{code="{code}"}} '
        return next((float(row[len(line) :]) for row in text.splitlines() if row.startswith(line)), 0.0)

    async def stream_events(self, service: str, stream_id: str) -> list[Any]:
        return [envelope.decode() for envelope in await self.stores[service].read_stream(stream_id)]

    async def broker_messages(self, service: str) -> list[Any]:
        """Every message on the service's JetStream stream."""
        name = Topology(self.prefix).service_stream(service).name
        info = await self.js.stream_info(name)
        if not info.state.messages:
            return []
        return [await self.js.get_msg(name, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]


def new_subject(group: str = "A") -> str:
    return f"IGA-{'C' if group == 'control' else group}-{next(_numbers):03d}"


def enrollment(subject_id: str, group: str = "A", **overrides: Any) -> dict[str, Any]:
    body = {
        "subject_id": subject_id,
        "sex": "F",
        "age_years": 58,
        "weight_kg": 45.0,
        "group": group,
        "enrolled_on": "2014-03-02",
        "baseline_egfr": 27.0 if group != "B" else 80.0,
        "lee_grade": "IV",
    }
    return {**body, **overrides}


@pytest.fixture(scope="module", params=BACKENDS)
async def clinical(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clinical]:
    backend = request.param
    prefix = f"t{uuid.uuid4().hex[:10]}"
    tmp_path: Path = tmp_path_factory.mktemp(f"clinical-{backend}")
    stack = Stack(
        tmp_path,
        prefix,
        ["enrollment", "pulse", "cells"],
        backend=backend,
        extra_env={"NEPHROTRACK_UNKNOWN_PATIENT_WAIT_SECONDS": str(UNKNOWN_PATIENT_WAIT)},
    )
    async with running(stack) as js, stack_codec(prefix) as codec, stack.client(timeout=30) as http:
        stores = {s: open_store(stack.database_urls[s], codec=codec) for s in ("pulse", "cells")}
        try:
            yield Clinical(stack, prefix, http, js, stores)
        finally:  # before the stack stops and drops its databases
            for store in stores.values():
                await store.close()


# --------------------------------------------------------------------------- the contract


async def test_contract_requests_through_every_service(clinical: Clinical) -> None:
    subject = new_subject("A")
    enrolled = await clinical.post(
        "enrollment",
        "/v1/patients",
        {
            "subject_id": subject, "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
            "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV",
        },
    )
    assert enrolled.status_code == 201, enrolled.text

    dose = await clinical.post(
        "pulse",
        f"/v1/patients/{subject}/pulse-doses",
        {"cycle": 1, "day": 1, "given_on": "2014-03-10", "dose_mg": 1000, "weight_kg": 61.5},
    )
    assert dose.status_code == 201, dose.text
    recorded = dose.json()
    assert recorded["subject_id"] == subject
    assert (recorded["cycle"], recorded["day"], recorded["given_on"]) == (1, 1, "2014-03-10")
    assert recorded["mg_per_kg"] == pytest.approx(1000 / 61.5)
    # 16.3 mg/kg is below the 20–30 mg/kg range: recorded all the same, and flagged.
    assert [d["code"] for d in recorded["deviations"]] == ["DOSE_OUTSIDE_MG_PER_KG"]
    assert "16.26 mg/kg" in recorded["deviations"][0]["detail"]

    harvest = await clinical.post(
        "cells", f"/v1/patients/{subject}/harvests", {"harvested_on": "2014-06-01", "fat_grams": 120}
    )
    assert harvest.status_code == 201, harvest.text
    lot_id = harvest.json()["lot_id"]
    assert lot_id.startswith("LOT-") and subject not in lot_id
    assert harvest.json()["status"] == "harvested" and harvest.json()["subject_id"] == subject

    release = await clinical.post("cells", f"/v1/lots/{lot_id}/release", {"cell_count": 3.1e7, "viability_pct": 92})
    assert release.status_code == 201, release.text
    assert release.json()["status"] == "released"

    infusion = await clinical.post(
        "cells", f"/v1/patients/{subject}/infusions", {"lot_id": lot_id, "given_on": "2014-07-01", "cell_count": 3.0e7}
    )
    assert infusion.status_code == 201, infusion.text
    assert infusion.json()["infusion_number"] == 1 and infusion.json()["deviations"] == []

    view = (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()
    assert (view["subject_id"], view["count"], view["total_cells"]) == (subject, 1, 3.0e7)
    assert [lot["status"] for lot in view["lots"]] == ["infused"]
    lot = (await clinical.get("cells", f"/v1/lots/{lot_id}")).json()
    assert (lot["status"], lot["infused_on"], lot["infusion_number"]) == ("infused", "2014-07-01", 1)

    course = (await clinical.get("pulse", f"/v1/patients/{subject}/pulse-cycles")).json()
    assert (course["subject_id"], course["cycles_count"], course["doses_count"], course["deviations_count"]) == (
        subject, 1, 1, 1,
    )
    assert course["cycles"][0]["days"][0]["dose_mg"] == 1000


async def test_ineligible_enrollment_is_refused_by_enrollment(clinical: Clinical) -> None:
    subject = new_subject("A")
    response = await clinical.post("enrollment", "/v1/patients", enrollment(subject, "A", baseline_egfr=50.0))
    assert response.status_code == 422
    assert "below 45" in response.json()["detail"]


# --------------------------------------------------------------------------- pulse


async def test_dose_above_daily_max_is_recorded_flagged_and_counted(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    before = await clinical.deviation_count("pulse", "DOSE_ABOVE_DAILY_MAX")
    response = await clinical.dose(subject, dose_mg=1200, weight_kg=48.0)  # 25 mg/kg: only the cap is broken
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["dose_mg"] == 1200 and body["mg_per_kg"] == pytest.approx(25.0)
    assert body["deviations"] == [
        {"code": "DOSE_ABOVE_DAILY_MAX", "detail": "1200 mg exceeds the 1000 mg/day maximum"}
    ]
    assert await clinical.deviation_count("pulse", "DOSE_ABOVE_DAILY_MAX") == before + 1

    course = (await clinical.get("pulse", f"/v1/patients/{subject}/pulse-cycles")).json()
    assert course["doses_count"] == 1 and course["total_mg"] == 1200
    assert [d["code"] for d in course["cycles"][0]["deviations"]] == ["DOSE_ABOVE_DAILY_MAX"]


async def test_non_consecutive_cycle_days_raise_a_deviation(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    assert (await clinical.dose(subject, day=1, given_on="2014-03-10")).status_code == 201
    response = await clinical.dose(subject, day=2, given_on="2014-03-12")
    assert response.status_code == 201, response.text
    assert [d["code"] for d in response.json()["deviations"]] == ["CYCLE_DAYS_NOT_CONSECUTIVE"]
    assert "due on 2014-03-11" in response.json()["deviations"][0]["detail"]

    course = (await clinical.get("pulse", f"/v1/patients/{subject}/pulse-cycles")).json()
    (cycle,) = course["cycles"]
    assert [d["day"] for d in cycle["days"]] == [1, 2]
    assert [(d["code"], d["day"]) for d in cycle["deviations"]] == [("CYCLE_DAYS_NOT_CONSECUTIVE", 2)]


async def test_a_retried_dose_is_a_conflict_even_concurrently_and_control_patients_get_none(
    clinical: Clinical,
) -> None:
    subject = await clinical.enroll()
    assert (await clinical.dose(subject)).status_code == 201
    again = await clinical.dose(subject)
    assert again.status_code == 409 and "already recorded" in again.json()["detail"]

    concurrent = await asyncio.gather(*(clinical.dose(subject, day=2, given_on="2014-03-11") for _ in range(5)))
    assert sorted(r.status_code for r in concurrent) == [201, 409, 409, 409, 409]
    assert (await clinical.get("pulse", f"/v1/patients/{subject}/pulse-cycles")).json()["doses_count"] == 2

    control = await clinical.enroll("control")
    refused = await clinical.dose(control)
    assert refused.status_code == 422 and "control group" in refused.json()["detail"]
    harvest = await clinical.post_harvest(control)
    assert harvest.status_code == 422 and "control group" in harvest.json()["detail"]


async def test_commands_sent_right_after_enrolling_wait_for_the_enrollment(clinical: Clinical) -> None:
    """No 404 race: pulse and cells learn patients asynchronously, and a command that arrives
    first waits for the enrollment event instead of answering 404."""
    subjects = [new_subject() for _ in range(4)]

    async def enroll_then_command(subject: str) -> tuple[int, int]:
        await clinical.enroll(subject_id=subject)
        dose, harvest = await asyncio.gather(
            clinical.dose(subject),
            clinical.post_harvest(subject),
        )
        return dose.status_code, harvest.status_code

    assert await asyncio.gather(*map(enroll_then_command, subjects)) == [(201, 201)] * len(subjects)


async def test_never_enrolled_patient_is_404_after_the_configured_wait(clinical: Clinical) -> None:
    subject = new_subject()
    started = time.monotonic()
    dose, harvest = await asyncio.gather(
        clinical.dose(subject),
        clinical.post("cells", f"/v1/patients/{subject}/harvests", {"harvested_on": "2014-06-01", "fat_grams": 100}),
    )
    elapsed = time.monotonic() - started
    for response in (dose, harvest):
        assert response.status_code == 404
        assert response.json()["detail"] == f"no patient is enrolled with subject id {subject}"
    assert UNKNOWN_PATIENT_WAIT <= elapsed < UNKNOWN_PATIENT_WAIT + 4
    # Reads do not wait.
    assert (await clinical.get("pulse", f"/v1/patients/{subject}/pulse-cycles")).status_code == 404
    assert (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).status_code == 404


async def test_nothing_is_recorded_after_death_or_withdrawal(clinical: Clinical) -> None:
    died, withdrew = await clinical.enroll(), await clinical.enroll()
    for subject, kind in ((died, "death"), (withdrew, "withdrawn")):
        body = {"type": kind, "on": "2015-01-01"}
        response = await clinical.post("enrollment", f"/v1/patients/{subject}/events", body)
        assert response.status_code == 201, response.text
    lot_id = await clinical.released_lot(died, harvested_on="2014-12-01")

    async def learned() -> bool:  # pulse and cells learn deaths and withdrawals asynchronously
        for service in ("pulse", "cells"):
            for subject in (died, withdrew):
                assert await clinical.stores[service].read_stream(f"patient-status-{subject}")
        return True

    await eventually(learned, timeout=15)

    after_death = await clinical.dose(died, given_on="2015-01-02")
    assert after_death.status_code == 422
    assert after_death.json()["detail"] == (
        f"a pulse dose on 2015-01-02 is after {died}'s death on 2015-01-01; nothing after death can be recorded"
    )
    assert (await clinical.dose(died, given_on="2015-01-01")).status_code == 201  # on the day: allowed
    late_infusion = await clinical.infuse(died, lot_id, given_on="2015-02-01")
    assert late_infusion.status_code == 422 and "after" in late_infusion.json()["detail"]
    assert (await clinical.infuse(died, lot_id, given_on="2014-12-31")).status_code == 201

    harvest = await clinical.post_harvest(withdrew, harvested_on="2015-03-01")
    assert harvest.status_code == 422 and f"{withdrew} withdrew on 2015-01-01" in harvest.json()["detail"]
    assert (await clinical.dose(withdrew, given_on="2015-01-02")).status_code == 422
    assert (await clinical.dose(withdrew, given_on="2014-12-20")).status_code == 201  # before: a fact to keep
    assert (await clinical.get("pulse", f"/v1/patients/{died}/pulse-cycles")).json()["doses_count"] == 1


# --------------------------------------------------------------------------- cells


async def test_infusing_another_patients_lot_is_refused_and_records_nothing(clinical: Clinical) -> None:
    donor, other = await clinical.enroll(), await clinical.enroll()
    lot_id = await clinical.released_lot(donor)
    await clinical.harvest(other)  # the other patient exists in cells too
    patient_before = await clinical.stores["cells"].read_stream(f"cells-patient-{other}")
    lot_before = await clinical.stores["cells"].read_stream(f"lot-{lot_id}")

    response = await clinical.infuse(other, lot_id)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "harvested from another patient" in detail and "chain of identity" in detail
    assert donor not in detail  # nothing about the other patient is revealed

    assert await clinical.stores["cells"].read_stream(f"cells-patient-{other}") == patient_before
    assert await clinical.stores["cells"].read_stream(f"lot-{lot_id}") == lot_before
    assert (await clinical.get("cells", f"/v1/lots/{lot_id}")).json()["status"] == "released"
    for subject in (donor, other):
        view = (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()
        assert view["count"] == 0 and view["infusions"] == []

    # Even many tries, concurrently and with the donor's own infusion racing, never cross over.
    tries = await asyncio.gather(*(clinical.infuse(other, lot_id, given_on=f"2014-07-{d:02d}") for d in range(1, 6)))
    assert {r.status_code for r in tries} == {422}
    assert (await clinical.infuse(donor, lot_id)).status_code == 201
    assert (await clinical.get("cells", f"/v1/patients/{other}/infusions")).json()["count"] == 0


async def test_unknown_and_unreleased_lots_cannot_be_infused(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    unknown = await clinical.infuse(subject, "LOT-NOPE")
    assert unknown.status_code == 404 and unknown.json()["detail"] == "lot LOT-NOPE does not exist"
    assert (await clinical.get("cells", "/v1/lots/LOT-NOPE")).status_code == 404
    assert (await clinical.release("LOT-NOPE")).status_code == 404

    lot_id = await clinical.harvest(subject)
    response = await clinical.infuse(subject, lot_id)
    assert response.status_code == 422
    assert response.json()["detail"] == f"lot {lot_id} has not been released by QC yet"
    assert (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()["count"] == 0


async def test_failed_qc_is_recorded_answered_422_and_never_infusable(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    lot_id = await clinical.harvest(subject)
    response = await clinical.release(lot_id, viability_pct=55)
    assert response.status_code == 422
    assert response.json()["detail"] == f"lot {lot_id} failed QC: viability 55% is below the 70% release minimum"

    lot = (await clinical.get("cells", f"/v1/lots/{lot_id}")).json()
    assert (lot["status"], lot["viability_pct"]) == ("failed_qc", 55)
    again = await clinical.release(lot_id, viability_pct=95)
    assert again.status_code == 409 and "already has its QC result" in again.json()["detail"]
    infusion = await clinical.infuse(subject, lot_id)
    assert infusion.status_code == 422 and "failed QC and can never be infused" in infusion.json()["detail"]


async def test_a_lot_is_infused_once(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    lot_id = await clinical.released_lot(subject)
    assert (await clinical.infuse(subject, lot_id)).status_code == 201
    retry = await clinical.infuse(subject, lot_id)  # the same request again: a client's retry
    assert retry.status_code == 409
    second = await clinical.infuse(subject, lot_id, given_on="2014-09-01")
    assert second.status_code == 422 and "a lot is infused once" in second.json()["detail"]
    view = (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()
    assert view["count"] == 1


async def test_concurrent_infusions_of_one_lot_exactly_one_wins(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    lot_id = await clinical.released_lot(subject)
    same = await asyncio.gather(*(clinical.infuse(subject, lot_id) for _ in range(5)))
    assert sorted(r.status_code for r in same) == [201, 409, 409, 409, 409]

    lot_id = await clinical.released_lot(subject, harvested_on="2014-06-02")
    different = await asyncio.gather(
        *(clinical.infuse(subject, lot_id, given_on=f"2014-07-{d:02d}") for d in range(1, 6))
    )
    statuses = Counter(r.status_code for r in different)
    assert statuses == {201: 1, 422: 4}, [r.text for r in different]

    view = (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()
    assert view["count"] == 2 and [i["infusion_number"] for i in view["infusions"]] == [1, 2]


async def test_concurrent_infusions_of_different_lots_get_unique_numbers(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    lots = [await clinical.released_lot(subject, harvested_on=f"2014-06-{d:02d}") for d in range(1, 6)]
    responses = await asyncio.gather(*(clinical.infuse(subject, lot, given_on="2014-08-01") for lot in lots))
    assert [r.status_code for r in responses] == [201] * 5, [r.text for r in responses]
    assert sorted(r.json()["infusion_number"] for r in responses) == [1, 2, 3, 4, 5]
    fifth = next(r.json() for r in responses if r.json()["infusion_number"] == 5)
    assert [d["code"] for d in fifth["deviations"]] == ["TOO_MANY_INFUSIONS"]


async def test_off_target_infusion_is_recorded_and_flagged(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    lot_id = await clinical.released_lot(subject)
    before = await clinical.deviation_count("cells", "INFUSION_DOSE_OFF_TARGET")
    response = await clinical.infuse(subject, lot_id, cell_count=1.0e7)
    assert response.status_code == 201, response.text
    assert [d["code"] for d in response.json()["deviations"]] == ["INFUSION_DOSE_OFF_TARGET"]
    assert await clinical.deviation_count("cells", "INFUSION_DOSE_OFF_TARGET") == before + 1
    view = (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()
    assert [(d["code"], d["lot_id"]) for d in view["deviations"]] == [("INFUSION_DOSE_OFF_TARGET", lot_id)]


# --------------------------------------------------------------------------- clinical date bounds


def tomorrow() -> str:
    """Today + 1 day (UTC) as the test sees it: never later than the service's own tomorrow."""
    return (datetime.now(UTC).date() + timedelta(days=1)).isoformat()


def assert_refused(response: httpx.Response, detail_starts: str) -> None:
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(detail_starts), response.json()


async def test_enrollment_refuses_dates_outside_the_clinical_bounds(clinical: Clinical) -> None:
    subject = new_subject()
    early = await clinical.post("enrollment", "/v1/patients", enrollment(subject, enrolled_on="0001-01-01"))
    assert_refused(early, "enrolled_on 0001-01-01 is before 1900-01-01")
    late = await clinical.post("enrollment", "/v1/patients", enrollment(subject, enrolled_on="2999-01-01"))
    assert_refused(late, f"enrolled_on 2999-01-01 is after {tomorrow()} (today + 1 day)")
    assert (await clinical.get("enrollment", f"/v1/patients/{subject}")).status_code == 404  # nothing recorded

    await clinical.enroll(subject_id=subject, enrolled_on="1900-01-01")
    death = await clinical.post("enrollment", f"/v1/patients/{subject}/events", {"type": "death", "on": "3005-01-01"})
    assert_refused(death, "death on 3005-01-01 is after")
    biopsy = await clinical.post("enrollment", f"/v1/patients/{subject}/biopsies", {"performed_on": "1899-12-31"})
    assert_refused(biopsy, "performed_on 1899-12-31 is before 1900-01-01")
    view = (await clinical.get("enrollment", f"/v1/patients/{subject}")).json()
    assert (view["status"], view["biopsies"]) == ("active", [])
    on_time = await clinical.post(
        "enrollment", f"/v1/patients/{subject}/events", {"type": "withdrawn", "on": tomorrow()}
    )
    assert on_time.status_code == 201, on_time.text


async def test_enrollment_refuses_subject_ids_a_spreadsheet_reads_as_formulas(clinical: Clinical) -> None:
    for formula in ("-IGA-A-001", "-1+2", "=1+2", "+12", "@SUM-1"):
        refused = await clinical.post("enrollment", "/v1/patients", enrollment(formula))
        assert_refused(refused, "the subject id must not start with '-', '=', '+' or '@'")
        assert formula not in refused.json()["detail"]  # refusals are logged: never echo the id


async def test_pulse_refuses_doses_outside_the_clinical_bounds(clinical: Clinical) -> None:
    subject = await clinical.enroll(enrolled_on="1900-01-01")
    assert_refused(await clinical.dose(subject, given_on="9999-12-31"), "given_on 9999-12-31 is after")
    assert_refused(await clinical.dose(subject, given_on="1899-12-31"), "given_on 1899-12-31 is before 1900-01-01")
    assert (await clinical.get("pulse", f"/v1/patients/{subject}/pulse-cycles")).json()["doses_count"] == 0
    assert (await clinical.dose(subject, given_on=tomorrow())).status_code == 201


async def test_cells_refuse_harvests_and_infusions_outside_the_clinical_bounds(clinical: Clinical) -> None:
    subject = await clinical.enroll(enrolled_on="1900-01-01")
    assert_refused(await clinical.post_harvest(subject, harvested_on="2999-01-01"), "harvested_on 2999-01-01 is after")
    assert_refused(await clinical.post_harvest(subject, harvested_on="0001-01-01"),
                   "harvested_on 0001-01-01 is before 1900-01-01")
    lot_id = await clinical.released_lot(subject, harvested_on="1900-01-01")
    assert_refused(await clinical.infuse(subject, lot_id, given_on="9999-12-31"), "given_on 9999-12-31 is after")
    view = (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()
    assert (view["count"], [lot["status"] for lot in view["lots"]]) == (0, ["released"])
    assert (await clinical.infuse(subject, lot_id, given_on=tomorrow())).status_code == 201


# --------------------------------------------------------------------------- store and broker


async def test_asyncapi_documents_the_published_events(clinical: Clinical) -> None:
    for service, types in (
        ("pulse", ["PulseDoseAdministered", "ProtocolDeviationDetected"]),
        (
            "cells",
            ["AdiposeTissueHarvested", "CellLotReleased", "CellLotFailedQc", "CellsInfused", "ProtocolDeviationDetected"],
        ),
    ):
        document = (await clinical.get(service, "/asyncapi.json")).text
        for event_type in types:
            assert f"{clinical.prefix}.{service}.{event_type}" in document


async def test_replaying_the_store_or_the_broker_rebuilds_what_the_api_shows(clinical: Clinical) -> None:
    subject = await clinical.enroll()
    for cycle, first in ((1, 10), (2, 12)):
        for day in (1, 2, 3):
            await clinical.dose(subject, cycle=cycle, day=day, given_on=f"2014-04-{first + day:02d}", dose_mg=1100)
    lots = [await clinical.released_lot(subject, harvested_on=f"2014-06-0{d}") for d in (1, 2)]
    failed = await clinical.harvest(subject, harvested_on="2014-06-03")
    await clinical.release(failed, viability_pct=10)
    for lot in lots:
        assert (await clinical.infuse(subject, lot, given_on="2014-07-01")).status_code == 201

    api = (await clinical.get("pulse", f"/v1/patients/{subject}/pulse-cycles")).json()
    replayed = cycles(fold(await clinical.stream_events("pulse", f"pulse-{subject}")))
    assert replayed.model_copy(update={"subject_id": subject}).model_dump(mode="json") == api
    assert api["cycles_count"] == 2 and api["doses_count"] == 6 and api["deviations_count"] >= 6

    async def published(service: str, stream_id: str, count: int) -> list[Any]:
        """The stream's events as a consumer of the broker sees them, once all are there."""
        async def check() -> list[Any]:
            opened = clinical.stores[service].codec.open
            envelopes = [opened(m.data) for m in await clinical.broker_messages(service)]
            mine = sorted((e for e in envelopes if e.stream_id == stream_id), key=lambda e: e.stream_version)
            assert len(mine) == count
            return [e.decode() for e in mine]

        return await eventually(check)

    stored = await clinical.stream_events("pulse", f"pulse-{subject}")
    from_broker = cycles(fold(await published("pulse", f"pulse-{subject}", len(stored))))
    assert from_broker.model_copy(update={"subject_id": subject}).model_dump(mode="json") == api

    api = (await clinical.get("cells", f"/v1/patients/{subject}/infusions")).json()
    stored = await clinical.stream_events("cells", f"cells-patient-{subject}")
    from_broker = fold_patient(await published("cells", f"cells-patient-{subject}", len(stored)))
    assert infusions(from_broker).model_dump(mode="json") == api
    patient = fold_patient(await clinical.stream_events("cells", f"cells-patient-{subject}"))
    assert infusions(patient).model_dump(mode="json") == api
    assert [lot["status"] for lot in api["lots"]] == ["infused", "infused", "failed_qc"]
    # The lot streams and the patient stream tell the same story about every lot.
    for lot in patient.lots:
        assert lot.lot_id is not None
        assert fold_lot(await clinical.stream_events("cells", f"lot-{lot.lot_id}")) == lot


async def test_every_published_event_reaches_the_broker_exactly_once(clinical: Clinical) -> None:
    """Run last in the module: compares everything the services stored with everything on NATS.

    Pulse publishes its whole store except the private patient-status streams; cells publishes
    its patient streams only, never the lot streams' second copy of the same facts."""
    subject = await clinical.enroll()
    lot_id = await clinical.released_lot(subject)
    assert (await clinical.infuse(subject, lot_id)).status_code == 201

    for service in ("pulse", "cells"):

        async def stored_and_published(service: str = service) -> tuple[dict[str, Any], list[Any]]:
            """Both read again until they agree: a command of an earlier test (or a consumer's
            write) may commit between one read of the store and the broker's copy of it."""
            stored = [s.envelope async for s in clinical.stores[service].read_all()]
            public = [e for e in stored if not e.stream_id.startswith(("lot-", "patient-status-"))]
            expected = {str(e.event_id): e for e in public}
            assert len(expected) == len(public)
            messages = await clinical.broker_messages(service)
            assert {m.headers["Nats-Msg-Id"] for m in messages} == set(expected)
            return expected, messages

        expected, messages = await eventually(stored_and_published)
        ids = [m.headers["Nats-Msg-Id"] for m in messages]
        assert len(ids) == len(set(ids)), "an event was published twice"
        for message in messages:
            envelope = expected[message.headers["Nats-Msg-Id"]]
            assert message.subject == f"{clinical.prefix}.{service}.{envelope.event_type}"

    infused = [
        m for m in await clinical.broker_messages("cells")
        if m.subject.endswith(".CellsInfused") and subject.encode() in m.data
    ]
    assert len(infused) == 1
    lot_stream = f"lot-{lot_id}"
    lot_copies = [e.envelope async for e in clinical.stores["cells"].read_all() if e.envelope.stream_id == lot_stream]
    assert [e.event_type for e in lot_copies] == ["AdiposeTissueHarvested", "CellLotReleased", "CellsInfused"]
