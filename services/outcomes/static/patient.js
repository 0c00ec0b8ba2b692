// One patient's page (GET /patients/{subject_id}): outcome values, the timeline chart (eGFR and
// UPCR over time above lanes of pulse cycles, infusions, biopsies, adverse events and clinical
// events) and the same timeline as tables. Data: GET /v1/patients/{subject_id}, refetched when /v1/freshness moves.

import {
  ApiError, GROUP_LABEL, api, ckdStage, formatCells, h, linear, live, readQuery, round, s, table,
  value, wireLockPicker, wireToggles, writeQuery,
} from "./common.js";
import { ckdBands } from "./charts.js";
import {
  describeEvidence, drawAdverseEvents, drawUpcrPanel, evidenceSummary, renderAdverseEvents, renderUrine, upcrResults,
} from "./patient-evidence.js";

const subjectId = decodeURIComponent(window.location.pathname.split("/").filter(Boolean).pop() || "");
const endpoint = `/v1/patients/${encodeURIComponent(subjectId)}`;
const SOURCE = `GET ${endpoint}`;
const form = document.getElementById("filters");
const state = { patient: null, seen: null, fresh: new Set() };
const DAY = 86400000;

function traced(field, text, raw, label) {
  return value(text, { source: SOURCE, field, raw, label });
}

function day(iso) {
  return Date.parse(`${iso.slice(0, 10)}T00:00:00Z`);
}

// --- filters -------------------------------------------------------------------------------

function range() {
  return { from: form.elements.from.value, to: form.elements.to.value };
}

function inRange(iso) {
  const { from, to } = range();
  return (!from || iso >= from) && (!to || iso <= to);
}

// --- loading -------------------------------------------------------------------------------

async function load() {
  let patient;
  try {
    patient = (await api(endpoint)).data;
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      showError(`${error.detail || "Unknown patient"}. The page will show the patient as soon as the outcomes service knows them.`);
      return; // nothing more to fetch: the next freshness change tries again
    }
    throw error;
  }
  document.getElementById("patient-error").hidden = true;
  const ids = new Set(patient.timeline.filter((e) => e.kind === "egfr" || e.kind === "urine_result").map((e) => e.event_id));
  state.fresh = state.seen ? new Set([...ids].filter((id) => !state.seen.has(id))) : new Set();
  state.seen = ids;
  state.patient = patient;
  render();
}

function showError(message) {
  const box = document.getElementById("patient-error");
  box.textContent = message;
  box.hidden = false;
}

// --- rendering -----------------------------------------------------------------------------

function render() {
  const p = state.patient;
  if (!p) return;
  document.title = `${p.subject_id} — nephrotrack`;
  const heading = document.getElementById("patient-heading");
  heading.replaceChildren(`Patient ${p.subject_id} `, h("span", { class: `badge group-${p.group}` }, GROUP_LABEL[p.group] ?? p.group));
  renderSummary(p);
  const events = p.timeline.filter((e) => inRange(e.occurred_on));
  document.getElementById("timeline-chart-box").replaceChildren(timelineChart(p, events));
  renderCycles(events);
  renderInfusions(events);
  renderEgfr(events);
  renderUrine(events, evidenceContext());
  renderAdverseEvents(events, evidenceContext());
  renderClinical(events);
  renderAll(events);
}

