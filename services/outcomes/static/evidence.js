// The overview's v2 tables: proteinuria, kidney endpoints and safety per group (GET /v1/cohorts
// v2 keys), the safety table of each group (GET /v1/cohorts/{group}/safety), the paired
// biopsies before → after (GET /v1/cohorts/{group}/biopsies and the patients' timelines) and
// the mixed-model eGFR slopes with their 95 % CI (GET /v1/cohorts/{group}/slopes).

import { GROUP_LABEL, atLock, h, linear, replaceWithKeepingFocus, round, s, table, value } from "./common.js";

const COHORTS = "GET /v1/cohorts";

function plural(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function groupHeader(group) {
  return h("th", { scope: "row" }, h("span", { class: `group-label group-${group}` },
    h("span", { class: `swatch swatch-${group}`, "aria-hidden": "true" }), " ", GROUP_LABEL[group] ?? group));
}

function cohortValue(row, field, text, label) {
  return value(text, { source: COHORTS, field: `[group=${row.group}].${field}`, raw: row[field], label });
}

function ofN(row, field, label) {
  return h("span", {}, cohortValue(row, field, String(row[field]), label), h("span", { class: "muted" }, ` of ${row.n}`));
}

// --- proteinuria, endpoints and safety counts (the cohort rows) ---------------------------------

export function renderEvidenceCohorts(rows, anyGroup) {
  const body = document.querySelector("#evidence-table tbody");
  if (!rows.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 7 }, anyGroup ? "No group selected." : "No patients enrolled yet.")));
    return;
  }
  body.replaceChildren(...rows.map((row) => h("tr", { "data-group": row.group },
    groupHeader(row.group),
    h("td", {},
      cohortValue(row, "mean_baseline_upcr", round(row.mean_baseline_upcr, 2), "mean baseline UPCR, g/g"),
      h("span", { class: "arrow", "aria-hidden": "true" }, " → "), h("span", { class: "visually-hidden" }, " to "),
      cohortValue(row, "mean_post_upcr", round(row.mean_post_upcr, 2), "mean post-therapy UPCR, g/g")),
    h("td", {}, ofN(row, "complete_remission_count", "complete remissions (post UPCR < 0.3 g/g)"), " · ",
      ofN(row, "partial_remission_count", "partial remissions (< 1.0 g/g and ≤ 50 % of baseline)")),
    h("td", {}, ofN(row, "decline_40_count", "patients with a confirmed ≥ 40 % eGFR decline")),
    h("td", {}, ofN(row, "composite_endpoint_count", "patients reaching the composite kidney endpoint")),
    h("td", {}, ofN(row, "patients_with_ae", "patients with an adverse event"), " · ",
      h("span", { class: row.patients_with_serious_ae ? "serious-count" : "" },
        cohortValue(row, "patients_with_serious_ae", String(row.patients_with_serious_ae), "patients with a serious adverse event"))),
    h("td", {}, h("span", { class: row.patients_with_significant_related_ae ? "serious-count" : "" },
      cohortValue(row, "patients_with_significant_related_ae", String(row.patients_with_significant_related_ae),
        "patients with a treatment-related AE of grade ≥ 3 or serious"))),
  )));
}

// --- safety ------------------------------------------------------------------------------------

const INTERVENTIONS = { mp_pulse: "MP pulse", cell_infusion: "cell infusion", fat_harvest: "fat harvest" };

/** ``answers``: ``[{group, ...safety}]``; ``rows``: the cohort rows of the same groups. */
export function renderSafety(answers, rows) {
  const box = document.getElementById("safety-groups");
  if (!answers.length) {
    box.replaceChildren(h("p", {}, "No group selected."));
    return;
  }
  box.replaceChildren(...answers.map((a) => safetyGroup(a, rows.find((r) => r.group === a.group))));
}

