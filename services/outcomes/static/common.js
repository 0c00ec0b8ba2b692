// Shared by both dashboard pages: reading the analyst API, live updates, traceable numbers,
// rounding as the abstract does, element builders and scales. No dependencies.

export const GROUPS = ["A", "B", "control"];
export const GROUP_LABEL = { A: "Group A", B: "Group B", control: "Control" };
export const GROUP_MARKER = { A: "circle", B: "square", control: "triangle" };
export const POLL_MS = 2000;

// XML namespace name of SVG elements (an identifier, never fetched).
const SVG_NS = "http://www.w3.org/2000/svg";
const KEY_STORAGE = "nephrotrack.analystKey";

// --- the API -------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(path, status, detail) {
    super(`${path}: ${status ? `HTTP ${status}` : "unreachable"}${detail ? ` — ${detail}` : ""}`);
    this.path = path;
    this.status = status;
    this.detail = detail;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// --- analysis locks ------------------------------------------------------------------------

/** The analysis lock the page shows (``?lock=<name>``), or null for the live projection. */
export function pageLock() {
  return new URLSearchParams(window.location.search).get("lock");
}

/** ``path`` as of the page's lock: every outcomes GET takes ``lock=`` (docs/time-travel.md). */
export function atLock(path) {
  const lock = pageLock();
  if (!lock) return path;
  const url = new URL(path, window.location.origin);
  url.searchParams.set("lock", lock);
  return `${url.pathname}${url.search}`;
}

/**
 * The header's lock picker: "live" and every lock of ``GET /v1/locks``; choosing one reloads the
 * whole page as of it (the URL keeps ``?lock=``, so a locked view can be bookmarked or shared).
 */
export async function wireLockPicker() {
  const picker = document.getElementById("lock-picker");
  if (!picker) return;
  const banner = document.getElementById("lock-banner");
  let locks = [];
  try {
    locks = (await api("/v1/locks", { live: true })).data;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
  }
  picker.replaceChildren(h("option", { value: "" }, "live"),
    ...locks.map((lock) => h("option", { value: lock.name }, `${lock.name} (${dateTime(lock.locked_at)})`)));
  const chosen = pageLock();
  picker.value = chosen && locks.some((lock) => lock.name === chosen) ? chosen : "";
  if (chosen && banner) {
    const lock = locks.find((l) => l.name === chosen);
    banner.textContent = lock
      ? `Frozen analysis “${lock.name}”, locked ${dateTime(lock.locked_at)} at ${lock.position}: every number below is as it stood then.`
      : `No analysis lock is named “${chosen}”.`;
    banner.hidden = false;
  }
  picker.addEventListener("change", () => {
    const params = new URLSearchParams(window.location.search);
    if (picker.value) params.set("lock", picker.value); else params.delete("lock");
    const query = params.toString();
    window.location.assign(`${window.location.pathname}${query ? `?${query}` : ""}`);
  });
}

