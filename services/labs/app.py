"""The labs service process: lab results in (NATS ``labs.results``, HL7 v2 over MLLP, FHIR R4, HTTP
JSON), one ingestion core, eGFR (CKD-EPI 2021) and urine protein (UPCR, 24-hour protein, UACR) out;
every refusal published on ``labs.rejected``.

See docs/labs.md for the inputs, mappings, rejection codes and limits.
"""

from __future__ import annotations

import warnings
from datetime import timedelta

from fastapi import FastAPI

from contracts import register_all
from contracts.labs import EgfrComputed, LabResultCorrected, LabResultRejected, UrineResultMeasured
from services.labs import api, fhir_api
from services.labs import events as private_events
from services.labs.consumers import delete_inbound_after_commit, enrollment_handler, results_handler, sweeper
from services.labs.handlers import ingest_runner
from services.labs.ingest import Labs
from services.labs.mllp import MllpServer
from services.labs.purge import InboundPurger, targets
from services.labs.queries import SqlLabsStore
from services.labs.settings import LabsSettings
from shared import metrics
from shared.asyncapi import envelope_schema
from shared.broker import LAB_REJECTED_SUBJECT, LAB_RESULTS_SUBJECT
from shared.events import Envelope, registry
from shared.service import Service
from shared.settings import mllp_port

# The pull loops of one consumer (Service.consume(workers=…)): FastStream's AsyncAPI generator notes
# that they share a channel name (and documents it once, which is right).
warnings.filterwarnings("ignore", message="Overwrite channel handler", category=RuntimeWarning)


def route_rejections(service: Service) -> None:
    """``LabResultRejected`` goes to the contract's fixed ``labs.rejected`` (the ingestion core
    adds a second outbox row for ``<prefix>.labs.LabResultRejected``)."""
    publish = service.store.subject_for

    def subject_for(envelope: Envelope) -> str | None:
        if envelope.event_type == LabResultRejected.event_type:
            return LAB_REJECTED_SUBJECT
        return publish(envelope)

    service.store.subject_for = subject_for


def create_app(service: Service) -> FastAPI:
    """The composition root: the labs port and settings, the routes, the consumers, the MLLP
    listener and the background loops, all around the use cases of :mod:`services.labs.handlers`."""
    settings = LabsSettings()
    labs = Labs(
        SqlLabsStore(),
        unknown_patient_wait=timedelta(seconds=settings.unknown_patient_wait_seconds),
        rejected_also_on=service.topology.event_subject(service.name, LabResultRejected.event_type),
    )
    ingest = ingest_runner(service.store, labs, service.wake_relay)
    route_rejections(service)
    register_all(registry, *private_events.EVENTS)
    service.declare_published(EgfrComputed, UrineResultMeasured, LabResultCorrected, LabResultRejected)
    service.broker.publisher(
        LAB_REJECTED_SUBJECT,
        title="labs.rejected",
        description="Every lab input that was not accepted, with its raw payload, source and reason (contract).",
        schema=envelope_schema(LabResultRejected),
    )
    service.consume(
        "results", service.topology.lab_results_stream, LAB_RESULTS_SUBJECT,
        results_handler(labs, delete_inbound_after_commit(service)),
        workers=settings.consumer_workers, batch_size=settings.batch_size,
    )
    purger = InboundPurger(
        service.store, labs, lambda: service.broker.connection.jetstream(), targets(service.topology),
        interval=settings.purge_interval_seconds,
    )
    service.consume_service("enrollment", enrollment_handler(labs, purger.wake))
    mllp = MllpServer(
        ingest,
        host=service.settings.host, port=mllp_port(),
        idle_timeout=settings.mllp_idle_timeout_seconds, read_timeout=settings.mllp_read_timeout_seconds,
        max_connections=settings.mllp_max_connections,
        max_connections_per_address=settings.mllp_max_connections_per_address,
    )
    service.background.append(mllp.run)
    service.background.append(sweeper(service, labs, settings.sweep_interval))
    service.background.append(purger.run)
    for source in ("broker", "mllp", "fhir"):  # the series exist (at 0) before the first result
        metrics.LAB_RESULTS_ACCEPTED.labels(source=source)
    for target in purger.targets:
        metrics.ERASURE_PURGE_DELETED.labels(stream=target.label)
    return service.app(
        api.routes(service.store, labs, ingest), fhir_api.routes(labs, ingest),
        title="nephrotrack labs", description=__doc__ or "",
    )
