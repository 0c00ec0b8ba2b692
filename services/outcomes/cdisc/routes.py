"""The CDISC export routes (contract, "Standard exports (v2)"): ``GET /v1/export/sdtm/{dm|ex|lb|ae|ds}.{xpt|json}``
and ``GET /v1/export/adam/{adsl|adtte}.{xpt|json}`` — analyst reads, like every outcomes GET.

Thin: read the projection in one snapshot (now, ``as_of`` or under a ``lock``: viewpoint), decode (source), build (catalogue), write.
Building and writing run in a worker thread: the transport writer goes through a file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, HTTPException, Response

from services.outcomes.cdisc import dataset_json, xpt
from services.outcomes.cdisc.catalogue import DATASETS
from services.outcomes.cdisc.model import Dataset
from services.outcomes.cdisc.source import KINDS, study_data
from services.outcomes.queries import PatientRecord
from services.outcomes.viewpoint import Viewpoint

Writer = Callable[[Dataset, datetime | None, datetime | None], bytes]

FORMATS: dict[str, tuple[str, Writer]] = {
    "xpt": (xpt.MEDIA_TYPE, lambda ds, created, _modified: xpt.to_xpt(ds, created)),
    "json": (dataset_json.MEDIA_TYPE,
             lambda ds, created, modified: dataset_json.to_dataset_json(ds, created or datetime.now(UTC), modified)),
}
"""Each writer takes the dataset, the creation time to write (None: now) and when the data last changed."""

_RESPONSES = {
    200: {"content": {xpt.MEDIA_TYPE: {}, dataset_json.MEDIA_TYPE: {}},
          "description": "the dataset as SAS transport v5 (.xpt) or Dataset-JSON 1.1 (.json)"},
    404: {"description": "unknown dataset or format, as `{\"detail\": \"<reason>\"}`"},
}


def cdisc_routes(viewpoint: Callable[..., Viewpoint]) -> APIRouter:
    """``viewpoint``: the ``as_of`` / ``lock`` dependency (services/outcomes/viewpoint.py)."""
    router = APIRouter(prefix="/v1/export", tags=["exports"])
    at_viewpoint = Depends(viewpoint)  # as_of / lock (a default: annotations are strings here)

    async def export(standard: str, filename: str, at: Viewpoint) -> Response:
        name, _, extension = filename.rpartition(".")
        build = DATASETS[standard].get(name)
        if build is None:
            known = ", ".join(DATASETS[standard])
            raise HTTPException(404, f"unknown {standard.upper()} dataset {filename[:60]!r}: the datasets are {known}, "
                                     "each as .xpt or .json")
        if extension not in FORMATS:
            raise HTTPException(404, f"unknown format {extension!r}: .xpt (SAS transport v5) or .json (Dataset-JSON 1.1)")
        media_type, write = FORMATS[extension]
        async with at.open() as view:
            freshness = view.freshness
            records = await view.enrolled_records(KINDS)

        def written(rows: list[PatientRecord]) -> bytes:
            return write(build(study_data(rows)), freshness.answered_at, freshness.updated_at)

        body = await asyncio.to_thread(written, records)
        return Response(body, media_type=media_type, headers={
            "Content-Disposition": f'attachment; filename="{name}.{extension}"', **freshness.headers()})

    @router.get("/sdtm/{filename}", response_class=Response, responses=_RESPONSES,
                summary="An SDTM dataset (dm, ex, lb, ae, ds) as .xpt or .json (contract)")
    async def sdtm(filename: str, at: Viewpoint = at_viewpoint) -> Response:
        return await export("sdtm", filename, at)

    @router.get("/adam/{filename}", response_class=Response, responses=_RESPONSES,
                summary="An ADaM dataset (adsl, adtte) as .xpt or .json (contract)")
    async def adam(filename: str, at: Viewpoint = at_viewpoint) -> Response:
        return await export("adam", filename, at)

    return router
