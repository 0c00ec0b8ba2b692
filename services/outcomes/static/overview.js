// The cohort overview page (GET /): cohort table and the v2 evidence table, eGFR and UPCR
// trajectories, Kaplan–Meier survival, the kidney-endpoint curves, slopes, safety, paired
// biopsies, patient list, filters and downloads. Data: GET /v1/cohorts, /v1/cohorts/{group}/egfr,
// /survival, /endpoints, /slopes, /safety, /biopsies, /v1/export/patients.csv and each patient's
// GET /v1/patients/{id} (UPCR and biopsies), refetched when /v1/freshness moves.

import {
  ApiError, GROUP_LABEL, GROUPS, api, apiText, atLock, authenticatedDownloads, csvNumber, h, live, parseCsv, readQuery,
  replaceKeepingFocus, round, value, wireLockPicker, wireToggles, writeQuery,
} from "./common.js";
import {
  survivalChart, survivalLegend, survivalTable, trajectoryChart, trajectoryLegend, trajectoryTable,
} from "./charts.js";
import {
  endpointChart, endpointTable, upcrChart, upcrLegend, upcrTable,
} from "./evidence-charts.js";
import { renderBiopsies, renderEvidenceCohorts, renderSafety, renderSlopes } from "./evidence.js";

const state = {
  cohorts: [], trajectories: [], survival: [], patients: [], seen: null, fresh: new Set(),
  endpoints: [], slopes: [], safety: [], biopsies: [], details: [], upcr: [], evidence: false,
};
const form = document.getElementById("filters");

// --- filters -------------------------------------------------------------------------------

function filters() {
  const groups = [...form.querySelectorAll("input[name=group]:checked")].map((input) => input.value);
  return { groups, from: form.elements.from.value, to: form.elements.to.value };
}

function restoreFilters() {
  const query = readQuery();
  if (query.has("groups")) {
    const wanted = new Set(query.get("groups").split(",").filter(Boolean));
    for (const input of form.querySelectorAll("input[name=group]")) input.checked = wanted.has(input.value);
  }
  form.elements.from.value = query.get("from") || "";
  form.elements.to.value = query.get("to") || "";
}

function saveFilters() {
  const { groups, from, to } = filters();
  const query = new URLSearchParams();
  if (groups.length !== GROUPS.length) query.set("groups", groups.join(","));
  if (from) query.set("from", from);
  if (to) query.set("to", to);
  writeQuery(query);
}

function startedInRange(treatmentStart) {
  const { from, to } = filters();
  if (!from && !to) return true;
  if (!treatmentStart) return false;
  return (!from || treatmentStart >= from) && (!to || treatmentStart <= to);
}

// --- loading -------------------------------------------------------------------------------

/** Each group's answer of ``/v1/cohorts/{group}/{route}``, with its group. */
function perGroup(groups, route) {
  return Promise.all(groups.map(async (group) => ({ group, ...(await api(`/v1/cohorts/${encodeURIComponent(group)}/${route}`)).data })));
}

/** ``GET /v1/patients/{id}`` of the listed patients with paired biopsies (their findings before
 * → after); a patient erased since the list was read is left out. */
function patientDetails(patients) {
  return Promise.all(patients.map(async (p) => {
    try {
      return (await api(`/v1/patients/${encodeURIComponent(p.subject_id)}`)).data;
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) return null;
      throw error;
    }
  })).then((details) => details.filter(Boolean));
}

/** The v1 sections first, then the evidence: a mixed-model fit or a patient's timeline per
 * patient must not hold back the cohort table. Until the evidence has arrived once, its
 * sections say "Loading…"; afterwards they show the last answers until the new ones are in. */
async function load() {
  const cohorts = (await api("/v1/cohorts")).data;
  const groups = cohorts.map((row) => row.group);
  const [trajectories, survival, csv] = await Promise.all([
    Promise.all(groups.map(async (g) => (await api(`/v1/cohorts/${encodeURIComponent(g)}/egfr`)).data)),
    Promise.all(groups.map(async (g) => (await api(`/v1/cohorts/${encodeURIComponent(g)}/survival`)).data)),
    apiText("/v1/export/patients.csv"),
  ]);
  const patients = parseCsv(csv.data);
  const ids = new Set(trajectories.flatMap((t) => t.patients.flatMap((p) => p.points.map((pt) => pt.result_id))));
  state.fresh = state.seen ? new Set([...ids].filter((id) => !state.seen.has(id))) : new Set();
  state.seen = ids;
  Object.assign(state, { cohorts, trajectories, survival, patients });
  render();

  const [endpoints, slopes, safety, biopsies, upcr, details] = await Promise.all([
    perGroup(groups, "endpoints"), perGroup(groups, "slopes"), perGroup(groups, "safety"), perGroup(groups, "biopsies"),
    perGroup(groups, "upcr"), patientDetails(patients.filter((p) => p.paired_biopsies === "true")),
  ]);
  Object.assign(state, { endpoints, slopes, safety, biopsies, details, upcr, evidence: true });
  render();
}

