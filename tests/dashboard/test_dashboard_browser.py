"""The analyst dashboard in a real browser (Debian's Chromium driven by Playwright) over a real
stack: all five services as processes on PostgreSQL and NATS, loaded by the demo loader.

It checks what an analyst would look at: the cohort table shows the abstract's numbers (and
each number's source and raw value match the API), the trajectory and survival charts have one
series per patient and per group, a patient link opens that patient's timeline, and lab
results published on the broker appear without a reload. Screenshots go to
``test-artifacts/dashboard/``. Chromium comes from ``make browsers``; where it cannot be
installed the test is skipped, loudly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from rich.console import Console

from nephrotrack.demo import Stack as DemoStack
from nephrotrack.demo import demo
from shared.broker import LAB_RESULTS_SUBJECT
from tests.stack import ROOT, TEST_API_KEY, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SERVICES = ["enrollment", "pulse", "cells", "labs", "outcomes"]
CHROMIUM = Path(os.environ.get("NEPHROTRACK_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
LIVE_TIMEOUT_MS = 15_000

# The abstract, as the table must show it (rounded half up) — from nephrotrack/seed.py's ABSTRACT.
TABLE = {
    "A": {"n": "7", "mean_age": "60", "mean_baseline_egfr": "28", "mean_post_egfr": "39", "mean_followup_years": "6.8"},
    "B": {"n": "3", "mean_age": "25", "mean_baseline_egfr": "85", "mean_post_egfr": "106", "mean_followup_years": "9.3"},
    "control": {"n": "1", "mean_baseline_egfr": "33", "kidney_failure_count": "1"},
}


def _require_chromium() -> None:
    if not CHROMIUM.exists():
        reason = (
            f"!!! DASHBOARD BROWSER TEST SKIPPED: no Chromium at {CHROMIUM}. Run `make browsers` as root "
            "(apt-get install -y --no-install-recommends chromium) or set NEPHROTRACK_CHROMIUM. !!!"
        )
        print(f"\n{'!' * 100}\n{reason}\n{'!' * 100}", file=sys.stderr)
        pytest.skip(reason)
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed in this environment: `make test` installs the dev extras "
                    "(or `.venv/bin/pip install playwright`; never `playwright install`: the test uses Debian's Chromium)")


def _lab_result(message_id: str, collected_at: str, egfr: float) -> dict[str, Any]:
    return {
        "message_id": message_id, "subject_id": "IGA-A-001", "lab_id": "LAB-CENTRAL-01", "loinc": "98979-8",
        "value": egfr, "unit": "mL/min/1.73m2", "collected_at": collected_at, "status": "final", "result_id": message_id,
    }


class LabResults:
    """Publishes lab results on ``labs.results`` and takes them back out of the stream.

    The lab-results stream is shared by every stack on the broker (the subject is fixed by the
    contract) and a new stack's labs service reads it from the start, so a result for a seed
    patient left in it would change the cohort of every later demo, in any test. Each one is
    therefore deleted as soon as this stack has shown it, and at the latest when the test ends.
    """

    def __init__(self, client: nats.NATS) -> None:
        self.js = client.jetstream()
        self.published: list[tuple[str, int]] = []

    async def publish(self, result: dict[str, Any]) -> None:
        ack = await self.js.publish(
            LAB_RESULTS_SUBJECT, json.dumps(result).encode(), headers={"Nats-Msg-Id": result["message_id"]})
        self.published.append((ack.stream, ack.seq))

    async def withdraw(self) -> None:
        while self.published:
            stream, seq = self.published.pop()
            with contextlib.suppress(Exception):
                await self.js.delete_msg(stream, seq)

    async def forget_consumers(self, prefix: str) -> None:
        """This stack's durable consumers on the shared lab streams (the prefix's own streams are
        deleted by the ``nats_client`` fixture)."""
        try:
            for stream in await self.js.streams_info():
                if not stream.config.name.startswith(prefix.upper()):
                    for consumer in await self.js.consumers_info(stream.config.name):
                        if consumer.name.startswith(f"{prefix}-"):
                            await self.js.delete_consumer(stream.config.name, consumer.name)
                            print(f"deleted consumer {consumer.name} of {stream.config.name}", file=sys.stderr)
        except Exception as exc:  # cleanup only: never hide the test's own outcome
            print(f"could not delete {prefix}'s consumers: {exc!r}", file=sys.stderr)


async def test_the_dashboard_shows_the_study_and_updates_live(tmp_path: Path, prefix: str, nats_client: nats.NATS) -> None:
    _require_chromium()
    from playwright.async_api import expect

    started = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stack = Stack(tmp_path, prefix, SERVICES)
    labs = LabResults(nats_client)
    try:
        await stack.start()
        base = stack.url("outcomes")
        async with httpx.AsyncClient() as http:  # no key: the pages and assets are open, the data is not
            page_status = (await http.get(f"{base}/")).status_code
            assert page_status == 200, (
                f"GET / answered {page_status}: the dashboard is not wired into the outcomes app "
                "(service.app(..., public(dashboard_routes(service)), ...))")
            assert (await http.get(f"{base}/static/overview.js")).status_code == 200
            assert (await http.get(f"{base}/v1/cohorts")).status_code == 401
        evidence = await demo(DemoStack.from_env(stack.env), timeout=90, console=Console(file=io.StringIO()))
        api = {row["group"]: row for row in evidence.cohorts}
        print(f"stack and demo ready in {time.monotonic() - started:.1f} s", file=sys.stderr)

        async with watched_page(base, "failure.png") as page:
            await _overview(page, expect, base, api)
            await _live_overview(page, expect, labs, prefix)
            await _filters(page, expect)
            await _patient(page, expect, base, labs, prefix)
            await _keyboard_to_the_control_patient(page, expect, base)
    except Exception:
        for service in SERVICES:
            print(f"--- {service} log ---\n{stack.log(service)}", file=sys.stderr)
        raise
    finally:
        await labs.withdraw()
        await stack.stop()
        await labs.forget_consumers(prefix)
    print(f"dashboard browser test took {time.monotonic() - started:.1f} s", file=sys.stderr)


@contextlib.asynccontextmanager
async def watched_page(base: str, failure_png: str) -> AsyncIterator[Any]:
    """A Chromium page on ``base`` that must raise no console or page error and request nothing
    off ``base``; a failing test leaves a screenshot ``failure_png`` in the artifacts."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1440, "height": 1000})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                if m.type == "error" and "401" not in m.text else None)  # 401s: before the key is given
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: None if r.url.startswith((base, "data:")) else problems.append(f"external request {r.url}"))
        try:
            yield page
        except Exception:
            await page.screenshot(path=str(ARTIFACTS / failure_png), full_page=True)
            raise
        finally:
            await browser.close()
        assert not problems, problems


