// The overview's SVG charts: eGFR trajectories and Kaplan–Meier survival. Each chart is an
// <svg role="img"> with <title> and <desc>; every mark carries a <title> naming its value and
// the endpoint and field it came from, and a data table alternative is built next to it.

import { CKD_BANDS, GROUP_LABEL, h, linear, marker, round, s, table, value } from "./common.js";

let chartIds = 0;

export function frame(id, width, height, titleText, descText) {
  const n = ++chartIds;
  return s("svg", {
    id, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-labelledby": `${id}-title-${n}`, "aria-describedby": `${id}-desc-${n}`,
    preserveAspectRatio: "xMidYMid meet",
  },
  s("title", { id: `${id}-title-${n}` }, titleText),
  s("desc", { id: `${id}-desc-${n}` }, descText));
}

/** A group clipped to the plot's rectangle, appended to ``svg``: lines never cross the axes. */
export function plotArea(svg, left, top, right, bottom) {
  const clipId = `clip-${++chartIds}`;
  svg.append(s("defs", {}, s("clipPath", { id: clipId }, s("rect", { x: left, y: top, width: right - left, height: bottom - top }))));
  const plot = s("g", { "clip-path": `url(#${clipId})` });
  svg.append(plot);
  return plot;
}

export function xAxis(x, y0, ticks, format, titleText, height) {
  const g = s("g", { class: "axis axis-x" });
  g.append(s("line", { x1: x.range[0], x2: x.range[1], y1: y0, y2: y0 }));
  for (const t of ticks) {
    g.append(s("line", { x1: x(t), x2: x(t), y1: y0, y2: y0 + 5 }));
    g.append(s("text", { x: x(t), y: y0 + 18, "text-anchor": "middle" }, format(t)));
  }
  if (titleText) {
    g.append(s("text", { class: "axis-title", x: (x.range[0] + x.range[1]) / 2, y: y0 + (height || 38), "text-anchor": "middle" }, titleText));
  }
  return g;
}

export function yAxis(y, x0, ticks, format, titleText, gridTo) {
  const g = s("g", { class: "axis axis-y" });
  for (const t of ticks) {
    if (gridTo !== undefined) g.append(s("line", { class: "grid", x1: x0, x2: gridTo, y1: y(t), y2: y(t) }));
    g.append(s("line", { x1: x0 - 5, x2: x0, y1: y(t), y2: y(t) }));
    g.append(s("text", { x: x0 - 8, y: y(t) + 4, "text-anchor": "end" }, format(t)));
  }
  g.append(s("line", { x1: x0, x2: x0, y1: y.range[0], y2: y.range[1] }));
  if (titleText) {
    const cy = (y.range[0] + y.range[1]) / 2;
    g.append(s("text", { class: "axis-title", transform: `translate(${x0 - 42},${cy}) rotate(-90)`, "text-anchor": "middle" }, titleText));
  }
  return g;
}

/** The CKD G-stage bands between y(0) and the top of the plot, labelled at the right. */
export function ckdBands(x, y, labelX) {
  const g = s("g", { class: "ckd-bands" });
  const top = y.domain[1];
  for (const band of CKD_BANDS) {
    const from = Math.max(band.from, y.domain[0]);
    const to = Math.min(band.to, top);
    if (to <= from) continue;
    g.append(s("rect", {
      class: `band band-${band.stage}`, x: x.range[0], width: x.range[1] - x.range[0],
      y: y(to), height: y(from) - y(to),
    }, s("title", {}, `CKD stage ${band.label} mL/min/1.73 m²`)));
    if (y(from) - y(to) >= 12) {
      g.append(s("text", { class: "band-label", x: labelX, y: (y(from) + y(to)) / 2 + 4 }, band.stage));
    }
  }
  return g;
}

export function linePath(points) {
  return points.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
}