async function request(path, accept, { live = false } = {}) {
  let response;
  try {
    response = await fetch(live ? path : atLock(path), { headers: { Accept: accept, ...authHeaders() }, cache: "no-store" });
  } catch (error) {
    throw new ApiError(path, 0, String(error));
  }
  if (response.status === 401 || response.status === 403) {
    askForKey(response.status);
    throw new ApiError(path, response.status, "the analyst key is needed");
  }
  if (!response.ok) {
    let detail = "";
    try { detail = (await response.json()).detail; } catch { /* not JSON */ }
    throw new ApiError(path, response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

/** GET a JSON endpoint: ``{data, position, generation, updatedAt}`` (freshness headers). */
export async function api(path, options = {}) {
  const response = await request(path, "application/json", options);
  return { data: await response.json(), ...freshnessHeaders(response) };
}

/** GET a text endpoint (the CSV export). */
export async function apiText(path) {
  const response = await request(path, "text/csv");
  return { data: await response.text(), ...freshnessHeaders(response) };
}

function freshnessHeaders(response) {
  return {
    position: response.headers.get("X-Projection-Position"),
    generation: response.headers.get("X-Projection-Generation"),
    updatedAt: response.headers.get("X-Projection-Updated-At"),
  };
}

let keyListeners = [];

/** Once the API requires the analyst role: ask for the key, keep it for this tab only. */
function askForKey(status) {
  const box = document.getElementById("auth");
  if (!box || !box.hidden) return;
  box.replaceChildren(
    h("form", { id: "auth-form" },
      h("h2", {}, status === 403 ? "This key is not an analyst key" : "The analyst API needs a key"),
      h("p", {}, "Enter the analyst key (NEPHROTRACK_ANALYST_KEY). It is kept in this browser tab only."),
      h("label", { for: "auth-key" }, "Analyst key"),
      h("input", { id: "auth-key", type: "password", autocomplete: "off", required: "" }),
      h("button", { type: "submit", class: "button" }, "Use this key"),
    ),
  );
  box.hidden = false;
  box.querySelector("form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, box.querySelector("input").value.trim());
    box.hidden = true;
    keyListeners.forEach((listener) => listener());
  });
  box.querySelector("input").focus();
}

/** Downloads go through fetch when a key is in use (a plain link cannot send the header). */
export function authenticatedDownloads(links) {
  for (const link of links) {
    link.setAttribute("href", atLock(link.getAttribute("href")));
    link.addEventListener("click", async (event) => {
      if (!sessionStorage.getItem(KEY_STORAGE)) return; // no auth: the plain link works
      event.preventDefault();
      const response = await request(link.getAttribute("href"), "*/*");
      const url = URL.createObjectURL(await response.blob());
      const a = h("a", { href: url, download: link.getAttribute("download") || "" });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    });
  }
}

// --- live updates --------------------------------------------------------------------------

/**
 * Poll ``GET /v1/freshness`` every two seconds; call ``refresh()`` whenever the projection's
 * generation or position differs from what was last rendered (and on the first poll). A failed
 * refresh is retried at the next poll. Shows freshness in ``#freshness``.
 */
export function live(refresh) {
  const status = document.getElementById("freshness");
  const announcer = document.getElementById("announcer");
  let rendered = null;
  let busy = false;
  let first = true;

  async function tick() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const { data } = await api("/v1/freshness");
      const key = `${data.generation}|${data.position}`;
      if (key !== rendered) {
        await refresh();
        if (!first && announcer) announcer.textContent = `Updated with new events at ${clock(new Date())}.`;
        first = false;
        rendered = key;
        showFreshness(status, data, true);
      } else {
        showFreshness(status, data, false);
      }
    } catch (error) {
      showStale(status, error);
    } finally {
      busy = false;
    }
  }

  keyListeners.push(() => { rendered = null; tick(); });
  document.addEventListener("visibilitychange", tick);
  tick();
  return setInterval(tick, POLL_MS);
}

function showFreshness(status, data, changed) {
  if (!status) return;
  const pending = data.sources.reduce((sum, s) => (s.pending == null || sum == null ? null : sum + s.pending), 0);
  const src = "GET /v1/freshness";
  const parts = [
    h("span", { class: "live-dot", "aria-hidden": "true" }),
    h("strong", {}, "Live"),
    " · projection at ",
  ];
  data.sources.forEach((s, i) => {
    if (i) parts.push(", ");
    parts.push(`${s.source} `, value(String(s.last_sequence), {
      source: src, field: `sources[${s.source}].last_sequence`, raw: s.last_sequence,
      label: `JetStream sequence of the last ${s.source} message applied`,
    }));
  });
  parts.push(" · generation ", value(String(data.generation), { source: src, field: "generation", raw: data.generation }));
  if (data.updated_at) {
    parts.push(" · newest event ", value(dateTime(data.updated_at), { source: src, field: "updated_at", raw: data.updated_at }));
  }
  parts.push(" · ", pending == null ? "pending unknown (broker not answering)" : h("span", {},
    value(String(pending), { source: src, field: "sum(sources[].pending)", raw: pending }), " pending"));
  parts.push(h("span", { class: "muted" }, ` · checked ${clock(new Date())}`));
  const line = h("span", { class: changed ? "flash" : "", id: "freshness-line", "data-position": data.position }, ...parts);
  status.classList.remove("stale");
  status.replaceChildren(line);
}

function showStale(status, error) {
  if (!status) return;
  status.classList.add("stale");
  status.replaceChildren(
    h("span", { class: "live-dot", "aria-hidden": "true" }),
    h("strong", {}, "Not updating"),
    ` · ${error.message}; retrying every ${POLL_MS / 1000} s (the numbers shown are the last ones read)`,
  );
}