async def _sign_in(page: Any, expect: Any, base: str) -> None:
    """The page holds no data: it asks for the analyst key when the API answers 401."""
    await page.goto(f"{base}/")
    key = page.get_by_label("Analyst key")
    await expect(key).to_be_focused()
    await expect(page.locator("#freshness")).to_contain_text("Not updating")
    await page.screenshot(path=str(ARTIFACTS / "sign-in.png"))
    await key.fill(TEST_API_KEY)
    await key.press("Enter")
    await expect(page.locator("#auth")).to_be_hidden()


async def expect_cohort_cells(table: Any, expect: Any, expected: dict[str, dict[str, str]],
                              api: dict[str, dict[str, Any]] | None = None) -> None:
    """Each group's row of ``table`` shows the expected texts; each number is traceable: it names
    its endpoint and field, and (given the API's rows) its raw value is the API's."""
    for group, cells in expected.items():
        row = table.locator(f'tr[data-group="{group}"]')
        for field, text in cells.items():
            cell = row.locator(f'[data-field="[group={group}].{field}"]')
            await expect(cell).to_have_text(text)
            assert await cell.get_attribute("data-source") == "GET /v1/cohorts"
            if api is not None:
                assert math.isclose(float(await cell.get_attribute("data-raw")), api[group][field], rel_tol=1e-12)