export function legendItem(group, kind) {
  const icon = s("svg", { viewBox: "0 0 36 16", "aria-hidden": "true", focusable: "false" });
  if (kind === "mean") {
    icon.append(s("path", { d: "M2,8H34", class: `legend-line group-${group} dash-${group}`, "stroke-width": 3.5 }));
    icon.append(marker(group, 18, 8, 3.5, { class: `group-${group}` }));
  } else if (kind === "km") {
    icon.append(s("path", { d: "M2,4H16V12H34", class: `legend-line group-${group} dash-${group}`, "stroke-width": 2.6 }));
  } else {
    icon.append(s("path", { d: "M2,12L18,6L34,9", class: `legend-line group-${group} dash-${group}`, "stroke-width": 1.5, "stroke-opacity": 0.7 }));
  }
  return icon;
}

/** One patient's line through ``coords``, with a wider invisible path to click; the caller adds the points. */
export function patientSeries(group, subjectId, coords, { source, field, title, onOpen }) {
  const g = s("g", {
    class: "series series-patient", "data-group": group, "data-subject": subjectId, "data-source": source, "data-field": field,
  }, s("title", {}, title));
  g.append(s("path", { class: `line group-${group} dash-${group}`, d: linePath(coords) }));
  g.append(s("path", { class: "hit", d: linePath(coords) }));
  if (onOpen) g.addEventListener("click", () => onOpen(subjectId));
  return g;
}

// --- eGFR trajectories ---------------------------------------------------------------------

/**
 * ``trajectories``: the ``GET /v1/cohorts/{group}/egfr`` answers of the visible groups;
 * ``keep(patient)``: the date filter; ``fresh``: result ids to highlight as just arrived.
 */
export function trajectoryChart(trajectories, { keep = () => true, fresh = new Set(), onOpen } = {}) {
  const W = 680, H = 430, M = { left: 62, right: 46, top: 14, bottom: 52 };
  const shown = trajectories.map((t) => ({ ...t, patients: t.patients.filter(keep) }));
  const points = shown.flatMap((t) => t.patients.flatMap((p) => p.points));
  const means = shown.flatMap((t) => t.mean_curve.filter((m) => m.mean_egfr !== null));
  const years = [...points.map((p) => p.years), ...means.map((m) => m.year), 0, 1];
  const highest = Math.max(100, ...points.map((p) => p.egfr), ...means.map((m) => m.mean_egfr));
  const x = linear([Math.floor(Math.min(...years) * 2) / 2, Math.ceil(Math.max(...years))], [M.left, W - M.right]);
  const y = linear([0, Math.ceil((highest + 5) / 10) * 10], [H - M.bottom, M.top]);
  const patientCount = shown.reduce((n, t) => n + t.patients.length, 0);

  const svg = frame("trajectory-chart", W, H, "eGFR trajectories by group",
    `${patientCount} patients' counted eGFRs (mL/min/1.73 m²) against years since treatment start, one line each, ` +
    `coloured by group (${shown.map((t) => GROUP_LABEL[t.group]).join(", ")}), with each group's yearly mean ` +
    "and the CKD stages G1 to G5 shaded. The data table below the chart lists every point.");
  svg.append(ckdBands(x, y, W - M.right + 6));
  svg.append(yAxis(y, M.left, y.ticks(7), (t) => String(t), "eGFR (mL/min/1.73 m²)", W - M.right));
  svg.append(xAxis(x, H - M.bottom, x.ticks(10).filter(Number.isInteger), (t) => (t < 0 ? `−${-t}` : String(t)),
    "Years since treatment start"));
  svg.append(s("line", { class: "start-line", x1: x(0), x2: x(0), y1: M.top, y2: H - M.bottom }));
  svg.append(s("text", { class: "start-label", x: x(0) + 4, y: M.top + 12 }, "treatment start"));

  const plot = plotArea(svg, M.left, M.top, W - M.right, H - M.bottom);
  for (const t of shown) {
    const source = `GET /v1/cohorts/${t.group}/egfr`;
    for (const p of t.patients) {
      const coords = p.points.map((pt) => [x(pt.years), y(pt.egfr)]);
      const g = patientSeries(t.group, p.subject_id, coords, {
        source, field: `patients[subject_id=${p.subject_id}].points`, onOpen,
        title: `${p.subject_id} (${GROUP_LABEL[t.group]}), treatment start ${p.treatment_start}: ` +
          `${p.points.length} counted eGFRs — from ${source}. Click to open the patient.`,
      });
      p.points.forEach((pt, i) => {
        const [cx, cy] = coords[i];
        const field = `patients[subject_id=${p.subject_id}].points[result_id=${pt.result_id}].egfr`;
        const tip = s("title", {}, `${p.subject_id}, ${pt.collected_on} (${round(pt.years, 2)} y): eGFR ${round(pt.egfr, 1)}` +
          `${pt.corrected ? ", corrected" : ""}${pt.derived_from === "creatinine" ? ", from creatinine" : ""} — raw ${pt.egfr} from ${source} → ${field}`);
        const attrs = { class: `point group-${t.group}${fresh.has(pt.result_id) ? " new-point" : ""}`, "data-result-id": pt.result_id, "data-source": source, "data-field": field, "data-raw": pt.egfr };
        g.append(s("circle", { cx, cy, r: 2.6, ...attrs }, tip));
        if (pt.corrected) {
          g.append(s("circle", { class: "corrected-ring", cx, cy, r: 6.5, "data-corrected": pt.result_id },
            s("title", {}, `corrected value: ${pt.result_id} (${round(pt.egfr, 1)}) replaced an earlier result — from ${source} → ${field}`)));
        }
      });
      plot.append(g);
    }
  }
  for (const t of shown) {
    const source = `GET /v1/cohorts/${t.group}/egfr`;
    const curve = t.mean_curve.filter((m) => m.mean_egfr !== null);
    const g = s("g", { class: "series series-mean", "data-group": t.group, "data-source": source, "data-field": "mean_curve" },
      s("title", {}, `${GROUP_LABEL[t.group]} mean eGFR per year since treatment start — from ${source} → mean_curve`));
    g.append(s("path", { class: `line group-${t.group} dash-${t.group}`, d: linePath(curve.map((m) => [x(m.year), y(m.mean_egfr)])) }));
    for (const m of curve) {
      g.append(marker(t.group, x(m.year), y(m.mean_egfr), 4.2, {
        class: `point group-${t.group}`, "data-source": source, "data-field": `mean_curve[year=${m.year}].mean_egfr`, "data-raw": m.mean_egfr,
      }, ));
      g.lastChild.append(s("title", {}, `${GROUP_LABEL[t.group]} mean, year ${m.year}: ${round(m.mean_egfr, 1)} (n = ${m.n}) — raw ${m.mean_egfr} from ${source} → mean_curve[year=${m.year}].mean_egfr`));
    }
    plot.append(g);
  }
  return svg;
}

