"""The enrollment service process: who is in the study, in which group, and what happened to them."""

from __future__ import annotations

from fastapi import FastAPI

from services.enrollment import events
from services.enrollment.api import routes
from shared.service import Service


def create_app(service: Service) -> FastAPI:
    service.publishes(
        events.PatientEnrolled,
        events.DialysisStarted,
        events.KidneyTransplanted,
        events.PatientDied,
        events.PatientWithdrawn,
        events.BiopsyRecorded,
        events.PatientDataErased,
    )
    return service.app(routes(service), title="nephrotrack enrollment", description=__doc__ or "")
