"""The CDISC exports over HTTP: a real outcomes process consuming a small cohort from the real
NATS; every route answers, in both formats, with the projection's rows (contract, "Standard
exports (v2)")."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import httpx
import jsonschema_rs
import nats
import pandas as pd
import pytest

from shared.broker import Topology
from tests.outcomes.conftest import Feed
from tests.outcomes.mixed_run import Published
from tests.outcomes.serving import outcomes_api
from tests.unit.outcomes.cdisc_study import creatinine, reported
from tests.unit.outcomes.outcome_events import died, dose, enrolled, infused

pytestmark = pytest.mark.timeout(60)

A1, C1 = "IGA-A-001", "IGA-C-001"
KEYS = {"analyst": "cdisc-analyst-key", "staff": "cdisc-staff-key", "operator": "cdisc-operator-key"}
SCHEMA = jsonschema_rs.validator_for(json.loads(
    (Path(__file__).parents[1] / "unit" / "outcomes" / "dataset-json-1.1.schema.json").read_text()))
ROUTES = [f"/v1/export/sdtm/{name}" for name in ("dm", "ex", "lb", "ae", "ds")] + [
    f"/v1/export/adam/{name}" for name in ("adsl", "adtte")]


def cohort() -> list[Published]:
    """A1: two doses, an infusion, a creatinine in µmol/L before start, a confirmed decline after.
    C1 (control): one eGFR after enrollment (a preliminary, then corrected), then death."""
    feed = Feed()

    def lab(event, version: int) -> Published:  # type: ignore[no-untyped-def]
        return Published("labs", feed.envelope(event, f"labresult-{event.result_id}", version))

    def event(source: str, e) -> Published:  # type: ignore[no-untyped-def]
        return Published(source, feed.envelope(e))

    return [
        event("enrollment", enrolled(sid=A1, enrolled_on=date(2014, 3, 2), baseline=27.0)),
        event("enrollment", enrolled(sid=C1, enrolled_on=date(2013, 4, 1), baseline=40.0, group="control")),
        event("pulse", dose(date(2014, 3, 10), sid=A1)),
        event("pulse", dose(date(2014, 3, 11), day=2, sid=A1)),
        event("cells", infused("LOT-1", date(2014, 5, 1), sid=A1)),
        lab(creatinine("A1-R1", 2.0, 28.0, "2014-03-01", A1, loinc="14682-9"), 2),
        lab(reported("A1-R2", 16.0, "2014-09-01", A1), 2),
        lab(reported("A1-R3", 15.0, "2014-10-01", A1), 2),
        lab(reported("C1-R1", 3.8, "2014-05-01", C1, status="preliminary"), 2),
        lab(reported("C1-R1", 38.0, "2014-05-01", C1, status="corrected"), 4),
        event("enrollment", died(date(2015, 1, 1), sid=C1)),
    ]


@pytest.fixture
async def api(backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    async with outcomes_api(cohort(), backend, tmp_path, nats_client, topology, monkeypatch,
                            api_keys=",".join(f"{role}:{key}" for role, key in KEYS.items()),
                            headers={"Authorization": f"Bearer {KEYS['analyst']}"}) as client:
        yield client


def read_xpt(body: bytes) -> pd.DataFrame:
    """pandas reads a zero as 16⁻⁶⁵ (tests/unit/outcomes/test_cdisc_writers.py): read as zero."""
    return pd.read_sas(io.BytesIO(body), format="xport", encoding="utf-8").replace(16.0 ** -65, 0.0)


async def test_every_dataset_answers_in_both_formats(api: httpx.AsyncClient) -> None:
    for route in ROUTES:
        name = route.rsplit("/", 1)[1]
        xpt = await api.get(f"{route}.xpt")
        assert xpt.status_code == 200, (route, xpt.text)
        assert xpt.headers["content-type"] == "application/x-sas-xport"
        assert xpt.headers["content-disposition"] == f'attachment; filename="{name}.xpt"'
        assert xpt.headers["X-Projection-Position"] == "enrollment:3,pulse:2,cells:1,labs:5"
        assert xpt.content.startswith(b"HEADER RECORD*******LIBRARY HEADER RECORD!!!!!!!")
        document = await api.get(f"{route}.json")
        assert document.status_code == 200, (route, document.text)
        assert document.headers["content-type"] == "application/json"
        body = document.json()
        SCHEMA.validate(body)
        assert (body["name"], body["itemGroupOID"], body["studyOID"]) == (name.upper(), f"IG.{name.upper()}", "NEPHROTRACK")
        assert body["records"] == len(body["rows"]) and body["dbLastModifiedDateTime"] <= body["datasetJSONCreationDateTime"]
        if body["records"]:
            assert [c["name"] for c in body["columns"]] == list(read_xpt(xpt.content).columns)
            assert len(read_xpt(xpt.content)) == body["records"]


async def test_the_rows_are_the_projections(api: httpx.AsyncClient) -> None:
    dm = read_xpt((await api.get("/v1/export/sdtm/dm.xpt")).content)
    assert dm["USUBJID"].tolist() == [f"NEPHROTRACK-{A1}", f"NEPHROTRACK-{C1}"]
    assert (dm["RFSTDTC"].tolist(), dm["DTHFL"].tolist()) == (["2014-03-10", "2013-04-01"], ["", "Y"])
    ex = read_xpt((await api.get("/v1/export/sdtm/ex.xpt")).content)
    assert list(zip(ex["EXTRT"], ex["EXDOSE"], ex["EXSTDTC"], strict=True)) == [
        ("METHYLPREDNISOLONE", 1000.0, "2014-03-10"), ("METHYLPREDNISOLONE", 1000.0, "2014-03-11"),
        ("AUTOLOGOUS ADIPOSE-DERIVED SVF/MSC", 3.0e7, "2014-05-01")]
    lb = read_xpt((await api.get("/v1/export/sdtm/lb.xpt")).content)
    assert list(zip(lb["USUBJID"].str[-9:], lb["LBTESTCD"], lb["LBLOINC"], lb["LBSTRESN"], strict=True)) == [
        (A1, "CREAT", "14682-9", 2.0), (A1, "GFRBSA", "98979-8", 28.0), (A1, "GFRBSA", "98979-8", 16.0),
        (A1, "GFRBSA", "98979-8", 15.0), (C1, "GFRBSA", "98979-8", 38.0)]  # the correction, not the typo
    for subject_id in (A1, C1):  # one eGFR record per counted eGFR of the patient
        counted = (await api.get(f"/v1/patients/{subject_id}")).json()["counted_egfr_n"]
        assert (lb[lb["USUBJID"] == f"NEPHROTRACK-{subject_id}"]["LBTESTCD"] == "GFRBSA").sum() == counted
    ds = (await api.get("/v1/export/sdtm/ds.json")).json()
    assert [row[-3:-1] for row in ds["rows"]] == [["PROTOCOL MILESTONE", "2014-03-02"],
                                                  ["PROTOCOL MILESTONE", "2013-04-01"],
                                                  ["DISPOSITION EVENT", "2015-01-01"]]
    assert (await api.get("/v1/export/sdtm/ae.json")).json()["records"] == 0  # no adverse event recorded


async def test_adtte_is_the_composite_endpoint_of_every_patient(api: httpx.AsyncClient) -> None:
    adtte = read_xpt((await api.get("/v1/export/adam/adtte.xpt")).content)
    assert list(zip(adtte["USUBJID"].str[-9:], adtte["PARAMCD"], adtte["AVAL"], adtte["CNSR"], strict=True)) == [
        (A1, "COMPKID", 175.0, 0.0),  # 16 ≤ 60 % of 28 on 2014-09-01, confirmed by 15 thirty days later
        (C1, "COMPKID", 640.0, 0.0),  # death, 2013-04-01 → 2015-01-01
    ]
    json_rows = (await api.get("/v1/export/adam/adtte.json")).json()
    columns = [c["name"] for c in json_rows["columns"]]
    assert [(row[columns.index("AVAL")], row[columns.index("CNSR")], row[columns.index("ADT")])
            for row in json_rows["rows"]] == [(175, 0, "2014-09-01"), (640, 0, "2015-01-01")]


async def test_unknown_datasets_and_formats_are_404_and_only_analysts_may_read(api: httpx.AsyncClient) -> None:
    for path, reason in [("/v1/export/sdtm/vs.xpt", "unknown SDTM dataset 'vs.xpt'"),
                         ("/v1/export/sdtm/adsl.json", "unknown SDTM dataset 'adsl.json'"),
                         ("/v1/export/adam/dm.xpt", "unknown ADAM dataset 'dm.xpt'"),
                         ("/v1/export/sdtm/dm.csv", "unknown format 'csv'"),
                         ("/v1/export/sdtm/dm", "unknown SDTM dataset 'dm'"),
                         ("/v1/export/cdash/dm.xpt", "Not Found")]:
        response = await api.get(path)
        assert response.status_code == 404, path
        assert response.json()["detail"].startswith(reason), (path, response.json())
    refused = [await api.get("/v1/export/sdtm/dm.xpt", headers={"Authorization": ""}),
               await api.get("/v1/export/adam/adsl.json", headers={"Authorization": f"Bearer {KEYS['staff']}"}),
               await api.get("/v1/export/adam/adsl.json", headers={"Authorization": f"Bearer {KEYS['operator']}"})]
    assert [r.status_code for r in refused] == [401, 403, 403]