function renderSummary(p) {
  const item = (label, ...content) => h("div", {}, h("dt", {}, label), h("dd", {}, ...content));
  const f = p.facts;
  document.getElementById("patient-summary").replaceChildren(
    item("Group", traced("group", GROUP_LABEL[p.group] ?? p.group, p.group, "group")),
    item("Sex, age at enrollment", traced("sex", p.sex, p.sex), ", ", traced("age_years", `${p.age_years} y`, p.age_years, "age at enrollment")),
    item("Enrolled", traced("enrolled_on", p.enrolled_on, p.enrolled_on)),
    item("Treatment start", traced("treatment_start", p.treatment_start ?? "—", p.treatment_start, "first pulse dose (control: enrollment)")),
    item("Lee grade", traced("facts.lee_grade", f.lee_grade ?? "—", f.lee_grade)),
    item("Baseline eGFR", traced("baseline_egfr", round(p.baseline_egfr, 1), p.baseline_egfr, "baseline eGFR"),
      h("span", { class: "unit" }, ` (${p.baseline_source ?? "—"}, ${p.baseline_egfr === null ? "" : ckdStage(p.baseline_egfr)})`)),
    item("Latest eGFR after treatment", traced("post_egfr", round(p.post_egfr, 1), p.post_egfr, "post-therapy eGFR"),
      p.post_egfr_on ? h("span", { class: "unit" }, ` on ${p.post_egfr_on}`) : null),
    item("Change", traced("egfr_change", round(p.egfr_change, 1, { signed: true }), p.egfr_change, "post − baseline"),
      " (", traced("egfr_change_pct", `${round(p.egfr_change_pct, 0, { signed: true })} %`, p.egfr_change_pct, "change in %"), ")"),
    item("Follow-up", traced("followup_years", `${round(p.followup_years, 2)} y`, p.followup_years, "follow-up years")),
    item("eGFR slope", traced("egfr_slope", `${round(p.egfr_slope, 2, { signed: true })} / y`, p.egfr_slope, "least-squares slope per year")),
    item("Kidney failure", p.kidney_failure
      ? h("span", { class: "deviation" }, traced("kidney_failure_on", p.kidney_failure_on, p.kidney_failure_on), " (",
        traced("kidney_failure_years", `${round(p.kidney_failure_years, 2)} y`, p.kidney_failure_years), ")")
      : traced("kidney_failure", "none", p.kidney_failure)),
    item("Pulse cycles · deviations", traced("pulse_cycles", String(p.pulse_cycles), p.pulse_cycles), " · ",
      traced("deviations", String(p.deviations), p.deviations)),
    item("Infusions · cells", traced("infusions", String(p.infusions), p.infusions), " · ",
      traced("cells_infused", formatCells(p.cells_infused), p.cells_infused)),
    item("Counted eGFRs · biopsies", traced("counted_egfr_n", String(p.counted_egfr_n), p.counted_egfr_n), " · ",
      traced("biopsies", String(p.biopsies), p.biopsies)),
    ...evidenceSummary(p, item, evidenceContext()),
  );
}

// --- the timeline chart ---------------------------------------------------------------------

function cyclesOf(events) {
  const cycles = new Map();
  for (const [index, e] of events.entries()) {
    if (e.kind !== "pulse_dose") continue;
    const c = cycles.get(e.detail.cycle) || { cycle: e.detail.cycle, doses: [], deviations: [] };
    c.doses.push({ ...e, index });
    cycles.set(e.detail.cycle, c);
  }
  for (const e of events) {
    if (e.kind === "protocol_deviation" && e.detail.cycle != null && cycles.has(e.detail.cycle)) cycles.get(e.detail.cycle).deviations.push(e);
  }
  return [...cycles.values()].sort((a, b) => a.cycle - b.cycle);
}

function field(e, key) {
  return `timeline[event_id=${e.event_id}].detail.${key}`;
}

function evidenceContext() {
  return { source: SOURCE, traced, field, fresh: state.fresh };
}

const LANES = [
  { key: "pulse", label: "MP pulses" },
  { key: "infusion", label: "Infusions" },
  { key: "biopsy", label: "Biopsies" },
  { key: "ae", label: "Adverse events" },
  { key: "clinical", label: "Clinical" },
];