export function trajectoryLegend(groups) {
  const items = [];
  for (const group of groups) {
    items.push(h("span", { class: "legend-item" }, legendItem(group, "patient"), `${GROUP_LABEL[group]} patients`));
    items.push(h("span", { class: "legend-item" }, legendItem(group, "mean"), `${GROUP_LABEL[group]} mean`));
  }
  const ring = s("svg", { viewBox: "0 0 36 16", "aria-hidden": "true", focusable: "false" },
    s("circle", { cx: 18, cy: 8, r: 2.6, fill: "#1a1a1a" }), s("circle", { class: "corrected-ring", cx: 18, cy: 8, r: 6 }));
  items.push(h("span", { class: "legend-item" }, ring, "corrected value"));
  return items;
}

export function trajectoryTable(trajectories, keep = () => true) {
  const rows = [];
  for (const t of trajectories) {
    const source = `GET /v1/cohorts/${t.group}/egfr`;
    for (const p of t.patients.filter(keep)) {
      for (const pt of p.points) {
        rows.push(h("tr", {},
          h("td", {}, GROUP_LABEL[t.group]), h("td", {}, p.subject_id), h("td", {}, pt.collected_on),
          h("td", {}, value(round(pt.years, 2), { source, field: `patients[subject_id=${p.subject_id}].points[result_id=${pt.result_id}].years`, raw: pt.years })),
          h("td", {}, value(round(pt.egfr, 1), { source, field: `patients[subject_id=${p.subject_id}].points[result_id=${pt.result_id}].egfr`, raw: pt.egfr })),
          h("td", {}, pt.status), h("td", {}, pt.derived_from)));
      }
    }
    for (const m of t.mean_curve) {
      rows.push(h("tr", {},
        h("td", {}, GROUP_LABEL[t.group]), h("td", {}, `mean (n = ${m.n})`), h("td", {}, "—"),
        h("td", {}, `year ${m.year}`),
        h("td", {}, value(round(m.mean_egfr, 1), { source, field: `mean_curve[year=${m.year}].mean_egfr`, raw: m.mean_egfr })),
        h("td", {}, "group mean"), h("td", {}, "—")));
    }
  }
  return table("eGFR trajectories: every plotted point and group mean", ["Group", "Patient", "Collected", "Years since start", "eGFR", "Status", "From"], rows, { class: "numbers" });
}