function safetyGroup(a, row) {
  const source = `GET /v1/cohorts/${a.group}/safety`;
  const v = (field, label, raw = a[field]) => value(String(raw), { source, field, raw, label });
  const headingId = `safety-heading-${a.group}`;
  const counts = row ? h("p", { class: "safety-counts" },
    "Patients with an adverse event: ", ofN(row, "patients_with_ae", "patients with an AE"),
    " · with a serious AE: ", h("span", { class: row.patients_with_serious_ae ? "serious-count" : "" },
      cohortValue(row, "patients_with_serious_ae", String(row.patients_with_serious_ae), "patients with a serious AE")),
    " · with a significant treatment-related AE: ", h("span", { class: row.patients_with_significant_related_ae ? "serious-count" : "" },
      cohortValue(row, "patients_with_significant_related_ae", String(row.patients_with_significant_related_ae),
        "patients with a related AE of grade ≥ 3 or serious"))) : null;
  const totals = h("p", { class: "safety-counts" },
    v("events", "adverse events"), a.events === 1 ? " adverse event · " : " adverse events · ", h("span", { class: a.serious ? "serious-count" : "" }, v("serious", "serious AEs")),
    " serious · ", v("related", "treatment-related AEs"), " treatment-related (",
    ...Object.entries(INTERVENTIONS).flatMap(([key, label], i) => [i ? ", " : "", `${label} `,
      v(`related_by_intervention.${key}`, `related AEs naming the ${label}`, a.related_by_intervention[key])]),
    ") · ", v("significant_related", "related AEs of grade ≥ 3 or serious"), " significant and related");
  const grades = table(null, ["CTCAE grade", "1", "2", "3", "4", "5"], [h("tr", {},
    h("th", { scope: "row" }, "Adverse events"),
    ...["1", "2", "3", "4", "5"].map((g) => h("td", { class: g >= "3" && a.by_grade[g] ? "grade-high" : "" },
      v(`by_grade.${g}`, `AEs of grade ${g}`, a.by_grade[g]))))], { class: "numbers grade-table" });
  const terms = table(`${GROUP_LABEL[a.group]}: adverse events by term (each AE's latest report). Serious AEs are marked SAE. Source: ${source}.`,
    ["Term", "AEs", "Patients", "Highest grade", "Serious", "Treatment-related", "Significant and related"],
    a.by_term.map((t) => {
      const field = (key) => `by_term[term=${t.term}].${key}`;
      const cell = (key, label) => value(String(t[key]), { source, field: field(key), raw: t[key], label });
      return h("tr", { "data-term": t.term, class: t.serious ? "serious-row" : null },
        h("th", { scope: "row" }, t.term, t.serious ? h("span", { class: "badge sae" }, "SAE") : null),
        h("td", {}, cell("events", "AEs")), h("td", {}, cell("patients", "patients")),
        h("td", {}, cell("max_grade", "highest CTCAE grade")), h("td", {}, cell("serious", "serious AEs")),
        h("td", {}, cell("related", "treatment-related AEs")), h("td", {}, cell("significant_related", "related AEs of grade ≥ 3 or serious")));
    }), { class: "numbers safety-terms", "data-group": a.group });
  return h("section", { class: "safety-group", "data-group": a.group, "aria-labelledby": headingId },
    h("h3", { id: headingId }, h("span", { class: `group-label group-${a.group}` }, GROUP_LABEL[a.group] ?? a.group),
      h("span", { class: "muted" }, ` · ${plural(a.patients, "patient")}`)),
    counts, totals, h("div", { class: "table-wrap" }, grades), h("div", { class: "table-wrap" }, terms));
}

// --- paired biopsies -----------------------------------------------------------------------------

const BIOPSY_CHANGES = [
  ["deposits_cleared", "Mesangial deposits cleared"],
  ["iga_cleared", "IgA cleared"],
  ["proliferation_resolved", "Proliferation resolved"],
  ["foot_process_improved", "Foot processes improved"],
  ["lee_grade_improved", "Lee grade improved"],
];

/** ``answers``: ``[{group, paired, deposits_cleared, …}]``; ``patients``: the patient answers. */
export function renderBiopsies(answers, patients) {
  const rows = answers.map((a) => {
    const source = `GET /v1/cohorts/${a.group}/biopsies`;
    const v = (key, label) => value(String(a[key]), { source, field: key, raw: a[key], label });
    return h("tr", { "data-group": a.group }, groupHeader(a.group), h("td", {}, v("paired", "patients with paired biopsies")),
      ...BIOPSY_CHANGES.map(([key, label]) => h("td", {}, v(key, label), h("span", { class: "muted" }, ` of ${a.paired}`))));
  });
  replaceWithKeepingFocus(document.getElementById("biopsy-summary"), table(
    "Patients with a diagnostic biopsy (on or before treatment start) and a follow-up biopsy (after it), and among them " +
    "those with each change. Source: GET /v1/cohorts/{group}/biopsies.",
    ["Group", "Paired", ...BIOPSY_CHANGES.map(([, label]) => label)], rows, { id: "biopsy-summary", class: "numbers" }));

  const paired = patients.filter((p) => p.paired_biopsies && answers.some((a) => a.group === p.group));
  replaceWithKeepingFocus(document.getElementById("biopsy-pairs"), table(
    "Each paired patient's diagnostic and follow-up findings, and the changes the API counts. Source: GET /v1/patients/{id}.",
    ["Patient", "Group", "Diagnostic biopsy", "Follow-up biopsy", "Changes"], paired.map(biopsyPair),
    { id: "biopsy-pairs", class: "biopsy-pairs" }));
}

/** The biopsies the contract pairs: the latest on or before treatment start, the latest after it. */
function diagnosticAndFollowUp(p) {
  const biopsies = p.timeline.filter((e) => e.kind === "biopsy").sort((a, b) => a.occurred_on.localeCompare(b.occurred_on));
  return [biopsies.filter((e) => e.occurred_on <= p.treatment_start).at(-1), biopsies.filter((e) => e.occurred_on > p.treatment_start).at(-1)];
}

