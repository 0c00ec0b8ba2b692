// The patient page's v2 evidence: the v2 outcome values, the UPCR panel and the adverse-event
// lane of the timeline chart, and the urine-result and adverse-event tables. Data: the
// patient's GET /v1/patients/{id} (values and timeline kinds urine_result, adverse_event,
// adverse_event_follow_up). ``ctx`` is the page's ``{ source, traced, field, fresh }``.

import { h, round, s, table } from "./common.js";
import { UPCR_THRESHOLDS } from "./evidence-charts.js";

const ANALYTES = { upcr: "UPCR", protein_24h: "24-hour urine protein", uacr: "UACR" };
const INTERVENTIONS = { mp_pulse: "MP pulse", cell_infusion: "cell infusion", fat_harvest: "fat harvest" };
const ENDPOINTS = { decline_40: "confirmed ≥ 40 % eGFR decline", kidney_failure: "kidney failure", death: "death" };
const AE_KINDS = new Set(["adverse_event", "adverse_event_follow_up"]);
/** Outcomes of an AE still going on (drawn open to the end of the range when no resolution date). */
const ONGOING = new Set(["recovering", "not_recovered", "unknown"]);

function yesNo(v) {
  return v === null || v === undefined ? "—" : v ? "yes" : "no";
}

/** A lab value's state: superseded by a later version, preliminary (not counted), corrected or counted. */
export function labState(d) {
  return !d.effective ? "superseded" : !d.counted ? "preliminary" : d.status === "corrected" ? "corrected" : "counted";
}

// --- outcome values ----------------------------------------------------------------------------

/** The v2 items of the summary; ``item(label, ...content)`` builds one. */
export function evidenceSummary(p, item, { traced }) {
  const changes = [["deposits_cleared", "deposits cleared"], ["iga_cleared", "IgA cleared"],
    ["proliferation_resolved", "proliferation resolved"], ["foot_process_improved", "foot processes improved"],
    ["lee_grade_improved", "Lee grade improved"]].filter(([key]) => p[key]);
  return [
    item("UPCR before → after", traced("baseline_upcr", round(p.baseline_upcr, 2), p.baseline_upcr, "baseline UPCR, g/g"),
      h("span", { class: "arrow", "aria-hidden": "true" }, " → "), h("span", { class: "visually-hidden" }, " to "),
      traced("post_upcr", round(p.post_upcr, 2), p.post_upcr, "post-therapy UPCR, g/g"), h("span", { class: "unit" }, " g/g "),
      "(", traced("upcr_change_pct", `${round(p.upcr_change_pct, 0, { signed: true })} %`, p.upcr_change_pct, "UPCR change in %"), ")"),
    item("Remission complete · partial", traced("complete_remission", yesNo(p.complete_remission), p.complete_remission,
      "complete remission: post UPCR < 0.3 g/g"), " · ", traced("partial_remission", yesNo(p.partial_remission), p.partial_remission,
      "partial remission: not complete, post UPCR < 1.0 g/g and ≤ 50 % of baseline")),
    item("Paired biopsies", traced("paired_biopsies", yesNo(p.paired_biopsies), p.paired_biopsies, "diagnostic and follow-up biopsy"),
      p.paired_biopsies ? h("span", { class: "unit" }, `: ${changes.map(([, label]) => label).join(", ") || "no change"}`) : null),
    item("Confirmed eGFR decline 40 % · 57 %", traced("decline_40_on", p.decline_40_on ?? "none", p.decline_40_on, "confirmed ≥ 40 % decline on"),
      " · ", traced("decline_57_on", p.decline_57_on ?? "none", p.decline_57_on, "confirmed ≥ 57 % decline on")),
    item("Composite kidney endpoint", p.composite_endpoint
      ? h("span", { class: "deviation" }, traced("composite_endpoint", ENDPOINTS[p.composite_endpoint] ?? p.composite_endpoint, p.composite_endpoint))
      : traced("composite_endpoint", "censored", p.composite_endpoint, "no endpoint: censored at the latest counted eGFR"),
    " at ", traced("composite_endpoint_days", `day ${p.composite_endpoint_days ?? "—"}`, p.composite_endpoint_days, "days from treatment start"),
    " (", traced("composite_endpoint_years", `${round(p.composite_endpoint_years, 2)} y`, p.composite_endpoint_years, "years from treatment start"), ")"),
    item("Kidney failure, death competing", traced("kidney_failure_competing", p.kidney_failure_competing ?? "censored",
      p.kidney_failure_competing), " at ", traced("kidney_failure_competing_days", `day ${p.kidney_failure_competing_days ?? "—"}`,
      p.kidney_failure_competing_days, "days from treatment start")),
    item("Adverse events · highest grade", traced("adverse_events", String(p.adverse_events), p.adverse_events, "adverse events"),
      " · ", traced("highest_ae_grade", p.highest_ae_grade === null ? "—" : `grade ${p.highest_ae_grade}`, p.highest_ae_grade, "highest CTCAE grade")),
    item("Serious · significant related AE",
      h("span", { class: p.any_serious_ae ? "deviation" : "" }, traced("any_serious_ae", yesNo(p.any_serious_ae), p.any_serious_ae, "any serious AE")),
      " · ", h("span", { class: p.any_significant_related_ae ? "deviation" : "" },
        traced("any_significant_related_ae", yesNo(p.any_significant_related_ae), p.any_significant_related_ae,
          "any treatment-related AE of grade ≥ 3 or serious"))),
  ];
}