// --- Kaplan–Meier ----------------------------------------------------------------------------

/** ``curves``: the ``GET /v1/cohorts/{group}/survival`` answers of the visible groups. */
export function survivalChart(curves) {
  const rowsBelow = curves.length;
  const W = 680, M = { left: 78, right: 24, top: 14 };
  const plotBottom = 300;
  const H = plotBottom + 64 + rowsBelow * 19;
  const maxTime = Math.max(1, ...curves.flatMap((c) => c.steps.map((st) => st.time)));
  const x = linear([0, Math.ceil(maxTime)], [M.left, W - M.right]);
  const y = linear([0, 1.04], [plotBottom, M.top]); // headroom: curves at 100 % stay visible
  const svg = frame("survival-chart", W, H, "Kaplan–Meier kidney-failure-free survival by group",
    curves.map((c) => `${GROUP_LABEL[c.group]}: ${c.n} patients, ${c.events} kidney failures, ` +
      `survival ${round(100 * (c.steps.at(-1)?.survival ?? 1), 0)} % at ${round(c.steps.at(-1)?.time ?? 0, 1)} years`).join("; ") +
    ". Numbers at risk per year are printed below the time axis; the data table below lists every step.");
  const yearStep = Math.ceil(maxTime) > 12 ? 2 : 1;
  const yearTicks = [];
  for (let t = 0; t <= Math.ceil(maxTime); t += yearStep) yearTicks.push(t);
  svg.append(yAxis(y, M.left, [0, 0.25, 0.5, 0.75, 1], (t) => `${t * 100} %`, "Free of kidney failure", W - M.right));
  svg.append(xAxis(x, plotBottom, yearTicks, String, "Years since treatment start", 34));

  curves.forEach((c) => {
    const source = `GET /v1/cohorts/${c.group}/survival`;
    const g = s("g", { class: "km-curve", "data-group": c.group, "data-source": source, "data-field": "steps" },
      s("title", {}, `${GROUP_LABEL[c.group]}: n = ${c.n}, ${c.events} kidney failures — from ${source}`));
    let d = `M${x(0)},${y(1)}`;
    for (const step of c.steps) d += `H${x(step.time).toFixed(1)}V${y(step.survival).toFixed(1)}`;
    if (c.steps.length) d += `H${x(c.steps.at(-1).time).toFixed(1)}`;
    g.append(s("path", { class: `line group-${c.group} dash-${c.group}`, d }));
    c.steps.forEach((step, i) => {
      const field = `steps[${i}]`;
      const tip = `${GROUP_LABEL[c.group]} at ${round(step.time, 2)} y: survival ${round(100 * step.survival, 1)} %` +
        `${step.ci_lower !== null ? ` (95 % CI ${round(100 * step.ci_lower, 1)}–${round(100 * step.ci_upper, 1)} %)` : ""}, ` +
        `at risk ${step.at_risk}, events ${step.events}, censored ${step.censored} — raw ${step.survival} from ${source} → ${field}.survival`;
      if (step.censored > 0) {
        g.append(s("line", { class: `censor group-${c.group}`, x1: x(step.time), x2: x(step.time), y1: y(step.survival) - 6, y2: y(step.survival) + 6,
          "data-source": source, "data-field": `${field}.censored`, "data-raw": step.censored }, s("title", {}, tip)));
      }
      if (step.events > 0) {
        g.append(marker(c.group, x(step.time), y(step.survival), 3.5, { class: `point group-${c.group}`, "data-source": source, "data-field": `${field}.survival`, "data-raw": step.survival }));
        g.lastChild.append(s("title", {}, tip));
      }
    });
    svg.append(g);
  });

  svg.append(curveLabels(curves.filter((c) => c.steps.length).map((c) => ({
    group: c.group, time: c.steps.at(-1).time, value: c.steps.at(-1).survival,
    source: `GET /v1/cohorts/${c.group}/survival`, field: `steps[${c.steps.length - 1}].survival`,
  })), x, y, W - M.right));
  svg.append(atRiskRows(curves.map((c) => ({
    group: c.group,
    cells: c.at_risk_by_year.filter((entry) => entry.years % yearStep === 0).map((entry) => ({
      years: entry.years, at_risk: entry.at_risk, source: `GET /v1/cohorts/${c.group}/survival`,
      field: `at_risk_by_year[years=${entry.years}].at_risk`,
    })),
  })), x, plotBottom + 52));
  return svg;
}

