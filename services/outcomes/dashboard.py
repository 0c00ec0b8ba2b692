"""The analyst dashboard: what the study found, as pages, drawn from the analyst API.

``dashboard_routes(service)`` serves two HTML pages and their assets, all from
``services/outcomes/static`` (hand-written HTML, CSS and vanilla JavaScript; the charts are SVG
drawn by that JavaScript — no framework, no build step, no CDN):

- ``GET /`` — cohort overview: the cohort table and the v2 evidence table (UPCR before →
  after, remissions, confirmed 40 % decline, composite endpoint, patients with AEs), eGFR and
  UPCR trajectories, Kaplan–Meier kidney-failure-free survival, the composite-endpoint
  Kaplan–Meier and the kidney-failure cumulative incidence (death competing) with numbers at
  risk, the mixed-model total and chronic slopes with their 95 % CI (or why not fitted), a
  safety table per group (serious AEs marked), the paired biopsies before → after, the patient
  list, filters and the export downloads (``overview.js``, ``evidence.js``,
  ``evidence-charts.js``, ``charts.js``);
- ``GET /patients/{subject_id}`` — one patient's values and timeline: eGFR and UPCR, pulse
  cycles, infusions, biopsies, adverse events with their follow-up reports, clinical events
  (``patient.js``, ``patient-evidence.js``);
- ``GET /static/{name}`` — the assets.

The pages hold no data. Their JavaScript reads the JSON API on the same origin
(``/v1/cohorts``, ``/v1/cohorts/{group}/egfr``, ``/survival``, ``/endpoints``, ``/slopes``,
``/safety``, ``/biopsies``, ``/v1/patients/{id}``, ``/v1/export/patients.csv``) and polls
``/v1/freshness`` every two seconds, refetching when the projection's position moves, so new
lab results appear without a reload. The UPCR lines and the biopsy findings come from every
listed patient's ``/v1/patients/{id}`` (the API has no group route for them): one request per
patient per refresh, fine for a trial's cohort, not for thousands. Every number on a page names the endpoint and field it came from (``data-source`` /
``data-field`` attributes, a tooltip, and a "show sources" switch), so each is traceable to
the API.

Auth: the pages and assets carry no data, so they are served without a key — wire them as
``public(dashboard_routes(service))`` (``shared.auth.public``); a browser cannot send a bearer
key when it navigates anyway. Every number comes from the API, which requires the analyst role:
on a 401 the page asks for the analyst key (kept in the tab's ``sessionStorage`` only) and sends
it as ``Authorization: Bearer`` on every request, downloads included.

A Content-Security-Policy limits the pages to this origin, so a stray external URL fails
loudly in the browser instead of quietly needing the internet.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, params
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).resolve().parent / "static"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((STATIC / name).read_text(encoding="utf-8"), headers=_PAGE_HEADERS)


def static_file(name: str) -> Path:
    """The asset ``name`` under the static directory; 404 for anything else (no ``..``, no
    directories, no dotfiles, only the content types above, only by its own name: no ``a//b``
    or trailing ``/``). A name the file system cannot even look up (a NUL byte, too long) is
    no asset either: 404, not a 500."""
    try:
        path = (STATIC / name).resolve()
        found = path.is_relative_to(STATIC) and path.is_file()
    except (OSError, ValueError):
        found = False
    if (
        not found
        or path.relative_to(STATIC).as_posix() != name
        or any(part.startswith(".") for part in path.relative_to(STATIC).parts)
        or path.suffix not in CONTENT_TYPES
    ):
        raise HTTPException(404, f"no dashboard asset {name!r}")
    return path


def dashboard_routes(service: Any = None, *, dependencies: Sequence[params.Depends] = ()) -> APIRouter:
    """The dashboard's routes. ``service`` is the outcomes :class:`~shared.service.Service`
    (unused for now: the pages read everything through the API); ``dependencies`` are added to
    every route."""
    router = APIRouter(tags=["dashboard"], dependencies=list(dependencies))

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def overview() -> HTMLResponse:
        return _page("index.html")

    @router.get("/patients/{subject_id}", response_class=HTMLResponse, include_in_schema=False)
    async def patient_page(subject_id: str) -> HTMLResponse:  # noqa: ARG001 - the page reads it from its URL
        return _page("patient.html")

    @router.get("/static/{name:path}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        path = static_file(name)
        return FileResponse(
            path, media_type=CONTENT_TYPES[path.suffix],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    return router
