"""The cell processing service process: adipose harvests, cell lots, QC and autologous infusions.

Learns who is enrolled (and who died or withdrew) from enrollment's events. Every cells event is
written to the patient's stream and, when it is about a lot, to the lot's stream as well; only
the patient-stream copy is published (the lot streams are private), so each fact reaches the
broker once, with one event id.
"""

from __future__ import annotations

from fastapi import FastAPI

from contracts import cells, deviations, register_all
from contracts.deviations import DeviationCode
from services.cells.api import routes
from services.cells.handlers import LOT_STREAM_PREFIX
from services.clinical import (
    STATUS_STREAM_PREFIX,
    ClinicalSettings,
    expose_deviation_codes,
    learn_from_enrollment,
    publish_only_public_streams,
)
from shared.events import registry
from shared.service import Service

CELLS_DEVIATION_CODES = (DeviationCode.TOO_MANY_INFUSIONS, DeviationCode.INFUSION_DOSE_OFF_TARGET)


def create_app(service: Service) -> FastAPI:
    settings = ClinicalSettings()
    publish_only_public_streams(service, LOT_STREAM_PREFIX, STATUS_STREAM_PREFIX)
    register_all(registry)
    service.declare_published(*cells.EVENTS, *deviations.EVENTS)
    service.consume_service("enrollment", learn_from_enrollment)
    expose_deviation_codes(CELLS_DEVIATION_CODES)
    return service.app(routes(service, settings), title="nephrotrack cells", description=__doc__ or "")