/**
 * Direct labels at each curve's end (curves often coincide at 100 %), stacked when they would
 * collide. ``ends``: ``[{group, time, value, source, field}]``, value a proportion.
 */
export function curveLabels(ends, x, y, right) {
  const g = s("g", { class: "curve-labels" });
  const placed = [];
  for (const end of [...ends].sort((a, b) => b.time - a.time)) {
    const below = end.value > 0.5;
    let ly = y(end.value) + (below ? 16 : -8);
    while (placed.some((p) => Math.abs(p - ly) < 14)) ly += below ? 14 : -14;
    placed.push(ly);
    g.append(s("text", {
      class: `curve-label group-${end.group}`, x: Math.min(x(end.time), right) - 4, y: ly, "text-anchor": "end",
      "data-source": end.source, "data-field": end.field, "data-raw": end.value,
    }, `${GROUP_LABEL[end.group]} ${round(100 * end.value, 0)} %`));
  }
  return g;
}

/** The "Number at risk" rows under a step chart, from ``top``: ``rows`` = ``[{group, cells:
 * [{years, at_risk, source, field}]}]``, one row per group, a number under each year. */
export function atRiskRows(rows, x, top) {
  const g = s("g", { class: "at-risk-table" });
  g.append(s("text", { class: "at-risk-title", x: 8, y: top }, "Number at risk"));
  rows.forEach((r, row) => {
    const ry = top + 19 * (row + 1);
    g.append(s("text", { class: `at-risk group-${r.group}`, x: 8, y: ry }, GROUP_LABEL[r.group]));
    for (const cell of r.cells) {
      g.append(s("text", {
        class: `at-risk group-${r.group}`, x: x(cell.years), y: ry, "text-anchor": "middle",
        "data-group": r.group, "data-year": cell.years, "data-source": cell.source, "data-field": cell.field, "data-raw": cell.at_risk,
      }, String(cell.at_risk), s("title", {}, `${GROUP_LABEL[r.group]}: ${cell.at_risk} at risk at ${cell.years} years — from ${cell.source} → ${cell.field}`)));
    }
  });
  return g;
}

export function survivalLegend(groups) {
  return groups.map((group) => h("span", { class: "legend-item" }, legendItem(group, "km"), GROUP_LABEL[group]));
}

export function survivalTable(curves) {
  const rows = [];
  for (const c of curves) {
    const source = `GET /v1/cohorts/${c.group}/survival`;
    c.steps.forEach((step, i) => {
      const cell = (key, text) => h("td", {}, value(text, { source, field: `steps[${i}].${key}`, raw: step[key] }));
      rows.push(h("tr", {},
        h("td", {}, GROUP_LABEL[c.group]),
        cell("time", round(step.time, 2)),
        cell("survival", `${round(100 * step.survival, 1)} %`),
        h("td", {}, step.ci_lower === null ? "—" : `${round(100 * step.ci_lower, 1)}–${round(100 * step.ci_upper, 1)} %`),
        cell("at_risk", String(step.at_risk)), cell("events", String(step.events)), cell("censored", String(step.censored))));
    });
  }
  return table("Kaplan–Meier steps per group", ["Group", "Years", "Survival", "95 % CI", "At risk", "Events", "Censored"], rows, { class: "numbers" });
}