async def _overview(page: Any, expect: Any, base: str, api: dict[str, dict[str, Any]]) -> None:
    await _sign_in(page, expect, base)
    await expect(page.locator("#cohort-table tbody tr[data-group]")).to_have_count(3)
    await expect_cohort_cells(page.locator("#cohort-table"), expect, TABLE, api)
    # every number on the page carries its source
    untraced = await page.eval_on_selector_all(".value", "els => els.filter(e => !e.dataset.source || !e.dataset.field).length")
    assert untraced == 0

    chart = page.locator("#trajectory-chart")
    await expect(chart.locator(".series-patient")).to_have_count(11)
    await expect(chart.locator(".series-mean")).to_have_count(3)
    for group, count in (("A", 7), ("B", 3), ("control", 1)):
        await expect(chart.locator(f'.series-patient[data-group="{group}"]')).to_have_count(count)
    await expect(chart.locator("[data-corrected]")).to_have_count(1)  # IGA-A-002's corrected final eGFR
    await expect(chart.locator("title").first).not_to_be_empty()
    assert await chart.locator("desc").count() == 1
    assert await chart.get_attribute("role") == "img"
    await expect(page.locator("#survival-chart .km-curve")).to_have_count(3)
    await expect(page.locator('#survival-chart .at-risk[data-group="A"]').first).to_have_attribute("data-raw", "7")
    await expect(page.locator("#patient-table a.patient-link")).to_have_count(11)
    assert await page.locator("#trajectory-table tbody tr").count() > 11  # the chart's table alternative
    await expect(page.locator("#freshness")).to_contain_text("Live")

    rounding = await page.evaluate("""async () => {
        const { round } = await import("/static/common.js");
        return [round(0.5, 0), round(2.675, 2), round(-1.25, 1), round(6.800039, 1), round(9.95, 1),
                round(1e-7, 2), round(99.5, 0), round(null, 1), round(11, 0, { signed: true })];
    }""")
    assert rounding == ["1", "2.68", "−1.3", "6.8", "10.0", "0.00", "100", "—", "+11"]
    await page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)


async def _live_overview(page: Any, expect: Any, labs: LabResults, prefix: str) -> None:
    await page.evaluate("window.__notReloaded = true")
    before = await page.locator('[data-field="[group=A].mean_post_egfr"]').get_attribute("data-raw")
    result_id = f"IGA-A-001-LIVE1-{prefix}"
    await labs.publish(_lab_result(result_id, "2019-08-01T07:30:00Z", 41.0))
    point = page.locator(f'#trajectory-chart [data-result-id="{result_id}"]')
    await expect(point).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    await labs.withdraw()  # this stack's labs service has it; no other stack should
    assert await page.evaluate("window.__notReloaded") is True, "the page reloaded"
    after = page.locator('[data-field="[group=A].mean_post_egfr"]')
    await expect(after).not_to_have_attribute("data-raw", before or "")
    assert math.isclose(float(await after.get_attribute("data-raw")), (273 - 38 + 41) / 7, rel_tol=1e-12)
    await page.screenshot(path=str(ARTIFACTS / "overview-live.png"), full_page=True)