// --- the timeline chart ------------------------------------------------------------------------

export function upcrResults(events) {
  return events.filter((e) => e.kind === "urine_result" && e.detail.analyte === "upcr");
}

/** The UPCR panel between ``top`` and ``bottom``: counted values joined, preliminary hollow,
 * superseded crossed, the remission thresholds dotted. Appends the axis to ``svg``, the marks to ``plot``. */
export function drawUpcrPanel(svg, plot, results, { x, top, bottom, left, right, day }, ctx) {
  // scaled to the values that count or may count: a superseded typo (8.0 for 0.8) would flatten them
  const highest = Math.max(1.2, ...results.filter((e) => e.detail.effective).map((e) => e.detail.value));
  const ceiling = Math.ceil(highest * 1.05 * 2) / 2;
  const y = (v) => bottom - (Math.min(v, ceiling) / ceiling) * (bottom - top);
  const axis = s("g", { class: "axis" });
  for (const t of [0, ceiling / 2, ceiling]) {
    axis.append(s("line", { class: "grid", x1: left, x2: right, y1: y(t), y2: y(t) }));
    axis.append(s("text", { x: left - 8, y: y(t) + 4, "text-anchor": "end" }, String(Number(t.toFixed(2)))));
  }
  axis.append(s("line", { x1: left, x2: left, y1: top, y2: bottom }));
  axis.append(s("text", { class: "axis-title", transform: `translate(${left - 44},${(top + bottom) / 2}) rotate(-90)`, "text-anchor": "middle" }, "UPCR g/g"));
  for (const threshold of UPCR_THRESHOLDS.filter((t) => t.upcr <= ceiling)) {
    axis.append(s("line", { class: "threshold", x1: left, x2: right, y1: y(threshold.upcr), y2: y(threshold.upcr) }, s("title", {}, threshold.label)));
  }
  svg.append(axis);
  const counted = results.filter((e) => e.detail.effective && e.detail.counted).sort((a, b) => a.occurred_on.localeCompare(b.occurred_on));
  plot.append(s("path", { class: "upcr-line", d: counted.map((e, i) => `${i ? "L" : "M"}${x(day(e.occurred_on)).toFixed(1)},${y(e.detail.value).toFixed(1)}`).join("") }));
  for (const e of results) {
    const d = e.detail;
    const cx = x(day(e.occurred_on)), cy = y(d.value);
    const kind = labState(d);
    const common = { "data-kind": "urine_result", "data-result-id": d.result_id, "data-event-id": e.event_id, "data-state": kind,
      "data-source": ctx.source, "data-field": ctx.field(e, "value"), "data-raw": d.value };
    const tip = s("title", {}, `${e.occurred_on}: UPCR ${round(d.value, 2)} g/g (${kind}, ${d.status}` +
      `${d.value > ceiling ? ", above the scale: drawn at its top" : ""}) — raw ${d.value} from ${ctx.source} → ${ctx.field(e, "value")}`);
    if (kind === "superseded") {
      plot.append(s("path", { class: "superseded", d: `M${cx - 4},${cy - 4}L${cx + 4},${cy + 4}M${cx - 4},${cy + 4}L${cx + 4},${cy - 4}`, ...common }, tip));
    } else {
      plot.append(s("circle", { class: `upcr-point${kind === "preliminary" ? " preliminary" : ""}${ctx.fresh.has(e.event_id) ? " new-point" : ""}`, cx, cy, r: 4, ...common }, tip));
    }
  }
}