// --- numbers -------------------------------------------------------------------------------

function plainDecimal(x) {
  // The shortest round-trip representation of x ≥ 0, without an exponent.
  const s = x.toString();
  if (!/e/i.test(s)) return s;
  const [mantissa, exponentText] = s.split(/e/i);
  const [whole, fraction = ""] = mantissa.split(".");
  const digits = whole + fraction;
  const point = whole.length + Number(exponentText);
  if (point <= 0) return `0.${"0".repeat(-point)}${digits}`;
  if (point >= digits.length) return digits + "0".repeat(point - digits.length);
  return `${digits.slice(0, point)}.${digits.slice(point)}`;
}

/**
 * Round half away from zero on the shortest decimal representation, as the abstract rounds and
 * as ``nephrotrack demo`` prints (so 2.675 rounds to 2.68, as written). "—" for null.
 */
export function round(x, places = 0, { signed = false } = {}) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (!Number.isFinite(x)) return x > 0 ? "∞" : "−∞";
  const [whole, fraction = ""] = plainDecimal(Math.abs(x)).split(".");
  const padded = fraction.padEnd(places + 1, "0");
  const digits = (whole + padded.slice(0, places)).split("").map(Number);
  if (Number(padded[places]) >= 5) {
    let i = digits.length - 1;
    for (; i >= 0 && digits[i] === 9; i--) digits[i] = 0;
    if (i < 0) digits.unshift(1); else digits[i] += 1;
  }
  const text = digits.join("");
  const integer = text.slice(0, text.length - places).replace(/^0+(?=\d)/, "") || "0";
  const out = places > 0 ? `${integer}.${text.slice(text.length - places)}` : integer;
  const zero = !/[1-9]/.test(out);
  if (x < 0 && !zero) return `−${out}`;
  return signed && !zero ? `+${out}` : out;
}

/**
 * A number with its provenance: ``data-source`` (endpoint), ``data-field`` (where in the answer),
 * ``data-raw`` (the unrounded value) and a tooltip saying all three.
 */
export function value(text, { source, field, raw, label, cls = "" }) {
  const rawText = raw === null || raw === undefined ? "null" : String(raw);
  return h("span", {
    class: `value ${cls}`.trim(),
    "data-source": source,
    "data-field": field,
    "data-raw": rawText,
    title: `${label ? `${label}: ` : ""}${rawText} — from ${source} → ${field}`,
  }, text);
}

export function clock(date) {
  return date.toLocaleTimeString("en-GB", { hour12: false });
}

export function dateTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : `${iso.slice(0, 10)} ${clock(d)}`;
}

export function formatCells(count) {
  if (count === null || count === undefined) return "—";
  if (count === 0) return "0";
  const exponent = Math.floor(Math.log10(Math.abs(count)));
  const superscript = String(exponent).replace(/[-0-9]/g, (c) => "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"["-0123456789".indexOf(c)]);
  return `${round(count / 10 ** exponent, 2)} × 10${superscript}`;
}

// --- CSV (the export endpoint) -------------------------------------------------------------

export function parseCsv(text) {
  const rows = [];
  let row = [];
  let cell = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { cell += '"'; i++; }
      else if (c === '"') quoted = false;
      else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(cell); cell = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(cell); rows.push(row); row = []; cell = "";
    } else cell += c;
  }
  if (cell !== "" || row.length) { row.push(cell); rows.push(row); }
  const [header = [], ...body] = rows;
  return body.filter((r) => r.length > 1)
    .map((r) => Object.fromEntries(header.map((name, i) => [name, unneutralised(r[i] ?? "")])));
}

// The export prefixes a text cell a spreadsheet would evaluate (= + - @, tab, CR) with "'"
// (CSV injection, services/outcomes/exports.py); the page shows the value itself.
function unneutralised(cell) {
  return /^'[=+\-@\t\r]/.test(cell) ? cell.slice(1) : cell;
}

export function csvNumber(text) {
  return text === "" || text === undefined ? null : Number(text);
}

// --- elements ------------------------------------------------------------------------------

