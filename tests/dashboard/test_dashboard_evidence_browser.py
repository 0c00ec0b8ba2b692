"""The dashboard's clinical evidence and trial analyses in a real browser (Debian's Chromium
driven by Playwright): a real outcomes process on PostgreSQL, fed through NATS the v2 run of
tests/outcomes/test_api_v2.py (UPCR with a correction and a preliminary, paired biopsies, adverse
events with a follow-up, a confirmed decline, a death, a dialysis) plus an adverse event whose
term is markup. The overview must show the numbers worked out there by hand — the v2 cohort
values, the safety tables with the serious AE marked, the biopsies before → after, the UPCR
lines, the composite-endpoint and kidney-failure curves with numbers at risk, the slopes or why
not — and the patient page the AEs with their follow-ups and the urine results on the timeline.
A follow-up report published while the page is open shows without a reload; the group filter
hides a group's evidence; the term is shown as text, never parsed; at a phone's width nothing
scrolls sideways. Screenshots go to ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import nats
import pytest

from shared.broker import Topology
from tests.dashboard.test_dashboard_browser import (
    ARTIFACTS,
    LIVE_TIMEOUT_MS,
    _require_chromium,
    _sign_in,
    expect_cohort_cells,
    watched_page,
)
from tests.outcomes.conftest import Feed
from tests.outcomes.mixed_run import Published, publish
from tests.outcomes.serving import outcomes_api
from tests.outcomes.test_api_v2 import A1, A1_DECLINE_DAYS, A2, A2_DEATH_DAYS, C1, C1_DIALYSIS_DAYS, cohort, years
from tests.unit.outcomes.outcome_events import adverse_event

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MARKUP_TERM = '<img src=x onerror="window.__injected = 1">rash'


def _patient_event(event: Any) -> Published:
    """An enrollment event after the cohort's on the patient's stream (AE reports are versioned by it)."""
    stream = f"patient-{event.subject_id}"
    last = max((p.envelope.stream_version for p in cohort() if p.envelope.stream_id == stream), default=0)
    return Published("enrollment", Feed().envelope(event, stream, last + 1))


def run() -> list[Published]:
    """The v2 cohort and, for the control patient, an AE named in markup."""
    return [*cohort(), _patient_event(adverse_event("AE-C1", MARKUP_TERM, date(2013, 5, 1), grade=1, sid=C1))]


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_the_dashboard_shows_the_clinical_evidence(
    backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _require_chromium()
    from playwright.async_api import expect

    started = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with outcomes_api(run(), backend, tmp_path, nats_client, topology, monkeypatch) as client:
        base = str(client.base_url).rstrip("/")
        slopes = {g: (await client.get(f"/v1/cohorts/{g}/slopes")).json() for g in ("A", "control")}
        async with watched_page(base, "evidence-failure.png") as page:
            await _sign_in(page, expect, base)
            await _cohort_values(page, expect)
            await _safety(page, expect)
            await _biopsies(page, expect)
            await _upcr(page, expect)
            await _endpoints(page, expect)
            await _slopes(page, expect, slopes)
            await page.screenshot(path=str(ARTIFACTS / "overview-evidence.png"), full_page=True)
            assert (await client.post("/v1/locks", json={"name": "interim-2026"})).status_code == 201
            await _group_filter(page, expect)
            await _live(page, expect, nats_client, topology)
            await _small_screens(page, expect)
            await _patient(page, expect, base)
            await _locked(page, expect, base)
    print(f"dashboard evidence browser test took {time.monotonic() - started:.1f} s", file=sys.stderr)


async def _text(page: Any, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


async def _cohort_values(page: Any, expect: Any) -> None:
    table = page.locator("#evidence-table")
    await expect(table.locator("tbody tr[data-group]")).to_have_count(2)  # /v1/cohorts lists groups with patients: A, control
    expected = {
        "A": {"mean_baseline_upcr": "1.60", "mean_post_upcr": "0.50", "complete_remission_count": "1",
              "partial_remission_count": "1", "decline_40_count": "1", "composite_endpoint_count": "2",
              "patients_with_ae": "2", "patients_with_serious_ae": "1", "patients_with_significant_related_ae": "1"},
        "control": {"mean_baseline_upcr": "—", "mean_post_upcr": "—", "complete_remission_count": "0",
                    "decline_40_count": "0", "composite_endpoint_count": "1", "patients_with_ae": "1",
                    "patients_with_serious_ae": "0", "patients_with_significant_related_ae": "0"},
    }
    await expect_cohort_cells(table, expect, expected)
    assert float(await table.locator('[data-field="[group=A].mean_baseline_upcr"]').get_attribute("data-raw")) == 1.6
    # a serious AE in the group is flagged in the table, not only counted
    await expect(table.locator('tr[data-group="A"] .serious-count')).to_have_count(2)
    await expect(table.locator('tr[data-group="control"] .serious-count')).to_have_count(0)
    untraced = await page.eval_on_selector_all(".value", "els => els.filter(e => !e.dataset.source || !e.dataset.field).length")
    assert untraced == 0


async def _safety(page: Any, expect: Any) -> None:
    a = page.locator('.safety-group[data-group="A"]')
    terms = a.locator("table.safety-terms tbody tr[data-term]")
    await expect(terms).to_have_count(3)
    pneumonia = a.locator('tr[data-term="pneumonia"]')
    await expect(pneumonia).to_have_class("serious-row")
    await expect(pneumonia.locator(".badge.sae")).to_have_text("SAE")
    await expect(a.locator("tr.serious-row")).to_have_count(1)  # the infusion reaction is grade 3 but not serious
    await expect(pneumonia.locator('[data-field="by_term[term=pneumonia].max_grade"]')).to_have_text("3")
    reaction = a.locator('tr[data-term="infusion reaction"]')
    await expect(reaction.locator('[data-field="by_term[term=infusion reaction].significant_related"]')).to_have_text("1")
    hyper = a.locator('tr[data-term="hyperglycaemia"]')  # its follow-up report (grade 2) replaced grade 1
    await expect(hyper.locator('[data-field="by_term[term=hyperglycaemia].max_grade"]')).to_have_text("2")
    grades = {g: await _text(a, f'[data-field="by_grade.{g}"]') for g in "12345"}
    assert grades == {"1": "0", "2": "1", "3": "2", "4": "0", "5": "0"}
    related = {k: await _text(a, f'[data-field="related_by_intervention.{k}"]') for k in ("mp_pulse", "cell_infusion", "fat_harvest")}
    assert related == {"mp_pulse": "1", "cell_infusion": "1", "fat_harvest": "0"}
    await expect(a.locator('[data-field="events"]')).to_have_text("3")
    await expect(a.locator('[data-field="[group=A].patients_with_ae"]')).to_have_text("2")

    # markup in a term is text: shown as written, never parsed into an element
    control = page.locator('.safety-group[data-group="control"]')
    await expect(control.locator("table.safety-terms tbody th").first).to_have_text(MARKUP_TERM)
    assert await page.locator("#safety-groups img").count() == 0
    assert await page.evaluate("window.__injected") is None


async def _biopsies(page: Any, expect: Any) -> None:
    a = page.locator('#biopsy-summary tr[data-group="A"]')
    counts = {k: await _text(a, f'[data-field="{k}"]') for k in (
        "paired", "deposits_cleared", "iga_cleared", "proliferation_resolved", "foot_process_improved", "lee_grade_improved")}
    assert counts == {"paired": "1", "deposits_cleared": "1", "iga_cleared": "1", "proliferation_resolved": "0",
                      "foot_process_improved": "1", "lee_grade_improved": "1"}
    pairs = page.locator("#biopsy-pairs tbody tr[data-subject]")
    await expect(pairs).to_have_count(1)  # A2 has a follow-up biopsy only
    pair = page.locator(f'#biopsy-pairs tr[data-subject="{A1}"]')
    before, after = pair.locator("td").nth(1), pair.locator("td").nth(2)
    for cell, on, deposits, iga, lee in ((before, "2013-12-20", "present", "2+", "IV"), (after, "2015-01-20", "absent", "negative", "III")):
        text = await cell.inner_text()
        assert on in text and f"Mesangial deposits: {deposits}" in text and f"IgA immunofluorescence: {iga}" in text, text
        assert f"Lee grade: {lee}" in text, text
    await expect(pair.locator('[data-field="proliferation_resolved"]')).to_have_text("no")
    await expect(pair.locator('[data-field="iga_cleared"]')).to_have_text("yes")
    await pair.get_by_role("link", name=A1, exact=True).focus()
    await page.evaluate("document.getElementById('filters').dispatchEvent(new Event('change'))")  # a re-render
    assert await page.evaluate("document.activeElement.textContent") == A1, "the re-rendered pairs lost the keyboard focus"


async def _upcr(page: Any, expect: Any) -> None:
    chart = page.locator("#upcr-chart")
    await expect(chart.locator(".series-patient")).to_have_count(2)  # the control has no UPCR
    await expect(chart.locator(f'.series-patient[data-subject="{A1}"] circle')).to_have_count(3)  # the preliminary is not counted
    await expect(chart.locator(f'.series-patient[data-subject="{A2}"] circle')).to_have_count(2)
    corrected = chart.locator('circle[data-result-id="A1-U3"]')
    await expect(corrected).to_have_count(1)  # the corrected value, not the typo
    assert float(await corrected.get_attribute("data-raw")) == 0.8
    assert await chart.get_attribute("role") == "img" and await chart.locator("desc").count() == 1
    await page.locator('button[aria-controls="upcr-table"]').click()
    await expect(page.locator("#upcr-table tbody tr")).to_have_count(5)
    await page.locator('button[aria-controls="upcr-table"]').click()


async def _endpoints(page: Any, expect: Any) -> None:
    composite = page.locator("#composite-chart")
    a = composite.locator('.step-curve[data-group="A"]')
    values = await a.locator(".point").evaluate_all("els => els.map(e => Number(e.dataset.raw))")
    assert values == [0.5, 0.0]  # A1's confirmed decline, then A2's death
    await expect(composite.locator('.step-curve[data-group="control"] .point')).to_have_count(1)
    at_risk = {(g, y): await composite.locator(f'.at-risk[data-group="{g}"][data-year="{y}"]').get_attribute("data-raw")
               for g in ("A", "control") for y in (0, 1, 2)}
    assert at_risk == {("A", 0): "2", ("A", 1): "1", ("A", 2): "0", ("control", 0): "1", ("control", 1): "1", ("control", 2): "0"}
    await page.locator('button[aria-controls="composite-table"]').click()
    times = await page.locator('#composite-table [data-field^="composite.times"]').evaluate_all("els => els.map(e => Number(e.dataset.raw))")
    assert times == [years(A1_DECLINE_DAYS), years(A2_DEATH_DAYS), years(C1_DIALYSIS_DAYS)]

    incidence = page.locator("#kidney-failure-chart")
    control = incidence.locator('.step-curve[data-group="control"] .point')
    await expect(control).to_have_count(1)
    assert float(await control.get_attribute("data-raw")) == 1.0
    # A: censored at the last eGFR, and A2's death competes: no kidney failure, two ticks at 0 %
    await expect(incidence.locator('.step-curve[data-group="A"] .point')).to_have_count(0)
    ticks = await incidence.locator('.step-curve[data-group="A"] .censor').evaluate_all("els => els.map(e => Number(e.dataset.raw))")
    assert ticks == [0.0, 0.0]
    await expect(incidence.locator(".curve-label.group-control")).to_have_text("Control 100 %")


async def _slopes(page: Any, expect: Any, slopes: dict[str, Any]) -> None:
    fit = slopes["A"]["total"]
    row = page.locator('#slopes-table tr[data-group="A"][data-window="total"]')
    slope = row.locator('[data-field="total.slope"]')
    assert math.isclose(float(await slope.get_attribute("data-raw")), fit["slope"], rel_tol=1e-12)
    shown = await slope.inner_text()
    assert abs(float(shown.replace("−", "-").replace("+", "")) - fit["slope"]) <= 0.005
    low = float((await row.locator('[data-field="total.ci_low"]').inner_text()).replace("−", "-").replace("+", ""))
    assert abs(low - fit["ci_low"]) <= 0.005
    await expect(row.locator("svg.forest")).to_have_count(1)
    await expect(row.locator('[data-field="total.patients"]')).to_have_text("2")
    await expect(row.locator('[data-field="total.measurements"]')).to_have_text("6")
    control = page.locator('#slopes-table tr[data-group="control"][data-window="total"]')
    await expect(control.locator('[data-field="total.reason"]')).to_have_text(slopes["control"]["total"]["reason"])
    await expect(control).to_contain_text("not fitted")
    await expect(control.locator("svg.forest")).to_have_count(0)
    assert slopes["control"]["total"]["reason"].startswith("too few patients")


async def _group_filter(page: Any, expect: Any) -> None:
    control = page.get_by_role("checkbox", name="Control")
    await control.uncheck()
    await expect(page.locator("#evidence-table tbody tr[data-group]")).to_have_count(1)
    await expect(page.locator(".safety-group")).to_have_count(1)
    await expect(page.locator("#composite-chart .step-curve")).to_have_count(1)
    await expect(page.locator("#kidney-failure-chart .step-curve")).to_have_count(1)
    await expect(page.locator('#slopes-table tr[data-group="control"]')).to_have_count(0)
    await control.check()
    await expect(page.locator(".safety-group")).to_have_count(2)


async def _live(page: Any, expect: Any, nats_client: nats.NATS, topology: Topology) -> None:
    """A follow-up report making A1's pulse-related hyperglycaemia serious reaches the open page
    without a reload: now a significant related AE in A1 as well as in A2."""
    await page.evaluate("window.__notReloaded = true")
    serious = adverse_event("AE-1", "hyperglycaemia", date(2014, 1, 16), grade=2, serious=True, related_to=("mp_pulse",),
                            causality="possible", outcome="recovered", follow_up=True, sid=A1)
    await publish(nats_client.jetstream(), topology, [_patient_event(serious)])
    hyper = page.locator('.safety-group[data-group="A"] tr[data-term="hyperglycaemia"]')
    await expect(hyper).to_have_class("serious-row", timeout=LIVE_TIMEOUT_MS)
    await expect(hyper.locator(".badge.sae")).to_have_text("SAE")
    await expect(page.locator('#evidence-table [data-field="[group=A].patients_with_significant_related_ae"]')).to_have_text("2")
    await expect(page.locator('.safety-group[data-group="A"] [data-field="serious"]')).to_have_text("2")
    assert await page.evaluate("window.__notReloaded") is True, "the page reloaded"


async def _locked(page: Any, expect: Any, base: str) -> None:
    """The lock picker: the whole page as of the lock taken before the live follow-up — A has one
    significant related AE there, two live — and back to live."""
    await page.set_viewport_size({"width": 1440, "height": 1000})
    await page.goto(base)
    picker = page.locator("#lock-picker")
    await expect(picker.locator('option[value="interim-2026"]')).to_have_count(1)
    await picker.select_option("interim-2026")
    await page.wait_for_url("**/?lock=interim-2026")
    await expect(page.locator("#lock-banner")).to_contain_text("Frozen analysis “interim-2026”")
    await expect(page.locator('#evidence-table [data-field="[group=A].patients_with_significant_related_ae"]')).to_have_text("1")
    await expect(page.locator(f'#patient-table a[href="/patients/{A1}?lock=interim-2026"]')).to_have_count(1)
    await expect(page.locator('#composite-chart .step-curve[data-group="A"] .point')).to_have_count(2)
    await page.screenshot(path=str(ARTIFACTS / "overview-locked.png"), full_page=True)
    await page.locator("#lock-picker").select_option("")
    await expect(page.locator('#evidence-table [data-field="[group=A].patients_with_significant_related_ae"]')).to_have_text("2")
    await expect(page.locator("#lock-banner")).to_be_hidden()


async def _small_screens(page: Any, expect: Any) -> None:
    """At 80 % zoom and at a phone's width the page does not scroll sideways (wide tables scroll in their box)."""
    await page.evaluate("document.documentElement.style.zoom = '0.8'")
    await page.screenshot(path=str(ARTIFACTS / "overview-evidence-80pct.png"), full_page=True)
    await page.evaluate("document.documentElement.style.zoom = ''")
    await page.set_viewport_size({"width": 390, "height": 844})
    await expect(page.locator("#composite-chart")).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await page.screenshot(path=str(ARTIFACTS / "overview-evidence-mobile.png"), full_page=True)
    await page.set_viewport_size({"width": 1440, "height": 1000})


