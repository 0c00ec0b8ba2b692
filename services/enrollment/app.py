"""The enrollment service process: who is in the study, in which group, and what happened to them."""

from __future__ import annotations

from fastapi import FastAPI

from contracts import enrollment, register_all
from services.enrollment.api import routes
from services.enrollment.handlers import expose_serious_adverse_events
from services.enrollment.key_purge import EnrollmentSettings, KeyPurger
from shared.events import registry
from shared.service import Service


def create_app(service: Service) -> FastAPI:
    register_all(registry)
    service.declare_published(*enrollment.EVENTS)
    expose_serious_adverse_events()
    settings = EnrollmentSettings()
    key_purger = KeyPurger(service.store, service.vault, interval=settings.key_purge_interval_seconds)
    service.background.append(key_purger.run)
    return service.app(routes(service, key_purger), title="nephrotrack enrollment", description=__doc__ or "")