function timelineChart(p, events) {
  const W = 980, M = { left: 112, right: 46, top: 14 };
  const egfrBottom = 250;
  const upcrs = upcrResults(events);
  const upcrTop = egfrBottom + 24, upcrBottom = upcrs.length ? upcrTop + 90 : egfrBottom;
  const laneTop = upcrBottom + 34, laneH = 26;
  const axisY = laneTop + LANES.length * laneH + 6;
  const H = axisY + 44;
  const egfrs = events.filter((e) => e.kind === "egfr");
  // a lab correction is dated when it was recorded, not when the sample was taken: it does not set the range
  const dates = events.filter((e) => e.kind !== "lab_correction").map((e) => day(e.occurred_on));
  if (!dates.length) dates.push(Date.now());
  const { from, to } = range();
  const start = from ? day(from) : Math.min(...dates, p.treatment_start ? day(p.treatment_start) : Infinity) - 45 * DAY;
  const end = to ? day(to) + DAY : Math.max(...dates) + 90 * DAY;
  const x = linear([start, Math.max(end, start + 30 * DAY)], [M.left, W - M.right]);
  const highest = Math.max(60, ...egfrs.map((e) => e.detail.egfr));
  const y = linear([0, Math.ceil((highest + 8) / 10) * 10], [egfrBottom, M.top]);

  const counted = egfrs.filter((e) => e.detail.effective && e.detail.counted);
  const svg = s("svg", { id: "timeline-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "timeline-title", "aria-describedby": "timeline-desc" },
    s("title", { id: "timeline-title" }, `Timeline of ${p.subject_id}`),
    s("desc", { id: "timeline-desc" }, `${counted.length} counted eGFR results with the CKD stages shaded, ` +
      `${cyclesOf(events).length} pulse cycles, ${events.filter((e) => e.kind === "infusion").length} cell infusions, ` +
      `${events.filter((e) => e.kind === "biopsy").length} biopsies, ` +
      `${upcrs.filter((e) => e.detail.effective && e.detail.counted).length} counted UPCR results, ` +
      `${new Set(events.filter((e) => e.kind === "adverse_event" || e.kind === "adverse_event_follow_up").map((e) => e.detail.ae_id)).size} adverse events` +
      `${p.kidney_failure ? `, kidney failure on ${p.kidney_failure_on}` : ""}. The tables below list every event.`));
  svg.append(s("defs", {}, s("clipPath", { id: "timeline-clip" },
    s("rect", { x: M.left, y: 0, width: W - M.left - M.right, height: H }))));
  svg.append(ckdBands(x, y, W - M.right + 6));

  // eGFR axis
  const yAxis = s("g", { class: "axis" });
  for (const t of y.ticks(6)) {
    yAxis.append(s("line", { class: "grid", x1: M.left, x2: W - M.right, y1: y(t), y2: y(t) }));
    yAxis.append(s("text", { x: M.left - 8, y: y(t) + 4, "text-anchor": "end" }, String(t)));
  }
  yAxis.append(s("line", { x1: M.left, x2: M.left, y1: M.top, y2: egfrBottom }));
  yAxis.append(s("text", { class: "axis-title", transform: `translate(${M.left - 44},${(M.top + egfrBottom) / 2}) rotate(-90)`, "text-anchor": "middle" }, "eGFR (mL/min/1.73 m²)"));
  svg.append(yAxis);

  // lanes
  LANES.forEach((lane, i) => {
    const ly = laneTop + i * laneH;
    svg.append(s("rect", { class: "lane-bg", x: M.left, y: ly + 2, width: W - M.left - M.right, height: laneH - 4 }));
    svg.append(s("text", { class: "lane-label", x: M.left - 8, y: ly + laneH / 2 + 4, "text-anchor": "end" }, lane.label));
  });

  // time axis: years (or quarters on a short range)
  const axis = s("g", { class: "axis" });
  axis.append(s("line", { x1: M.left, x2: W - M.right, y1: axisY, y2: axisY }));
  const first = new Date(x.domain[0]);
  const spanYears = (x.domain[1] - x.domain[0]) / (365.25 * DAY);
  const monthStep = spanYears > 12 ? 24 : spanYears > 3 ? 12 : spanYears > 1 ? 3 : 1;
  for (let d = new Date(Date.UTC(first.getUTCFullYear(), 0, 1)); d.getTime() <= x.domain[1]; d = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + monthStep, 1))) {
    if (d.getTime() < x.domain[0]) continue;
    const tx = x(d.getTime());
    axis.append(s("line", { class: "grid", x1: tx, x2: tx, y1: M.top, y2: axisY }));
    axis.append(s("text", { x: tx, y: axisY + 17, "text-anchor": "middle" },
      monthStep >= 12 ? String(d.getUTCFullYear()) : d.toISOString().slice(0, 7)));
  }
  svg.append(axis);

  const laneY = (key) => laneTop + LANES.findIndex((l) => l.key === key) * laneH + laneH / 2;

  const plot = s("g", { "clip-path": "url(#timeline-clip)" });
  svg.append(plot);

  if (p.treatment_start) {
    const sx = x(day(p.treatment_start));
    plot.append(s("line", { class: "start-line", x1: sx, x2: sx, y1: M.top, y2: axisY },
      s("title", {}, `treatment start ${p.treatment_start} — from ${SOURCE} → treatment_start`)));
    plot.append(s("text", { class: "start-label", x: sx + 4, y: M.top + 12 }, "treatment start"));
  }

  // eGFR: line through the counted, effective values; markers for every version
  const ordered = [...counted].sort((a, b) => a.occurred_on.localeCompare(b.occurred_on));
  plot.append(s("path", { class: "egfr-line", d: ordered.map((e, i) => `${i ? "L" : "M"}${x(day(e.occurred_on)).toFixed(1)},${y(e.detail.egfr).toFixed(1)}`).join("") }));
  for (const e of egfrs) {
    const d = e.detail;
    const cx = x(day(e.occurred_on)), cy = y(d.egfr);
    const kind = !d.effective ? "superseded" : !d.counted ? "preliminary" : d.status === "corrected" ? "corrected" : "counted";
    const tip = s("title", {}, `${e.occurred_on}: eGFR ${round(d.egfr, 1)} (${kind}, ${d.status}` +
      `${d.derived_from === "creatinine" ? `, from creatinine ${round(d.creatinine_mg_dl, 2)} mg/dL` : ""}) — raw ${d.egfr} from ${SOURCE} → ${field(e, "egfr")}`);
    const common = { "data-kind": "egfr", "data-result-id": d.result_id, "data-event-id": e.event_id, "data-state": kind,
      "data-source": SOURCE, "data-field": field(e, "egfr"), "data-raw": d.egfr };
    if (kind === "superseded") {
      plot.append(s("path", { class: "superseded", d: `M${cx - 4},${cy - 4}L${cx + 4},${cy + 4}M${cx - 4},${cy + 4}L${cx + 4},${cy - 4}`, ...common }, tip));
      continue;
    }
    plot.append(s("circle", { class: `egfr-point ${kind === "preliminary" ? "preliminary" : ""}${state.fresh.has(e.event_id) ? " new-point" : ""}`, cx, cy, r: 4, ...common }, tip));
    if (kind === "corrected") plot.append(s("circle", { class: "corrected-ring", cx, cy, r: 8 }, s("title", {}, `corrected value of ${d.result_id}`)));
  }

  // pulse cycles
  for (const c of cyclesOf(events)) {
    const days = c.doses.map((dose) => day(dose.detail.given_on));
    const x0 = x(Math.min(...days)), x1 = x(Math.max(...days) + DAY);
    const ly = laneY("pulse");
    const doses = c.doses.map((dose) => `day ${dose.detail.day} ${dose.detail.given_on}: ${round(dose.detail.dose_mg, 0)} mg (${round(dose.detail.mg_per_kg, 1)} mg/kg)`).join("; ");
    plot.append(s("rect", {
      class: `cycle${c.deviations.length ? " has-deviation" : ""}`, x: x0, y: ly - 7, width: Math.max(x1 - x0, 3), height: 14,
      "data-kind": "pulse_cycle", "data-cycle": c.cycle, "data-source": SOURCE, "data-field": `timeline[kind=pulse_dose, detail.cycle=${c.cycle}]`,
    }, s("title", {}, `Pulse cycle ${c.cycle}: ${doses}${c.deviations.length ? `. Deviations: ${c.deviations.map((d) => d.detail.detail).join("; ")}` : ""} — from ${SOURCE}`)));
  }
  for (const e of events.filter((ev) => ev.kind === "protocol_deviation")) {
    const dx = x(day(e.occurred_on));
    const ly = e.detail.cycle != null ? laneY("pulse") - 11 : laneY("clinical");
    plot.append(s("path", { class: "deviation-mark", d: `M${dx},${ly + 5}L${dx + 5},${ly - 4}L${dx - 5},${ly - 4}Z`, "data-kind": "protocol_deviation" },
      s("title", {}, `${e.occurred_on} protocol deviation ${e.detail.code}: ${e.detail.detail} — from ${SOURCE} → ${field(e, "detail")}`)));
  }
  // infusions
  for (const e of events.filter((ev) => ev.kind === "infusion")) {
    const ix = x(day(e.occurred_on)), ly = laneY("infusion");
    plot.append(s("path", { class: "infusion", d: `M${ix},${ly - 8}L${ix + 7},${ly}L${ix},${ly + 8}L${ix - 7},${ly}Z`,
      "data-kind": "infusion", "data-source": SOURCE, "data-field": field(e, "cell_count"), "data-raw": e.detail.cell_count },
    s("title", {}, `${e.occurred_on} infusion ${e.detail.infusion_number ?? ""}: ${formatCells(e.detail.cell_count)} cells from lot ${e.detail.lot_id} — from ${SOURCE} → ${field(e, "cell_count")}`)));
  }
  if (upcrs.length) drawUpcrPanel(svg, plot, upcrs, { x, top: upcrTop, bottom: upcrBottom, left: M.left, right: W - M.right, day }, evidenceContext());
  drawAdverseEvents(plot, events, { x, laneY: laneY("ae"), end: x.domain[1], day }, evidenceContext());
  // biopsies
  for (const e of events.filter((ev) => ev.kind === "biopsy")) {
    plot.append(s("circle", { class: "biopsy", cx: x(day(e.occurred_on)), cy: laneY("biopsy"), r: 6, "data-kind": "biopsy" },
      s("title", {}, `${e.occurred_on} biopsy${e.detail.lee_grade ? `, Lee grade ${e.detail.lee_grade}` : ""} — from ${SOURCE}`)));
  }
  // kidney failure, death, withdrawal
  const labels = { dialysis_started: "dialysis", kidney_transplant: "transplant", death: "death", withdrawn: "withdrawn" };
  for (const e of events.filter((ev) => ev.kind in labels)) {
    const fx = x(day(e.occurred_on)), ly = laneY("clinical");
    const failure = e.kind === "dialysis_started" || e.kind === "kidney_transplant";
    if (failure) plot.append(s("line", { class: "failure-line", x1: fx, x2: fx, y1: M.top, y2: ly }));
    plot.append(s("rect", { class: "failure-mark", x: fx - 5, y: ly - 5, width: 10, height: 10, "data-kind": e.kind },
      s("title", {}, `${e.occurred_on}: ${labels[e.kind]} — from ${SOURCE} → timeline[event_id=${e.event_id}]`)));
    const nearEnd = fx > W - M.right - 70;
    plot.append(s("text", { class: "failure-label", x: nearEnd ? fx - 8 : fx + 8, "text-anchor": nearEnd ? "end" : "start",
      y: failure ? M.top + 26 : ly + 4 }, labels[e.kind]));
  }
  return svg;
}

