// The overview's v2 charts: UPCR trajectories (one line per patient, from
// GET /v1/cohorts/{group}/upcr) and the kidney-endpoint step curves of GET /v1/cohorts/{group}/endpoints
// (composite-endpoint Kaplan–Meier, kidney-failure cumulative incidence with death competing).
// As in charts.js: an <svg role="img"> with <title> and <desc>, a <title> on every mark naming
// its value, endpoint and field, and a data table alternative.

import { GROUP_LABEL, h, linear, marker, round, s, table, value } from "./common.js";
import { atRiskRows, curveLabels, frame, legendItem, patientSeries, plotArea, xAxis, yAxis } from "./charts.js";

/** KDIGO proteinuria remission thresholds (g/g): complete below 0.3, partial below 1.0. */
export const UPCR_THRESHOLDS = [
  { upcr: 0.3, label: "0.3 g/g: complete remission below" },
  { upcr: 1.0, label: "1.0 g/g: partial remission below" },
];

function upcrSource(group) {
  return `GET /v1/cohorts/${group}/upcr`;
}

function upcrField(p, pt) {
  return `patients[subject_id=${p.subject_id}].points[result_id=${pt.result_id}].upcr`;
}

/** ``series``: the ``GET /v1/cohorts/{group}/upcr`` answers of the visible groups; ``keep(patient)``: the date filter. */
export function upcrChart(series, { keep = () => true, onOpen } = {}) {
  const W = 680, H = 430, M = { left: 62, right: 46, top: 14, bottom: 52 };
  const shown = series.map((t) => ({ ...t, patients: t.patients.filter(keep) }));
  const points = shown.flatMap((t) => t.patients.flatMap((p) => p.points));
  const years = [...points.map((p) => p.years), 0, 1];
  const highest = Math.max(1.2, ...points.map((p) => p.upcr));
  const x = linear([Math.floor(Math.min(...years) * 2) / 2, Math.ceil(Math.max(...years))], [M.left, W - M.right]);
  const y = linear([0, Math.ceil(highest * 1.05 * 2) / 2], [H - M.bottom, M.top]);
  const patientCount = shown.reduce((n, t) => n + t.patients.length, 0);
  const svg = frame("upcr-chart", W, H, "UPCR trajectories by group",
    `${patientCount} patients' counted urine protein/creatinine ratios (g/g) against years since treatment start, ` +
    `one line each, coloured by group, with the remission thresholds 0.3 and 1.0 g/g marked. ` +
    "The data table below the chart lists every point.");
  svg.append(yAxis(y, M.left, y.ticks(7), (t) => String(t), "UPCR (g/g)", W - M.right));
  svg.append(xAxis(x, H - M.bottom, x.ticks(10).filter(Number.isInteger), (t) => (t < 0 ? `−${-t}` : String(t)),
    "Years since treatment start"));
  for (const threshold of UPCR_THRESHOLDS) {
    svg.append(s("line", { class: "threshold", x1: M.left, x2: W - M.right, y1: y(threshold.upcr), y2: y(threshold.upcr) },
      s("title", {}, threshold.label)));
    svg.append(s("text", { class: "threshold-label", x: W - M.right - 4, y: y(threshold.upcr) - 4, "text-anchor": "end" },
      `${threshold.upcr} g/g`));
  }
  svg.append(s("line", { class: "start-line", x1: x(0), x2: x(0), y1: M.top, y2: H - M.bottom }));
  svg.append(s("text", { class: "start-label", x: x(0) + 4, y: M.top + 12 }, "treatment start"));

  const plot = plotArea(svg, M.left, M.top, W - M.right, H - M.bottom);
  for (const t of shown) {
    for (const p of t.patients) {
      const source = upcrSource(t.group);
      const coords = p.points.map((pt) => [x(pt.years), y(pt.upcr)]);
      const g = patientSeries(t.group, p.subject_id, coords, {
        source, field: `patients[subject_id=${p.subject_id}].points`, onOpen,
        title: `${p.subject_id} (${GROUP_LABEL[t.group]}), treatment start ${p.treatment_start}: ` +
          `${p.points.length} counted UPCRs — from ${source}. Click to open the patient.`,
      });
      p.points.forEach((pt, i) => {
        const [cx, cy] = coords[i];
        g.append(s("circle", {
          cx, cy, r: 2.8, class: `point group-${t.group}`, "data-result-id": pt.result_id,
          "data-source": source, "data-field": upcrField(p, pt), "data-raw": pt.upcr,
        }, s("title", {}, `${p.subject_id}, ${pt.collected_on} (${round(pt.years, 2)} y): UPCR ${round(pt.upcr, 2)} g/g` +
          `${pt.status === "corrected" ? ", corrected" : ""} — raw ${pt.upcr} from ${source} → ${upcrField(p, pt)}`)));
      });
      plot.append(g);
    }
  }
  return svg;
}