// --- rendering -----------------------------------------------------------------------------

function render() {
  const { groups } = filters();
  const visible = (group) => groups.includes(group);
  const rows = state.cohorts.filter((row) => visible(row.group));
  renderCohorts(rows);
  renderEvidenceCohorts(rows, state.cohorts.length > 0);
  renderTrajectories(state.trajectories.filter((t) => visible(t.group)));
  renderSurvival(state.survival.filter((c) => visible(c.group)));
  if (state.evidence) renderEvidence(visible, rows);
  renderPatients(state.patients.filter((p) => visible(p.group) && startedInRange(p.treatment_start)));
  const { from, to } = filters();
  document.getElementById("filter-note").classList.toggle("deviation", Boolean(from || to));
}

function cohortCell(row, field, text, label) {
  return value(text, { source: "GET /v1/cohorts", field: `[group=${row.group}].${field}`, raw: row[field], label });
}

function renderCohorts(rows) {
  const body = document.querySelector("#cohort-table tbody");
  if (!rows.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 8 }, state.cohorts.length ? "No group selected." : "No patients enrolled yet.")));
    return;
  }
  body.replaceChildren(...rows.map((row) => h("tr", { "data-group": row.group },
    h("th", { scope: "row" }, h("span", { class: `group-label group-${row.group}` },
      h("span", { class: `swatch swatch-${row.group}`, "aria-hidden": "true" }), " ", GROUP_LABEL[row.group] ?? row.group)),
    h("td", {}, cohortCell(row, "n", String(row.n), "patients")),
    h("td", {}, cohortCell(row, "mean_age", round(row.mean_age, 0), "mean age")),
    h("td", {},
      cohortCell(row, "mean_baseline_egfr", round(row.mean_baseline_egfr, 0), "mean baseline eGFR"),
      h("span", { class: "arrow", "aria-hidden": "true" }, " → "), h("span", { class: "visually-hidden" }, " to "),
      cohortCell(row, "mean_post_egfr", round(row.mean_post_egfr, 0), "mean post-therapy eGFR")),
    h("td", {},
      cohortCell(row, "mean_egfr_change", round(row.mean_egfr_change, 0, { signed: true }), "mean eGFR change"),
      " (", cohortCell(row, "mean_egfr_change_pct", `${round(row.mean_egfr_change_pct, 0, { signed: true })} %`, "mean change in %"), ")"),
    h("td", {}, cohortCell(row, "mean_followup_years", round(row.mean_followup_years, 1), "mean follow-up, years")),
    h("td", {}, cohortCell(row, "mean_egfr_slope", round(row.mean_egfr_slope, 1, { signed: true }), "mean eGFR slope per year")),
    h("td", {}, cohortCell(row, "kidney_failure_count", String(row.kidney_failure_count), "patients with kidney failure"),
      h("span", { class: "muted" }, ` of ${row.n}`)),
  )));
}

function openPatient(subjectId) {
  window.location.href = atLock(`/patients/${encodeURIComponent(subjectId)}`);
}

function renderTrajectories(trajectories) {
  const box = document.getElementById("trajectory-chart-box");
  const keep = (p) => startedInRange(p.treatment_start);
  if (!trajectories.length) {
    box.replaceChildren(h("p", {}, state.trajectories.length ? "No group selected." : "No eGFR results yet."));
  } else {
    box.replaceChildren(trajectoryChart(trajectories, { keep, fresh: state.fresh, onOpen: openPatient }));
  }
  document.getElementById("trajectory-legend").replaceChildren(...trajectoryLegend(trajectories.map((t) => t.group)));
  document.getElementById("trajectory-table").replaceChildren(trajectoryTable(trajectories, keep));
}