function build(element, attrs, children) {
  for (const [name, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    element.setAttribute(name, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/** An HTML element; children are nodes or text (never parsed as HTML). */
/**
 * ``container.replaceChildren(...children)``, keeping keyboard focus on the link to the same
 * place when it was inside: live updates and the evidence's arrival re-render tables, and a
 * keyboard user's focused link must not vanish under them (Enter would then open nothing).
 */
export function replaceKeepingFocus(container, ...children) {
  const focused = focusedLink(container);
  container.replaceChildren(...children);
  refocus(container, focused);
}

/** ``element.replaceWith(replacement)``, keeping keyboard focus as :func:`replaceKeepingFocus` does. */
export function replaceWithKeepingFocus(element, replacement) {
  const focused = focusedLink(element);
  element.replaceWith(replacement);
  refocus(replacement, focused);
}

function focusedLink(element) {
  return element.contains(document.activeElement) ? document.activeElement.getAttribute("href") : null;
}

function refocus(element, href) {
  if (href) [...element.querySelectorAll("a[href]")].find((a) => a.getAttribute("href") === href)?.focus();
}

export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function table(caption, headings, rows, attrs = {}) {
  return h("table", attrs,
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, headings.map((heading) => h("th", { scope: "col" }, heading)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headings.length }, "None."))),
  );
}

// --- page furniture ------------------------------------------------------------------------

export function wireToggles() {
  const sources = document.getElementById("toggle-sources");
  sources?.addEventListener("click", () => {
    const on = document.body.classList.toggle("show-sources");
    sources.setAttribute("aria-pressed", String(on));
    sources.textContent = on ? "Hide sources" : "Show sources";
  });
  for (const button of document.querySelectorAll(".table-toggle")) {
    button.addEventListener("click", () => {
      const target = document.getElementById(button.getAttribute("aria-controls"));
      const shown = target.classList.toggle("visually-hidden") === false;
      button.setAttribute("aria-expanded", String(shown));
      button.textContent = shown ? "Hide data table" : "Show data table";
    });
  }
}

/** Filters live in the query string, so a filtered view can be bookmarked or shared. */
export function readQuery() {
  return new URLSearchParams(window.location.search);
}

export function writeQuery(params) {
  const query = params.toString();
  history.replaceState(null, "", `${window.location.pathname}${query ? `?${query}` : ""}`);
}

// --- scales --------------------------------------------------------------------------------

export function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  const error = raw / power;
  return power * (error >= 7.5 ? 10 : error >= 3.5 ? 5 : error >= 1.5 ? 2 : 1);
}

export function linear([d0, d1], [r0, r1]) {
  const scale = (x) => r0 + ((x - d0) / (d1 - d0 || 1)) * (r1 - r0);
  scale.domain = [d0, d1];
  scale.range = [r0, r1];
  scale.ticks = (count = 6) => {
    const step = niceStep(d1 - d0, count);
    const out = [];
    for (let t = Math.ceil(d0 / step) * step; t <= d1 + step * 1e-9; t += step) out.push(Number(t.toFixed(10)));
    return out;
  };
  return scale;
}

/** A group's marker (circle, square or triangle) centred at x, y. */
export function marker(group, x, y, size, attrs = {}) {
  const shape = GROUP_MARKER[group] || "circle";
  if (shape === "square") return s("rect", { x: x - size, y: y - size, width: size * 2, height: size * 2, ...attrs });
  if (shape === "triangle") {
    const r = size * 1.25;
    return s("path", { d: `M${x},${y - r}L${x + r},${y + r * 0.8}L${x - r},${y + r * 0.8}Z`, ...attrs });
  }
  return s("circle", { cx: x, cy: y, r: size, ...attrs });
}

export const CKD_BANDS = [
  { stage: "G1", from: 90, to: Infinity, label: "G1 ≥ 90" },
  { stage: "G2", from: 60, to: 90, label: "G2 60–89" },
  { stage: "G3a", from: 45, to: 60, label: "G3a 45–59" },
  { stage: "G3b", from: 30, to: 45, label: "G3b 30–44" },
  { stage: "G4", from: 15, to: 30, label: "G4 15–29" },
  { stage: "G5", from: 0, to: 15, label: "G5 < 15" },
];

export function ckdStage(egfr) {
  return CKD_BANDS.find((band) => egfr >= band.from && egfr < band.to)?.stage ?? "—";
}