export function upcrLegend(groups) {
  return groups.map((group) => h("span", { class: "legend-item" }, legendItem(group, "patient"), `${GROUP_LABEL[group]} patients`));
}

export function upcrTable(series, keep = () => true) {
  const rows = series.flatMap((t) => t.patients.filter(keep).flatMap((p) => p.points.map((pt) => h("tr", {},
    h("td", {}, GROUP_LABEL[t.group]), h("td", {}, p.subject_id), h("td", {}, pt.collected_on),
    h("td", {}, round(pt.years, 2)),
    h("td", {}, value(round(pt.upcr, 2), { source: upcrSource(t.group), field: upcrField(p, pt), raw: pt.upcr })),
    h("td", {}, pt.status)))));
  return table("UPCR trajectories: every plotted point", ["Group", "Patient", "Collected", "Years since start", "UPCR (g/g)", "Status"],
    rows, { class: "numbers" });
}

// --- kidney endpoints ----------------------------------------------------------------------------

/** The two curves of ``GET /v1/cohorts/{group}/endpoints``: which key, where it starts, what it counts. */
export const ENDPOINT_CURVES = {
  composite: {
    key: "survival", start: 1, axis: "Free of the endpoint", events: "composite endpoints", nothing: "censored",
    title: "Composite kidney endpoint: Kaplan–Meier event-free survival by group",
  },
  kidney_failure: {
    key: "cumulative_incidence", start: 0, axis: "Cumulative incidence", events: "kidney failures",
    nothing: "censored or a competing death",
    title: "Kidney failure with death as a competing risk: Aalen–Johansen cumulative incidence by group",
  },
};

/** Patients at risk at ``years``: ``at_risk`` of the first listed time at or after it (every
 * event and censoring time is listed, so the risk set is constant in between); 0 after the last. */
export function atRiskAt(curve, years) {
  const i = curve.times.findIndex((t) => t >= years);
  return i < 0 ? { at_risk: 0, index: null } : { at_risk: curve.at_risk[i], index: i };
}