// --- the timeline as tables -------------------------------------------------------------------

function renderCycles(events) {
  const rows = cyclesOf(events).map((c) => {
    const first = c.doses[0].detail;
    const dates = c.doses.map((d) => d.detail.given_on).sort();
    return h("tr", { "data-cycle": c.cycle },
      h("th", { scope: "row" }, `Cycle ${c.cycle}`),
      h("td", {}, `${dates[0]} – ${dates.at(-1)}`),
      h("td", {}, traced(`timeline[kind=pulse_dose, cycle=${c.cycle}].count`, String(c.doses.length), c.doses.length, "doses")),
      h("td", {}, ...c.doses.flatMap((d, i) => [i ? " · " : "", traced(field(d, "dose_mg"), round(d.detail.dose_mg, 0), d.detail.dose_mg, `day ${d.detail.day} dose, mg`)])),
      h("td", {}, ...c.doses.flatMap((d, i) => [i ? " · " : "", traced(field(d, "mg_per_kg"), round(d.detail.mg_per_kg, 1), d.detail.mg_per_kg, `day ${d.detail.day}, mg/kg`)])),
      h("td", {}, traced(field(c.doses[0], "weight_kg"), round(first.weight_kg, 1), first.weight_kg, "weight, kg")),
      h("td", {}, c.deviations.length
        ? h("span", { class: "deviation" }, c.deviations.map((d) => `${d.detail.code}: ${d.detail.detail}`).join("; "))
        : "none"),
    );
  });
  document.getElementById("cycles-table").replaceWith(
    table(null, ["Cycle", "Days", "Doses", "Dose per day (mg)", "mg/kg per day", "Weight (kg)", "Deviations"], rows,
      { id: "cycles-table", class: "numbers", "aria-labelledby": "cycles-heading" }));
}

