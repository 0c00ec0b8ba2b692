"""The analyst API: cohort statistics, patients, exports, survival, eGFR trajectories, rebuild.

Every live answer comes from the projection (never from the event log) and says how fresh it is
in ``X-Projection-Position`` / ``X-Projection-Updated-At`` / ``X-Projection-Generation`` headers,
read in the same snapshot as the data. ``/v1/cohorts`` stays the contract's bare JSON array, so
freshness lives in headers everywhere, and ``/v1/freshness`` details it per source. Every GET
also answers ``as_of`` a time or under a ``lock`` (services/outcomes/viewpoint.py,
docs/time-travel.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from pydantic import TypeAdapter

from contracts.enrollment import Group
from services.outcomes import exports, group_evidence, statistics
from services.outcomes.answers import RememberedAnswers
from services.outcomes.domain import PatientOutcome
from services.outcomes.evidence_views import BiopsySummary, GroupSlopes, KidneyEndpoints, SafetySummary
from services.outcomes.queries import Freshness, OutcomesQueries
from services.outcomes.reading import ProjectionView
from services.outcomes.rebuild.lease import RebuildBusy
from services.outcomes.rebuild.wiring import BackgroundRebuild
from services.outcomes.viewpoint import Viewpoint
from services.outcomes.views import (
    CohortRow,
    EgfrTrajectories,
    FreshnessView,
    PatientDetail,
    RebuildProgressView,
    RebuildStatus,
    SurvivalCurve,
    UpcrTrajectories,
    freshness_view,
    patient_detail,
)
from shared.service import Service
from shared.tasks import within

FRESHNESS_HEADER = "X-Projection-Position"
STAMP_TIMEOUT_SECONDS = 0.25

_NOT_FOUND = {404: {"description": "unknown id, as `{\"detail\": \"<reason>\"}`"}}
_COHORT_ROWS: TypeAdapter[list[CohortRow]] = TypeAdapter(list[CohortRow])
_KIDNEY_ENDPOINTS: TypeAdapter[KidneyEndpoints] = TypeAdapter(KidneyEndpoints)


def _group(group: str) -> Group:
    if group not in statistics.GROUPS:
        raise HTTPException(404, f"unknown group {group!r}: the groups are A, B and control")
    return group  # type: ignore[return-value]


class LastAnswers:
    """The last answer per group, with the projection position it was computed at: a mixed-model
    fit takes a tenth of a second to seconds, and the same generation, position and mark rows'
    versions (and lock or ``as_of``) mean the same rows, hence the same answer (dashboards
    poll). Keys: the group, then what the rows are (``Freshness.answer_key``)."""

    def __init__(self) -> None:
        self._answers: dict[str, tuple[tuple[Any, ...], Any]] = {}

    def get(self, key: tuple[Any, ...]) -> Any:
        found = self._answers.get(key[0])
        return found[1] if found is not None and found[0] == key else None

    def put(self, key: tuple[Any, ...], answer: Any) -> None:
        self._answers[key[0]] = (key, answer)


def routes(
    service: Service, queries: OutcomesQueries, rebuilds: BackgroundRebuild, viewpoint: Callable[..., Viewpoint]
) -> APIRouter:
    """``viewpoint``: the dependency that reads ``as_of`` / ``lock`` (services/outcomes/viewpoint.py)."""
    router = APIRouter(prefix="/v1", tags=["outcomes"])
    fitted = LastAnswers()
    remembered = RememberedAnswers()
    at_viewpoint = Depends(viewpoint)  # as_of / lock (a default: annotations are strings here)

    @router.get("/cohorts", response_model=list[CohortRow], summary="Cohort statistics per group (contract)")
    async def cohorts(response: Response, at: Viewpoint = at_viewpoint) -> Any:
        async def compute(view: ProjectionView) -> list[dict[str, Any]]:
            return statistics.all_cohorts(await view.outcomes())

        return await remembered.answer("cohorts", at, response, _COHORT_ROWS, compute)

    @router.get("/patients/{subject_id}", response_model=PatientDetail, responses=_NOT_FOUND,
                summary="A patient's outcome values and timeline (contract)")
    async def patient(subject_id: str, response: Response, at: Viewpoint = at_viewpoint) -> PatientDetail:
        async with at.open(response) as view:
            record = await view.patient(subject_id)
        if record is None:
            raise HTTPException(404, f"no patient with subject id {subject_id} is known to the outcomes service")
        if record.outcome is None:
            raise HTTPException(
                404,
                f"{len(record.timeline)} events about {subject_id} have arrived but not their enrollment yet; "
                "outcome values need it",
            )
        return patient_detail(record, record.outcome)

    async def export(at: Viewpoint, write: Callable[[list[PatientOutcome]], bytes], media_type: str, name: str) -> Response:
        async with at.open() as view:
            freshness = view.freshness
            outcomes = await view.outcomes()
        return Response(write(outcomes), media_type=media_type,
                        headers={"Content-Disposition": f'attachment; filename="{name}"', **freshness.headers()})

    @router.get("/export/patients.csv", response_class=Response, summary="One row per patient (contract), CSV",
                responses={200: {"content": {"text/csv": {}}}})
    async def export_csv(at: Viewpoint = at_viewpoint) -> Response:
        return await export(at, exports.patients_csv, "text/csv; charset=utf-8", "patients.csv")

    @router.get("/export/patients.parquet", response_class=Response, summary="One row per patient, Parquet",
                responses={200: {"content": {"application/vnd.apache.parquet": {}}}})
    async def export_parquet(at: Viewpoint = at_viewpoint) -> Response:
        return await export(at, exports.patients_parquet, "application/vnd.apache.parquet", "patients.parquet")

    @router.get("/cohorts/{group}/survival", response_model=SurvivalCurve, responses=_NOT_FOUND,
                summary="Kaplan–Meier kidney-failure-free survival of a group")
    async def survival(group: str, response: Response, at: Viewpoint = at_viewpoint) -> dict[str, Any]:
        chosen = _group(group)
        async with at.open(response) as view:
            return statistics.kaplan_meier(await view.outcomes(chosen), chosen)

    @router.get("/cohorts/{group}/egfr", response_model=EgfrTrajectories, responses=_NOT_FOUND,
                summary="eGFR trajectories of a group, for plots")
    async def egfr(group: str, response: Response, at: Viewpoint = at_viewpoint) -> dict[str, Any]:
        chosen = _group(group)
        async with at.open(response) as view:
            return statistics.egfr_trajectories(await view.facts(chosen), chosen)

    @router.get("/cohorts/{group}/upcr", response_model=UpcrTrajectories, responses=_NOT_FOUND,
                summary="UPCR trajectories of a group, for plots (v2)")
    async def upcr(group: str, response: Response, at: Viewpoint = at_viewpoint) -> dict[str, Any]:
        chosen = _group(group)
        async with at.open(response) as view:
            return statistics.upcr_trajectories(await view.facts(chosen), chosen)

    @router.get("/cohorts/{group}/biopsies", response_model=BiopsySummary, responses=_NOT_FOUND,
                summary="Paired biopsies of a group: diagnostic → follow-up changes (v2)")
    async def biopsies(group: str, response: Response, at: Viewpoint = at_viewpoint) -> dict[str, Any]:
        chosen = _group(group)
        async with at.open(response) as view:
            return group_evidence.biopsies(await view.outcomes(chosen))

    @router.get("/cohorts/{group}/safety", response_model=SafetySummary, responses=_NOT_FOUND,
                summary="Adverse events of a group by term, grade, seriousness and relatedness (v2)")
    async def safety(group: str, response: Response, at: Viewpoint = at_viewpoint) -> dict[str, Any]:
        chosen = _group(group)
        async with at.open(response) as view:
            return group_evidence.safety(await view.facts(chosen))

    @router.get("/cohorts/{group}/endpoints", response_model=KidneyEndpoints, responses=_NOT_FOUND,
                summary="Composite kidney endpoint (Kaplan–Meier) and kidney failure with death competing (v2)")
    async def kidney_endpoints(group: str, response: Response, at: Viewpoint = at_viewpoint) -> Any:
        chosen = _group(group)

        async def compute(view: ProjectionView) -> dict[str, Any]:
            return group_evidence.kidney_endpoints(await view.outcomes(chosen))

        return await remembered.answer(("endpoints", chosen), at, response, _KIDNEY_ENDPOINTS, compute)

    @router.get("/cohorts/{group}/slopes", response_model=GroupSlopes, responses=_NOT_FOUND,
                summary="Total and chronic eGFR slopes of a group: REML linear mixed model (v2)")
    async def group_slopes(group: str, response: Response, at: Viewpoint = at_viewpoint) -> dict[str, Any]:
        chosen = _group(group)
        async with at.open(response) as view:
            key = (chosen, *view.freshness.answer_key)
            if (answer := fitted.get(key)) is not None:
                return answer
            facts = await view.facts(chosen)
        answer = await asyncio.to_thread(group_evidence.group_slopes, facts)  # a fit: keep the loop free
        fitted.put(key, answer)
        return answer

    @router.get("/freshness", response_model=FreshnessView, summary="How far the projection has read each source")
    async def freshness(response: Response, at: Viewpoint = at_viewpoint) -> FreshnessView:
        async with at.open(response) as view:
            current = view.freshness
        return freshness_view(current, await _stream_heads(service, current))

    @router.post("/admin/rebuild", status_code=202, response_model=RebuildStatus,
                 responses={409: {"description": "a rebuild is already running"}},
                 summary="Start a blue/green rebuild of the projection from the JetStream log")
    async def start_rebuild(restart: bool = False) -> RebuildStatus:
        try:
            await rebuilds.start(restart=restart)
        except RebuildBusy as exc:
            raise HTTPException(409, str(exc)) from None
        return await _rebuild_status(queries, rebuilds)

    @router.get("/admin/rebuild", response_model=RebuildStatus, summary="Progress of the rebuild")
    async def rebuild_status() -> RebuildStatus:
        return await _rebuild_status(queries, rebuilds)

    return router


async def _stream_heads(service: Service, freshness: Freshness) -> dict[str, int | None]:
    """Each source stream's last sequence; nothing when the broker does not answer within 1 s."""
    streams = [source.stream for source in freshness.sources]
    try:
        js = service.broker.connection.jetstream()
        infos = await within(1.0, asyncio.gather(*(js.stream_info(s) for s in streams)))
    except Exception:
        return {}
    return {stream: info.state.last_seq for stream, info in zip(streams, infos, strict=True)}


