"""The dashboard's pages and assets, without a browser or a stack: served with the right content
types and headers, nothing outside the static directory, no external URL anywhere (the pages
must work offline), and group colours that meet the contrast the page promises."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import date
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from services.outcomes.dashboard import CONTENT_TYPES, STATIC, dashboard_routes
from services.outcomes.domain import compute_outcome, fold
from services.outcomes.exports import patients_csv
from tests.unit.outcomes.outcome_events import dose, egfr, enrolled

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an XML namespace name: an identifier, never fetched
ASSETS = sorted(p for p in STATIC.rglob("*") if p.is_file())


async def get(path: str) -> httpx.Response:
    app = FastAPI()
    app.include_router(dashboard_routes(None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dashboard.test") as client:
        return await client.get(path)


def test_there_are_assets() -> None:
    names = {p.name for p in ASSETS}
    assert {"index.html", "patient.html", "dashboard.css", "common.js", "charts.js", "overview.js", "patient.js"} <= names


@pytest.mark.parametrize("path, script", [("/", "/static/overview.js"), ("/patients/IGA-A-001", "/static/patient.js")])
async def test_pages_are_html_with_a_strict_content_security_policy(path: str, script: str) -> None:
    response = await get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert f'src="{script}"' in response.text
    assert '<html lang="en">' in response.text


@pytest.mark.parametrize("asset", ASSETS, ids=lambda p: p.name)
async def test_every_asset_is_served_with_its_content_type(asset: Path) -> None:
    response = await get(f"/static/{asset.relative_to(STATIC).as_posix()}")
    assert response.status_code == 200
    expected = CONTENT_TYPES[asset.suffix].split(";")[0]
    assert response.headers["content-type"].split(";")[0].strip() == expected
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == asset.read_bytes()


@pytest.mark.parametrize("path", [
    "/static/../dashboard.py", "/static/%2e%2e/dashboard.py", "/static/..%2fdashboard.py", "/static/",
    "/static/missing.js", "/static/dashboard.py", "/static/.hidden.js", "/static//etc/passwd",
    # Names the file system cannot look up (NUL, too long) and other spellings of an asset.
    "/static/x%00.css", "/static/%00", "/static/common.js%00.css", "/static/" + "a" * 300 + ".css",
    "/static/" + "a/" * 3000 + "x.css", "/static/common.js/", "/static/charts.js%2f..",
])
async def test_nothing_outside_the_static_directory_is_served(path: str) -> None:
    response = await get(path)
    assert response.status_code == 404, response.text[:200]


@pytest.mark.parametrize("asset", ASSETS, ids=lambda p: p.name)
def test_no_external_urls(asset: Path) -> None:
    text = asset.read_text(encoding="utf-8")
    urls = [u for u in re.findall(r"(?i)(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text) if u != SVG_NAMESPACE]
    assert not urls, f"{asset.name} refers to the network: {urls}"
    assert "@import" not in text
    if asset.suffix == ".html":
        for reference in re.findall(r'(?:src|href)="([^"]*)"', text):
            assert reference.startswith(("/", "#", "data:")), f"{asset.name}: {reference} is not same-origin"
            if reference.startswith("/static/"):
                assert (STATIC / reference.removeprefix("/static/")).is_file(), f"{asset.name}: {reference} does not exist"
    if asset.suffix == ".js":
        for module in re.findall(r'from "([^"]+)"', text):
            assert module.startswith("./") and (asset.parent / module).is_file(), f"{asset.name} imports {module}"


def _luminance(colour: str) -> float:
    channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _css_variables() -> dict[str, str]:
    css = (STATIC / "dashboard.css").read_text(encoding="utf-8")
    return {name: value.lower() for name, value in re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})\s*;", css)}


def test_group_colours_are_legible_and_distinct() -> None:
    colours = _css_variables()
    groups = {g: colours[f"group-{g}"] for g in ("A", "B", "control")}
    for group, colour in groups.items():
        assert _contrast(colour, "#ffffff") >= 4.5, f"group {group} text on white"
        for band in ("G1", "G2", "G3a", "G3b", "G4", "G5"):
            assert _contrast(colour, colours[f"band-{band}"]) >= 3.0, f"group {group} line on the {band} band"
    assert len(set(groups.values())) == 3
    for text in ("ink", "muted", "accent", "danger"):
        assert _contrast(colours[text], "#ffffff") >= 4.5, text
        assert _contrast(colours[text], colours["page"]) >= 4.5, f"{text} on the page background"


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="no node to run the dashboard's JavaScript")
def test_the_patient_list_reads_the_ids_the_export_neutralised(tmp_path: Path) -> None:
    """The export prefixes formula-like text with ``'`` (CSV injection); the page's CSV reader
    (common.js ``parseCsv``, run by node) shows the id itself, and numbers as they were."""
    outcomes = [
        compute_outcome(fold(sid, [enrolled(sid=sid), dose(date(2014, 3, 10), sid=sid),
                                   egfr(f"{sid}-r", 20.0, "2015-03-10", sid=sid)]))
        for sid in ("-IGA-1", "=1+2", "IGA-A-001")
    ]
    module = tmp_path / "common.mjs"  # an ES module by its name: node reads it as the browser does
    module.write_text((STATIC / "common.js").read_text(encoding="utf-8"), encoding="utf-8")
    script = (f"import {{ parseCsv }} from {json.dumps(module.as_uri())};\n"
              'import { readFileSync } from "node:fs";\n'
              "const patients = parseCsv(readFileSync(0, 'utf8'));\n"
              "console.log(JSON.stringify(patients.map((p) => [p.subject_id, p.egfr_change])));")
    shown = subprocess.run([NODE, "--input-type=module", "-e", script], input=patients_csv(outcomes),
                           capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(shown.stdout) == [["-IGA-1", "-7.0"], ["=1+2", "-7.0"], ["IGA-A-001", "-7.0"]]


def _run_module(tmp_path: Path, script: str) -> object:
    """Run ``script`` (an ES module importing the dashboard's modules as ``./name.js``) with node
    on a copy of the static directory, marked as ES modules as the browser reads them; its JSON
    output."""
    copy = tmp_path / "static"
    shutil.copytree(STATIC, copy)
    (copy / "package.json").write_text('{"type": "module"}', encoding="utf-8")
    (copy / "check.js").write_text(script, encoding="utf-8")
    shown = subprocess.run([NODE, str(copy / "check.js")], capture_output=True, text=True, check=True, timeout=30)
    return json.loads(shown.stdout)


@pytest.mark.skipif(NODE is None, reason="no node to run the dashboard's JavaScript")
def test_numbers_at_risk_under_the_endpoint_curves(tmp_path: Path) -> None:
    """At a year, the ``at_risk`` of the first listed time at or after it: every event and
    censoring time is listed, so nobody leaves the risk set in between; 0 after the last."""
    script = """import { atRiskAt } from "./evidence-charts.js";
const curve = { times: [0.5, 1.0, 2.25], at_risk: [5, 3, 1] };
console.log(JSON.stringify([0, 0.5, 0.75, 1, 2, 3].map((y) => atRiskAt(curve, y))));"""
    assert _run_module(tmp_path, script) == [
        {"at_risk": 5, "index": 0}, {"at_risk": 5, "index": 0}, {"at_risk": 3, "index": 1},
        {"at_risk": 3, "index": 1}, {"at_risk": 1, "index": 2}, {"at_risk": 0, "index": None},
    ]