/** Each adverse event's reports in order (first report, then follow-ups); the current one last. */
export function adverseEvents(events) {
  const byId = new Map();
  for (const e of events.filter((ev) => AE_KINDS.has(ev.kind))) {
    if (!byId.has(e.detail.ae_id)) byId.set(e.detail.ae_id, []);
    byId.get(e.detail.ae_id).push(e);
  }
  return [...byId.values()].map((reports) => {
    const ordered = [...reports].sort((a, b) => a.detail.report_version - b.detail.report_version);
    return { ae_id: ordered[0].detail.ae_id, reports: ordered, current: ordered.find((r) => r.detail.effective) ?? ordered.at(-1) };
  }).sort((a, b) => a.current.detail.onset_on.localeCompare(b.current.detail.onset_on) || a.ae_id.localeCompare(b.ae_id));
}

function relatedness(d) {
  return d.related_to.length ? `${d.related_to.map((r) => INTERVENTIONS[r] ?? r).join(", ")} (${d.causality})` : `none named (${d.causality})`;
}

/** The adverse-event lane at ``laneY``: a mark at onset labelled with the grade, a bar to the
 * resolution date (dashed to the end while still going on), serious ones red and outlined. */
export function drawAdverseEvents(plot, events, { x, laneY, end, day }, ctx) {
  for (const ae of adverseEvents(events)) {
    const d = ae.current.detail;
    const ax = x(day(d.onset_on));
    const serious = d.serious ? " serious" : "";
    if (d.resolved_on || ONGOING.has(d.outcome)) {
      const toX = d.resolved_on ? x(day(d.resolved_on)) : x(end);
      plot.append(s("line", { class: `ae-span${serious}`, x1: ax, x2: Math.max(toX, ax + 2), y1: laneY, y2: laneY,
        "stroke-dasharray": d.resolved_on ? null : "5 3" }));
    }
    const tip = s("title", {}, `${d.onset_on}: ${d.term}, grade ${d.grade}${d.serious ? ", SERIOUS" : ""}, related: ${relatedness(d)}, ` +
      `outcome ${d.outcome}${d.resolved_on ? `, resolved ${d.resolved_on}` : ""}; ${ae.reports.length} report${ae.reports.length > 1 ? "s" : ""} ` +
      `(${ae.reports.length - 1} follow-up${ae.reports.length === 2 ? "" : "s"}) — from ${ctx.source} → ${ctx.field(ae.current, "grade")}`);
    plot.append(s("rect", { class: `ae${serious}`, x: ax - 6, y: laneY - 6, width: 12, height: 12, transform: `rotate(45 ${ax} ${laneY})`,
      "data-kind": "adverse_event", "data-ae-id": ae.ae_id, "data-reports": ae.reports.length, "data-serious": String(d.serious),
      "data-source": ctx.source, "data-field": ctx.field(ae.current, "grade"), "data-raw": d.grade }, tip));
    plot.append(s("text", { class: "ae-label", x: ax + 9, y: laneY - 4 }, `G${d.grade}${d.serious ? " SAE" : ""}`));
  }
}

// --- tables --------------------------------------------------------------------------------------