/** ``answers``: ``[{group, composite, kidney_failure}]`` (the endpoints answers of the visible groups). */
export function endpointChart(kind, answers) {
  const spec = ENDPOINT_CURVES[kind];
  const id = `${kind.replaceAll("_", "-")}-chart`;
  const curves = answers.map((a) => ({ group: a.group, ...a[kind] }));
  const W = 680, M = { left: 78, right: 24, top: 14 };
  const plotBottom = 300;
  const H = plotBottom + 64 + curves.length * 19;
  const maxTime = Math.max(1, ...curves.flatMap((c) => c.times));
  const lastYear = Math.ceil(maxTime);
  const yearStep = lastYear > 12 ? 2 : 1;
  const x = linear([0, lastYear], [M.left, W - M.right]);
  const y = linear([0, 1.04], [plotBottom, M.top]);
  const svg = frame(id, W, H, spec.title, curves.map((c) => (c.times.length
    ? `${GROUP_LABEL[c.group]}: ${c.at_risk[0]} at risk, ${c.events.reduce((a, b) => a + b, 0)} ${spec.events}, ` +
      `${round(100 * c[spec.key].at(-1), 0)} % at ${round(c.times.at(-1), 1)} years`
    : `${GROUP_LABEL[c.group]}: no patient at risk`)).join("; ") +
    ". Numbers at risk per year are printed below the time axis; the data table below lists every step.");
  const yearTicks = [];
  for (let t = 0; t <= lastYear; t += yearStep) yearTicks.push(t);
  svg.append(yAxis(y, M.left, [0, 0.25, 0.5, 0.75, 1], (t) => `${t * 100} %`, spec.axis, W - M.right));
  svg.append(xAxis(x, plotBottom, yearTicks, String, "Years since treatment start", 34));

  for (const c of curves) {
    const source = `GET /v1/cohorts/${c.group}/endpoints`;
    const g = s("g", { class: "step-curve", "data-group": c.group, "data-source": source, "data-field": kind },
      s("title", {}, `${GROUP_LABEL[c.group]}: ${spec.title.split(":")[0]} — from ${source} → ${kind}`));
    if (c.times.length) {
      let d = `M${x(0)},${y(spec.start)}`;
      c.times.forEach((t, i) => { d += `H${x(t).toFixed(1)}V${y(c[spec.key][i]).toFixed(1)}`; });
      g.append(s("path", { class: `line group-${c.group} dash-${c.group}`, d }));
    }
    c.times.forEach((t, i) => {
      const v = c[spec.key][i];
      const field = `${kind}.${spec.key}[${i}]`;
      const tip = s("title", {}, `${GROUP_LABEL[c.group]} at ${round(t, 2)} y: ${round(100 * v, 1)} %, at risk ${c.at_risk[i]}, ` +
        `${c.events[i] ? `${c.events[i]} ${spec.events}` : spec.nothing} — raw ${v} from ${source} → ${field}`);
      const attrs = { "data-source": source, "data-field": field, "data-raw": v, "data-index": i };
      if (c.events[i] > 0) {
        g.append(marker(c.group, x(t), y(v), 3.5, { class: `point group-${c.group}`, ...attrs }));
        g.lastChild.append(tip);
      } else {
        g.append(s("line", { class: `censor group-${c.group}`, x1: x(t), x2: x(t), y1: y(v) - 6, y2: y(v) + 6, ...attrs }, tip));
      }
    });
    svg.append(g);
  }
  svg.append(curveLabels(curves.filter((c) => c.times.length).map((c) => ({
    group: c.group, time: c.times.at(-1), value: c[spec.key].at(-1),
    source: `GET /v1/cohorts/${c.group}/endpoints`, field: `${kind}.${spec.key}[${c.times.length - 1}]`,
  })), x, y, W - M.right));
  svg.append(atRiskRows(curves.map((c) => ({ group: c.group, cells: yearTicks.map((year) => atRiskCell(c, year, kind)) })),
    x, plotBottom + 52));
  return svg;
}

function atRiskCell(curve, year, kind) {
  const { at_risk: n, index } = atRiskAt(curve, year);
  return {
    years: year, at_risk: n, source: `GET /v1/cohorts/${curve.group}/endpoints`,
    field: index === null ? `${kind}.times (none at or after ${year} y)` : `${kind}.at_risk[${index}]`,
  };
}

export function endpointTable(kind, answers) {
  const spec = ENDPOINT_CURVES[kind];
  const rows = answers.flatMap((a) => {
    const c = a[kind];
    const source = `GET /v1/cohorts/${a.group}/endpoints`;
    const cell = (key, i, text) => h("td", {}, value(text, { source, field: `${kind}.${key}[${i}]`, raw: c[key][i] }));
    return c.times.map((t, i) => h("tr", { "data-group": a.group },
      h("td", {}, GROUP_LABEL[a.group]), cell("times", i, round(t, 2)), cell(spec.key, i, `${round(100 * c[spec.key][i], 1)} %`),
      cell("at_risk", i, String(c.at_risk[i])), cell("events", i, String(c.events[i]))));
  });
  return table(`${spec.title}: every step`, ["Group", "Years", kind === "composite" ? "Event-free" : "Cumulative incidence",
    "At risk", kind === "composite" ? "Composite endpoints" : "Kidney failures"], rows, { class: "numbers" });
}