function renderInfusions(events) {
  const rows = events.filter((e) => e.kind === "infusion").map((e) => h("tr", { "data-kind": "infusion" },
    h("th", { scope: "row" }, `Infusion ${e.detail.infusion_number ?? ""}`),
    h("td", {}, e.occurred_on),
    h("td", {}, h("code", {}, e.detail.lot_id)),
    h("td", {}, traced(field(e, "cell_count"), formatCells(e.detail.cell_count), e.detail.cell_count, "cells infused")),
  ));
  document.getElementById("infusions-table").replaceWith(
    table("Each infusion is an autologous lot from its own adipose-tissue harvest; the lot id names it. " +
      "(Harvest dates are not part of the outcomes projection.)", ["Infusion", "Given on", "Lot", "Cells"], rows,
    { id: "infusions-table", class: "numbers", "aria-labelledby": "infusions-heading" }));
}

function renderEgfr(events) {
  const corrections = new Map(events.filter((e) => e.kind === "lab_correction").map((e) => [e.detail.result_id, e]));
  const rows = events.filter((e) => e.kind === "egfr").map((e) => {
    const d = e.detail;
    const note = !d.effective ? "superseded by a correction" : !d.counted ? "not counted (preliminary)" : d.status === "corrected" ? "corrected" : "";
    const correction = corrections.get(d.result_id);
    return h("tr", { "data-kind": "egfr", "data-result-id": d.result_id, "data-state": note || "counted", class: state.fresh.has(e.event_id) ? "flash" : null },
      h("th", { scope: "row" }, e.occurred_on),
      h("td", {}, traced(field(e, "egfr"), round(d.egfr, 1), d.egfr, "eGFR")),
      h("td", {}, d.effective && d.egfr != null ? ckdStage(d.egfr) : "—"),
      h("td", {}, d.status),
      h("td", {}, d.derived_from === "creatinine"
        ? h("span", {}, "creatinine ", traced(field(e, "creatinine_mg_dl"), `${round(d.creatinine_mg_dl, 2)} mg/dL`, d.creatinine_mg_dl, "creatinine"), ` (${d.equation ?? "CKD-EPI"}, age ${d.age_years ?? "—"})`)
        : "reported eGFR"),
      h("td", {}, h("code", {}, d.result_id)),
      h("td", {}, note ? h("span", { class: d.effective && d.counted ? "" : "muted" }, note) : "counted",
        correction && d.effective ? h("span", { class: "muted" }, ` (was ${round(correction.detail.previous_value, 2)})`) : null),
    );
  });
  document.getElementById("egfr-table").replaceWith(
    table("Every eGFR version the labs service reported; the effective version of each result id counts unless preliminary.",
      ["Collected", "eGFR", "CKD stage", "Status", "From", "Result id", "Counted"], rows,
      { id: "egfr-table", class: "numbers", "aria-labelledby": "egfr-heading" }));
}