export function renderUrine(events, { traced, field, fresh }) {
  const corrections = new Map(events.filter((e) => e.kind === "lab_correction").map((e) => [e.detail.result_id, e]));
  const rows = events.filter((e) => e.kind === "urine_result").map((e) => {
    const d = e.detail;
    const kind = labState(d);
    const note = { superseded: "superseded by a correction", preliminary: "not counted (preliminary)", corrected: "corrected", counted: "counted" }[kind];
    const correction = corrections.get(d.result_id);
    return h("tr", { "data-kind": "urine_result", "data-result-id": d.result_id, "data-state": kind, class: fresh.has(e.event_id) ? "flash" : null },
      h("th", { scope: "row" }, e.occurred_on),
      h("td", {}, ANALYTES[d.analyte] ?? d.analyte),
      h("td", {}, traced(field(e, "value"), round(d.value, d.unit === "mg/g" ? 1 : 2), d.value, `${ANALYTES[d.analyte] ?? d.analyte}, ${d.unit}`),
        h("span", { class: "unit" }, ` ${d.unit}`)),
      h("td", {}, d.status), h("td", {}, h("code", {}, d.loinc)), h("td", {}, h("code", {}, d.result_id)),
      h("td", {}, h("span", { class: kind === "superseded" || kind === "preliminary" ? "muted" : "" }, note),
        correction && d.effective ? h("span", { class: "muted" }, ` (was ${round(correction.detail.previous_value, 2)})`) : null),
    );
  });
  document.getElementById("urine-table").replaceWith(
    table("Every urine protein result version (UPCR in g/g, 24-hour protein in g/day, UACR in mg/g); the effective version of " +
      "each result id counts unless preliminary.", ["Collected", "Analyte", "Value", "Status", "LOINC", "Result id", "Counted"], rows,
    { id: "urine-table", class: "numbers", "aria-labelledby": "urine-heading" }));
}

export function renderAdverseEvents(events, { traced, field }) {
  const rows = adverseEvents(events).flatMap((ae) => ae.reports.map((r, i) => {
    const d = r.detail;
    const current = r === ae.current;
    const cls = [d.serious ? "serious-row" : "", current ? "" : "earlier-report"].filter(Boolean).join(" ") || null;
    return h("tr", { "data-kind": r.kind, "data-ae-id": d.ae_id, "data-current": String(current), class: cls },
      h("th", { scope: "row" }, i ? h("span", { class: "muted" }, `↳ follow-up ${i}`) : h("span", {}, d.term,
        d.serious ? h("span", { class: "badge sae" }, "SAE") : null)),
      h("td", {}, d.onset_on),
      h("td", {}, traced(field(r, "grade"), String(d.grade), d.grade, "CTCAE v5 grade")),
      h("td", {}, traced(field(r, "serious"), yesNo(d.serious), d.serious, "serious")),
      h("td", {}, relatedness(d)),
      h("td", {}, d.outcome.replaceAll("_", " "), d.resolved_on ? ` ${d.resolved_on}` : ""),
      h("td", {}, current ? "current report" : h("span", { class: "muted" }, "replaced by a later report")),
    );
  }));
  document.getElementById("ae-table").replaceWith(
    table("Each adverse event with its reports: the first, then each follow-up; the latest report is the event's state. " +
      "Serious adverse events are marked SAE.", ["Adverse event", "Onset", "Grade", "Serious", "Related to (causality)", "Outcome", "Report"],
    rows, { id: "ae-table", class: "numbers", "aria-labelledby": "ae-heading" }));
}

/** One line for the all-events table. */
export function describeEvidence(e) {
  const d = e.detail;
  if (e.kind === "urine_result") {
    return `${ANALYTES[d.analyte] ?? d.analyte} ${d.value} ${d.unit} (${d.status}${d.effective ? "" : ", superseded"}${d.counted ? "" : ", not counted"}), result ${d.result_id}`;
  }
  return `${d.ae_id} ${d.term}: grade ${d.grade}${d.serious ? ", serious" : ""}, related: ${relatedness(d)}, ${d.outcome.replaceAll("_", " ")}` +
    `${d.effective ? "" : " (replaced by a later report)"}`;
}