/** The findings of one biopsy, in words. */
export function findings(detail) {
  const yesNo = (v) => (v === null || v === undefined ? "—" : v ? "present" : "absent");
  return [
    ["Mesangial deposits", yesNo(detail.mesangial_deposits)],
    ["IgA immunofluorescence", detail.iga_immunofluorescence ?? "—"],
    ["Mesangial proliferation", yesNo(detail.mesangial_proliferation)],
    ["Foot process effacement", yesNo(detail.foot_process_effacement)],
    ["Lee grade", detail.lee_grade ?? "—"],
  ];
}

function findingList(e, source) {
  if (!e) return "—";
  return h("div", {}, h("strong", {}, e.occurred_on),
    h("ul", { class: "findings" }, findings(e.detail).map(([label, text]) => h("li", {}, `${label}: `,
      value(text, { source, field: `timeline[event_id=${e.event_id}].detail`, raw: text, label })))));
}

function biopsyPair(p) {
  const source = `GET /v1/patients/${p.subject_id}`;
  const [before, after] = diagnosticAndFollowUp(p);
  const changes = BIOPSY_CHANGES.map(([key, label]) => h("li", { class: p[key] ? "improved" : "" },
    `${label}: `, value(p[key] === null ? "—" : p[key] ? "yes" : "no", { source, field: key, raw: p[key], label })));
  return h("tr", { "data-subject": p.subject_id, "data-group": p.group },
    h("th", { scope: "row" }, h("a", { href: atLock(`/patients/${encodeURIComponent(p.subject_id)}`) }, p.subject_id)),
    h("td", {}, h("span", { class: `group-label group-${p.group}` }, GROUP_LABEL[p.group] ?? p.group)),
    h("td", {}, findingList(before, source)), h("td", {}, findingList(after, source)),
    h("td", {}, h("ul", { class: "findings" }, changes)));
}

// --- slopes --------------------------------------------------------------------------------------

const WINDOWS = [["total", "Total"], ["chronic", "Chronic (day 91 on)"]];

/** ``answers``: ``[{group, total, chronic}]`` from the slopes endpoint. A forest plot column
 * draws every fitted slope with its interval on one scale. */
export function renderSlopes(answers) {
  const fits = answers.flatMap((a) => WINDOWS.map(([key]) => a[key]).filter((f) => f.slope !== null));
  const ends = fits.flatMap((f) => [f.ci_low, f.ci_high, f.slope]);
  const span = Math.max(1, ...ends.map(Math.abs));
  const scale = linear([-span, span], [6, 194]);
  const rows = answers.flatMap((a) => WINDOWS.map(([key, label]) => {
    const fit = a[key];
    const source = `GET /v1/cohorts/${a.group}/slopes`;
    const v = (field, text, name) => value(text, { source, field: `${key}.${field}`, raw: fit[field], label: name });
    const fitted = fit.slope !== null;
    return h("tr", { "data-group": a.group, "data-window": key },
      h("th", { scope: "row" }, h("span", { class: `group-label group-${a.group}` }, GROUP_LABEL[a.group] ?? a.group)),
      h("td", {}, label),
      h("td", {}, fitted ? v("slope", round(fit.slope, 2, { signed: true }), "fixed-effect slope per year") : "not fitted"),
      h("td", {}, fitted
        ? h("span", {}, v("ci_low", round(fit.ci_low, 2, { signed: true }), "95 % CI, lower"), " to ",
          v("ci_high", round(fit.ci_high, 2, { signed: true }), "95 % CI, upper"))
        : h("span", { class: "not-fitted" }, v("reason", fit.reason ?? "—", "why the model could not be fitted"))),
      h("td", {}, v("patients", String(fit.patients), "patients"), " / ", v("measurements", String(fit.measurements), "counted eGFRs")),
      h("td", { class: "forest-cell" }, fitted ? forestMark(a.group, fit, scale) : ""));
  }));
  replaceWithKeepingFocus(document.getElementById("slopes-table"), table(
    "eGFR slope (mL/min/1.73 m² per year) as the fixed effect of a linear mixed model (random intercept and slope per patient, " +
    "REML), with its 95 % confidence interval. Source: GET /v1/cohorts/{group}/slopes.",
    ["Group", "Window", "Slope / year", "95 % CI", "Patients / eGFRs", `Interval (−${round(span, 1)} to +${round(span, 1)}, 0 dashed)`],
    rows, { id: "slopes-table", class: "numbers" }));
}

function forestMark(group, fit, scale) {
  return s("svg", { class: "forest", viewBox: "0 0 200 20", role: "img", "aria-label":
    `slope ${round(fit.slope, 2)}, 95 % CI ${round(fit.ci_low, 2)} to ${round(fit.ci_high, 2)}` },
  s("line", { class: "forest-zero", x1: scale(0), x2: scale(0), y1: 1, y2: 19 }),
  s("line", { class: `forest-ci group-${group}`, x1: scale(fit.ci_low), x2: scale(fit.ci_high), y1: 10, y2: 10 }),
  s("rect", { class: `group-${group}`, x: scale(fit.slope) - 4, y: 6, width: 8, height: 8 }));
}