function renderEvidence(visible, rows) {
  renderUpcr(state.upcr.filter((t) => visible(t.group)));
  const endpoints = state.endpoints.filter((a) => visible(a.group));
  renderEndpoint("composite", "composite", endpoints);
  renderEndpoint("kidney_failure", "incidence", endpoints);
  renderSlopes(state.slopes.filter((a) => visible(a.group)));
  renderSafety(state.safety.filter((a) => visible(a.group)), rows);
  renderBiopsies(state.biopsies.filter((a) => visible(a.group)), state.details);
}

function renderUpcr(series) {
  const box = document.getElementById("upcr-chart-box");
  const keep = (p) => startedInRange(p.treatment_start);
  const any = series.some((t) => t.patients.some(keep));
  box.replaceChildren(any ? upcrChart(series, { keep, onOpen: openPatient })
    : h("p", {}, series.length ? "No counted UPCR results yet." : "No group selected."));
  document.getElementById("upcr-legend").replaceChildren(...upcrLegend(series.map((t) => t.group)));
  document.getElementById("upcr-table").replaceChildren(upcrTable(series, keep));
}

/** ``kind``: the key in the endpoints answer; ``id``: the figure's element ids. */
function renderEndpoint(kind, id, answers) {
  const box = document.getElementById(`${id}-chart-box`);
  box.replaceChildren(answers.length ? endpointChart(kind, answers) : h("p", {}, "No group selected."));
  document.getElementById(`${id}-legend`).replaceChildren(...survivalLegend(answers.map((a) => a.group)));
  document.getElementById(`${id}-table`).replaceChildren(endpointTable(kind, answers));
}

function renderSurvival(curves) {
  const box = document.getElementById("survival-chart-box");
  box.replaceChildren(curves.length ? survivalChart(curves) : h("p", {}, "No patients at risk yet."));
  document.getElementById("survival-legend").replaceChildren(...survivalLegend(curves.map((c) => c.group)));
  document.getElementById("survival-table").replaceChildren(survivalTable(curves));
}

function renderPatients(patients) {
  const body = document.querySelector("#patient-table tbody");
  const source = "GET /v1/export/patients.csv";
  const cell = (p, column, text, label) => value(text, {
    source, field: `row[subject_id=${p.subject_id}].${column}`, raw: p[column] === "" ? null : p[column], label,
  });
  if (!patients.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 9 }, state.patients.length ? "No patient matches the filters." : "No patients yet.")));
    return;
  }
  replaceKeepingFocus(body, ...patients.map((p) => {
    const failed = p.kidney_failure === "true";
    return h("tr", { "data-subject": p.subject_id, "data-group": p.group },
      h("th", { scope: "row" }, h("a", { href: atLock(`/patients/${encodeURIComponent(p.subject_id)}`), class: "patient-link" }, p.subject_id)),
      h("td", {}, h("span", { class: `group-label group-${p.group}` }, GROUP_LABEL[p.group] ?? p.group)),
      h("td", {}, cell(p, "treatment_start", p.treatment_start || "—", "treatment start")),
      h("td", {}, cell(p, "age_years", p.age_years, "age at enrollment")),
      h("td", {}, cell(p, "baseline_egfr", round(csvNumber(p.baseline_egfr), 1), "baseline eGFR"),
        p.baseline_source ? h("span", { class: "muted" }, ` (${p.baseline_source})`) : null),
      h("td", {}, cell(p, "post_egfr", round(csvNumber(p.post_egfr), 1), "latest counted eGFR after treatment start"),
        p.post_egfr_on ? h("span", { class: "muted" }, ` on ${p.post_egfr_on}`) : null),
      h("td", {}, cell(p, "followup_years", round(csvNumber(p.followup_years), 1), "follow-up, years")),
      h("td", {}, cell(p, "egfr_slope", round(csvNumber(p.egfr_slope), 2, { signed: true }), "eGFR slope per year")),
      h("td", {}, failed
        ? h("span", { class: "deviation" }, "yes, ", cell(p, "kidney_failure_years", `${round(csvNumber(p.kidney_failure_years), 2)} y`, "years to kidney failure"))
        : cell(p, "kidney_failure", "no", "kidney failure")),
    );
  }));
}

// --- start ---------------------------------------------------------------------------------

restoreFilters();
wireToggles();
wireLockPicker();
authenticatedDownloads([document.getElementById("download-csv"), document.getElementById("download-parquet")]);
form.addEventListener("change", () => { saveFilters(); render(); });
form.addEventListener("reset", () => setTimeout(() => { saveFilters(); render(); }, 0));
form.addEventListener("submit", (event) => event.preventDefault());
live(load);
