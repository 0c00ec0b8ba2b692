"""The pulse administration service process: methylprednisolone pulse doses and their deviations.

Learns who is enrolled (and who died or withdrew) from enrollment's events; records every dose
given as a fact, flagging each broken protocol rule with a ProtocolDeviationDetected event.
"""

from __future__ import annotations

from fastapi import FastAPI

from contracts import deviations, pulse, register_all
from contracts.deviations import DeviationCode
from services.clinical import (
    STATUS_STREAM_PREFIX,
    ClinicalSettings,
    expose_deviation_codes,
    learn_from_enrollment,
    publish_only_public_streams,
)
from services.pulse.api import routes
from shared.events import registry
from shared.service import Service

PULSE_DEVIATION_CODES = (
    DeviationCode.DOSE_ABOVE_DAILY_MAX,
    DeviationCode.DOSE_OUTSIDE_MG_PER_KG,
    DeviationCode.CYCLE_DAYS_NOT_CONSECUTIVE,
    DeviationCode.CYCLE_DAY_REPEATED,
    DeviationCode.CYCLE_STARTED_BEFORE_PREVIOUS_ENDED,
    DeviationCode.TOO_MANY_CYCLES,
)


def create_app(service: Service) -> FastAPI:
    settings = ClinicalSettings()
    publish_only_public_streams(service, STATUS_STREAM_PREFIX)
    register_all(registry)
    service.declare_published(*pulse.EVENTS, *deviations.EVENTS)
    service.consume_service("enrollment", learn_from_enrollment)
    expose_deviation_codes(PULSE_DEVIATION_CODES)
    return service.app(routes(service, settings), title="nephrotrack pulse", description=__doc__ or "")