const CLINICAL = {
  enrolled: "Enrolled", biopsy: "Biopsy", protocol_deviation: "Protocol deviation", dialysis_started: "Dialysis started",
  kidney_transplant: "Kidney transplant", death: "Death", withdrawn: "Withdrawn", lab_correction: "Lab result corrected",
};

function describe(e) {
  const d = e.detail;
  switch (e.kind) {
    case "enrolled": return `group ${d.group}, ${d.sex}, ${d.age_years} y, baseline eGFR ${d.baseline_egfr}, Lee grade ${d.lee_grade ?? "—"}`;
    case "pulse_dose": return `cycle ${d.cycle} day ${d.day}: ${d.dose_mg} mg (${round(d.mg_per_kg, 1)} mg/kg)`;
    case "infusion": return `infusion ${d.infusion_number ?? ""}: ${formatCells(d.cell_count)} cells, lot ${d.lot_id}`;
    case "egfr": return `eGFR ${round(d.egfr, 1)} (${d.status}${d.effective ? "" : ", superseded"}${d.counted ? "" : ", not counted"}), result ${d.result_id}`;
    case "lab_correction": return `result ${d.result_id}: ${d.previous_value} → ${d.new_value} ${d.canonical_unit ?? ""}`;
    case "protocol_deviation": return `${d.code}: ${d.detail}`;
    case "biopsy": return Object.entries(d).filter(([k, v]) => v !== null && k !== "performed_on").map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`).join(", ") || "recorded";
    case "urine_result": case "adverse_event": case "adverse_event_follow_up": return describeEvidence(e);
    default: return Object.entries(d).filter(([, v]) => v !== null).map(([k, v]) => `${k} ${v}`).join(", ");
  }
}

function renderClinical(events) {
  const rows = events.filter((e) => e.kind in CLINICAL).map((e) => h("tr", { "data-kind": e.kind },
    h("th", { scope: "row" }, e.occurred_on),
    h("td", {}, h("span", { class: e.kind === "dialysis_started" || e.kind === "kidney_transplant" || e.kind === "protocol_deviation" ? "deviation" : "" }, CLINICAL[e.kind])),
    h("td", {}, describe(e)),
    h("td", {}, e.source),
  ));
  document.getElementById("clinical-table").replaceWith(
    table(null, ["Date", "Event", "Detail", "Source service"], rows, { id: "clinical-table", "aria-labelledby": "clinical-heading" }));
}

function renderAll(events) {
  const rows = events.map((e) => h("tr", { "data-kind": e.kind, "data-event-id": e.event_id },
    h("th", { scope: "row" }, e.occurred_on), h("td", {}, e.kind.replaceAll("_", " ")), h("td", {}, describe(e)),
    h("td", {}, e.source), h("td", { class: "muted" }, e.recorded_at.slice(0, 19).replace("T", " "))));
  document.getElementById("events-table").replaceWith(
    table(`${events.length} events from ${SOURCE} → timeline`, ["Date", "Kind", "Detail", "Source service", "Recorded (UTC)"], rows, { id: "events-table" }));
}

// --- start ---------------------------------------------------------------------------------

const query = readQuery();
form.elements.from.value = query.get("from") || "";
form.elements.to.value = query.get("to") || "";
form.addEventListener("change", () => {
  const params = new URLSearchParams();
  const { from, to } = range();
  if (from) params.set("from", from);
  if (to) params.set("to", to);
  writeQuery(params);
  render();
});
form.addEventListener("reset", () => setTimeout(() => { writeQuery(new URLSearchParams()); render(); }, 0));
form.addEventListener("submit", (event) => event.preventDefault());
document.getElementById("patient-heading").textContent = `Patient ${subjectId}`;
wireToggles();
wireLockPicker();
live(load);