async def _filters(page: Any, expect: Any) -> None:
    await page.get_by_role("checkbox", name="Control").uncheck()
    await expect(page.locator("#trajectory-chart .series-patient")).to_have_count(10)
    await expect(page.locator("#survival-chart .km-curve")).to_have_count(2)
    await expect(page.locator("#cohort-table tbody tr[data-group]")).to_have_count(2)
    assert "groups=A%2CB" in page.url or "groups=A,B" in page.url
    await page.get_by_role("checkbox", name="Control").check()
    await page.fill("#filter-from", "2013-01-01")
    await page.fill("#filter-to", "2014-12-31")
    # treatment started in 2013–2014: and the control
    await expect(page.locator("#patient-table a.patient-link")).to_have_count(5)
    await expect(page.locator("#trajectory-chart .series-patient")).to_have_count(5)
    await page.get_by_role("button", name="Reset filters").click()
    await expect(page.locator("#patient-table a.patient-link")).to_have_count(11)
    downloads = {name: await page.get_attribute(f"#download-{name}", "href") for name in ("csv", "parquet")}
    assert downloads == {"csv": "/v1/export/patients.csv", "parquet": "/v1/export/patients.parquet"}
    async with page.expect_download() as info:
        await page.click("#download-csv")
    download = await info.value
    assert download.suggested_filename == "patients.csv"
    assert (await download.path()).read_text().count("\n") == 12  # header + 11 patients


async def _patient(page: Any, expect: Any, base: str, labs: LabResults, prefix: str) -> None:
    await page.get_by_role("link", name="IGA-A-001", exact=True).click()
    await page.wait_for_url(f"{base}/patients/IGA-A-001")
    await expect(page.locator("#patient-heading")).to_contain_text("IGA-A-001")
    await expect(page.locator("#cycles-table tbody tr[data-cycle]")).to_have_count(6)
    await expect(page.locator("#infusions-table tbody tr[data-kind=infusion]")).to_have_count(3)
    await expect(page.locator("#egfr-table tbody tr[data-kind=egfr]")).to_have_count(8)  # 7 seeded + the live one
    timeline = page.locator("#timeline-chart")
    await expect(timeline.locator("[data-kind=pulse_cycle]")).to_have_count(6)
    await expect(timeline.locator("[data-kind=infusion]")).to_have_count(3)
    await expect(timeline.locator("[data-kind=egfr]")).to_have_count(8)
    await expect(page.locator('[data-field="pulse_cycles"]')).to_have_text("6")
    await page.screenshot(path=str(ARTIFACTS / "patient.png"), full_page=True)

    await page.evaluate("window.__notReloaded = true")
    result_id = f"IGA-A-001-LIVE2-{prefix}"
    await labs.publish(_lab_result(result_id, "2019-10-01T07:30:00Z", 42.0))
    await expect(timeline.locator(f'[data-result-id="{result_id}"]')).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    await labs.withdraw()
    await expect(page.locator(f'#egfr-table tr[data-result-id="{result_id}"]')).to_have_count(1)
    await expect(page.locator('[data-field="post_egfr"]')).to_have_text("42.0")
    assert await page.evaluate("window.__notReloaded") is True, "the page reloaded"
    await page.screenshot(path=str(ARTIFACTS / "patient-live.png"), full_page=True)


async def _keyboard_to_the_control_patient(page: Any, expect: Any, base: str) -> None:
    await page.go_back()
    await expect(page.locator("#patient-table a.patient-link")).to_have_count(11)
    link = page.get_by_role("link", name="IGA-C-001", exact=True)
    await link.focus()
    await page.evaluate("document.getElementById('filters').dispatchEvent(new Event('change'))")  # a re-render
    assert await page.evaluate("document.activeElement.textContent") == "IGA-C-001"  # focus kept through it
    await page.keyboard.press("Enter")
    await page.wait_for_url(f"{base}/patients/IGA-C-001")
    await expect(page.locator("#timeline-chart [data-kind=dialysis_started]")).to_have_count(1)
    await expect(page.locator("#clinical-table tr[data-kind=dialysis_started]")).to_have_count(1)
    await page.screenshot(path=str(ARTIFACTS / "patient-control.png"), full_page=True)