async def _rebuild_status(queries: OutcomesQueries, rebuilds: BackgroundRebuild) -> RebuildStatus:
    async with queries.snapshot() as connection:
        state = await queries.state(connection)
    progress = rebuilds.progress
    return RebuildStatus(
        running_here=rebuilds.running,
        progress=RebuildProgressView(**progress.as_dict()) if progress else None,
        active_generation=state.active_generation,
        rebuilding_generation=state.rebuilding_generation,
        rebuild_started_at=state.rebuild_started_at,
        rebuild_heartbeat_at=state.rebuild_heartbeat_at,
        swapped_at=state.swapped_at,
    )


def stamp_every_response(app: FastAPI, queries: OutcomesQueries) -> None:
    """Freshness headers on the authenticated endpoints that do not read the projection
    themselves (metrics, docs). Not on open routes (``/healthz``, the dashboard's pages and
    assets): how fresh the clinical data are is itself for key holders only; refusals (401/403)
    never reach this middleware. Best effort and bounded: the answer must come promptly even
    with the database down (then without the headers)."""

    @app.middleware("http")
    async def stamp(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        authenticated = getattr(request.state, "principal", None) is not None  # set by shared.auth
        if authenticated and FRESHNESS_HEADER not in response.headers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STAMP_TIMEOUT_SECONDS), queries.snapshot() as connection:
                    response.headers.update((await queries.freshness(connection)).headers())
        return response