async def _patient(page: Any, expect: Any, base: str) -> None:
    await page.goto(f"{base}/patients/{A1}")
    await expect(page.locator("#patient-heading")).to_contain_text(A1)
    summary = {field: text for field, text in {
        "baseline_upcr": "2.00", "post_upcr": "0.80", "upcr_change_pct": "−60 %", "complete_remission": "no",
        "partial_remission": "yes", "paired_biopsies": "yes", "decline_40_on": "2014-06-01", "decline_57_on": "none",
        "composite_endpoint": "confirmed ≥ 40 % eGFR decline", "composite_endpoint_days": f"day {A1_DECLINE_DAYS}",
        "adverse_events": "2", "highest_ae_grade": "grade 3", "any_serious_ae": "yes",
        "any_significant_related_ae": "yes",  # since the live follow-up made AE-1 serious
    }.items()}
    for field, text in summary.items():
        await expect(page.locator(f'#patient-summary [data-field="{field}"]')).to_have_text(text)

    urine = page.locator("#urine-table tbody tr[data-kind=urine_result]")
    await expect(urine).to_have_count(5)  # U1, U2, the U3 typo and its correction, the U4 preliminary
    states = await urine.evaluate_all("rows => rows.map(r => [r.dataset.resultId, r.dataset.state])")
    assert states == [["A1-U1", "counted"], ["A1-U2", "counted"], ["A1-U3", "superseded"], ["A1-U3", "corrected"],
                      ["A1-U4", "preliminary"]]
    timeline = page.locator("#timeline-chart")
    await expect(timeline.locator("[data-kind=urine_result]")).to_have_count(5)
    await expect(timeline.locator('[data-kind=urine_result][data-state="superseded"]')).to_have_count(1)
    await expect(timeline.locator('[data-kind=urine_result][data-state="preliminary"]')).to_have_count(1)

    aes = timeline.locator("[data-kind=adverse_event]")
    await expect(aes).to_have_count(2)  # one mark per AE, its follow-ups in it
    await expect(timeline.locator('[data-ae-id="AE-1"]')).to_have_attribute("data-reports", "3")
    await expect(timeline.locator('[data-ae-id="AE-1"]')).to_have_attribute("data-raw", "2")  # the follow-up's grade
    await expect(timeline.locator('[data-ae-id="AE-2"]')).to_have_attribute("data-serious", "true")
    await expect(timeline.locator('[data-ae-id="AE-2"]')).to_have_class("ae serious")

    table = page.locator("#ae-table")
    await expect(table.locator('tr[data-ae-id="AE-1"]')).to_have_count(3)
    reports = await table.locator('tr[data-ae-id="AE-1"]').evaluate_all(
        "rows => rows.map(r => [r.dataset.kind, r.dataset.current, r.children[2].textContent, r.children[3].textContent])")
    assert reports == [["adverse_event", "false", "1", "no"], ["adverse_event_follow_up", "false", "2", "no"],
                       ["adverse_event_follow_up", "true", "2", "yes"]]
    await expect(table.locator('tr[data-ae-id="AE-2"]')).to_have_class("serious-row")
    await expect(table.locator('tr[data-ae-id="AE-2"] .badge.sae')).to_have_text("SAE")
    await page.screenshot(path=str(ARTIFACTS / "patient-evidence.png"), full_page=True)

    await page.set_viewport_size({"width": 390, "height": 844})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await page.screenshot(path=str(ARTIFACTS / "patient-evidence-mobile.png"), full_page=True)
