"""The labs service process: lab results in (NATS ``labs.results``, HL7 v2 over MLLP, FHIR R4, HTTP
JSON), one ingestion core, eGFR (CKD-EPI 2021) out; every refusal published on ``labs.rejected``.

See docs/labs.md for the inputs, mappings, rejection codes and limits.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from fastapi import FastAPI

from contracts import register_all
from contracts.labs import EgfrComputed, LabResultCorrected, LabResultRejected
from services.labs import api, fhir_api
from services.labs import events as private_events
from services.labs.broker_messages import parse_broker_result
from services.labs.domain import LabRejection, raw_for_report
from services.labs.ingest import ERASED, LabIngestion, LabsSettings, Refusal, refusal_subject
from services.labs.mllp import MllpServer
from services.labs.purge import InboundPurger, request_purges, targets
from services.labs.redaction import carries_personal_data
from shared import metrics
from shared.asyncapi import envelope_schema
from shared.broker import LAB_REJECTED_SUBJECT, LAB_RESULTS_SUBJECT
from shared.consumer import BatchHandler, InboundMessage
from shared.events import CommandContext, Envelope, registry
from shared.patients import drop_erased_patients, remember_enrollments
from shared.service import Service
from shared.settings import mllp_port
from shared.store import UnitOfWork

log = structlog.get_logger(__name__)

# The pull loops of one consumer (Service.consume(workers=…)): FastStream's AsyncAPI generator notes
# that they share a channel name (and documents it once, which is right).
warnings.filterwarnings("ignore", message="Overwrite channel handler", category=RuntimeWarning)


def broker_handler(labs: LabIngestion, forget: Forget | None = None) -> BatchHandler:
    """``labs.results`` batches (already de-duplicated by the inbox): parse, then one ingest.
    ``forget``: what to do with messages that carried personal identifiers (delete them from
    the inbound stream once what was kept of them committed, see :func:`forget_after_commit`)."""

    async def on_results(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        now = datetime.now(UTC)
        results = []
        carriers: list[InboundMessage] = []  # the message of each parsed result, in order
        refusals = []
        personal = []
        for message in messages:
            try:
                result = parse_broker_result(message.data, message.headers)
                results.append(result)
                carriers.append(message)
                if carries_personal_data(None, result.raw):  # identifiers in fields we do not read
                    personal.append(message)
            except LabRejection as rejection:
                raw = rejection.raw if rejection.raw is not None else raw_for_report(message.data)
                refusal = Refusal(rejection, "broker", raw)
                refusals.append(refusal)
                subject_id = refusal_subject(refusal)  # an erased patient's: recorded without naming them
                erased = subject_id is not None and uow.store.codec.is_erased(subject_id)
                if erased or carries_personal_data(rejection.code, raw):
                    personal.append(message)
        await labs.record_rejections(uow, refusals, now)
        outcomes = await labs.ingest(uow, results, now, context=CommandContext(actor="labs:broker"))
        # A result about an erased patient is refused without naming them; its inbound copy goes too.
        personal += [m for m, o in zip(carriers, outcomes, strict=True) if o.rejection and o.rejection.code == ERASED]
        if personal and forget is not None:
            forget(uow, personal)

    return on_results


Forget = Callable[[UnitOfWork, list[InboundMessage]], None]


def forget_after_commit(service: Service) -> Forget:
    """``labs.results`` messages that carried personal identifiers (a subject id that is personal
    data, or names, birth dates, MRNs in fields we do not read) are deleted from the inbound stream
    (JetStream erases them) once what labs keeps of them has committed: the result, or the refusal
    with its raw payload redacted (the record the contract asks for on ``labs.rejected``). So no
    copy with the identifiers stays in the broker (docs/robustness.md). Messages without
    identifiers are left alone; a failed deletion is logged (the labs NATS user needs
    ``$JS.API.STREAM.MSG.DELETE.LABS_RESULTS``)."""
    pending: set[asyncio.Task[None]] = set()

    async def delete(stream: str, sequence: int) -> None:
        try:
            await service.broker.connection.jetstream().delete_msg(stream, sequence)
        except Exception as error:  # noqa: BLE001 - best effort; the refusal is recorded anyway
            log.warning("refused message with personal data not deleted from the inbound stream",
                        stream=stream, sequence=sequence, error=type(error).__name__)

    def forget(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        def on_commit() -> None:
            for message in messages:
                task = asyncio.get_running_loop().create_task(delete(message.stream, message.stream_sequence))
                pending.add(task)
                task.add_done_callback(pending.discard)

        uow.on_commit(on_commit)

    return forget


def enrollment_handler(labs: LabIngestion, purge_requested: Callable[[], None] | None = None) -> BatchHandler:
    """Learn enrolled patients, and in the same transaction ingest what was parked for them;
    forget erased patients, with any result still parked for them and their rows in the
    rejection log (``GET /v1/rejections``), and record the purge of
    their lab messages in clear from the broker (docs/erasure.md); ``purge_requested`` is called
    once that commits (it wakes the purge worker)."""

    async def on_enrollment(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        enrolled = await remember_enrollments(uow, messages)
        if enrolled:
            await labs.release_parked(uow, [patient.subject_id for patient in enrolled], datetime.now(UTC))
        erased = await drop_erased_patients(uow, messages)
        if erased:
            await labs.forget(uow, erased)
            await request_purges(uow, erased, datetime.now(UTC))
            if purge_requested is not None:
                uow.on_commit(purge_requested)

    return on_enrollment


def sweeper(service: Service, labs: LabIngestion, interval: float):  # type: ignore[no-untyped-def]
    async def sweep_parked_results() -> None:
        while True:
            async with service.store.transaction() as uow:
                released, expired = await labs.sweep(uow, datetime.now(UTC))
                parked = await labs.parked_count(uow)
            if released or expired:
                service.wake_relay()
                log.info("parked lab results swept", released=len(released), expired=expired, parked=parked)
            metrics.LAB_RESULTS_PARKED.set(parked)
            await asyncio.sleep(interval)

    return sweep_parked_results


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
    settings = LabsSettings()
    labs = LabIngestion(
        unknown_patient_wait=settings.unknown_patient_wait_seconds,
        rejected_also_on=service.topology.event_subject(service.name, LabResultRejected.event_type),
    )
    route_rejections(service)
    register_all(registry, *private_events.EVENTS)
    service.declare_published(EgfrComputed, LabResultCorrected, LabResultRejected)
    service.broker.publisher(
        LAB_REJECTED_SUBJECT,
        title="labs.rejected",
        description="Every lab input that was not accepted, with its raw payload, source and reason (contract).",
        schema=envelope_schema(LabResultRejected),
    )
    service.consume(
        "results", service.topology.lab_results_stream, LAB_RESULTS_SUBJECT,
        broker_handler(labs, forget_after_commit(service)),
        workers=settings.consumer_workers, batch_size=settings.batch_size,
    )
    purger = InboundPurger(
        service.store, lambda: service.broker.connection.jetstream(), targets(service.topology),
        interval=settings.purge_interval_seconds,
    )
    service.consume_service("enrollment", enrollment_handler(labs, purger.wake))
    mllp = MllpServer(
        service.store, labs,
        host=service.settings.host, port=mllp_port(),
        idle_timeout=settings.mllp_idle_timeout_seconds, read_timeout=settings.mllp_read_timeout_seconds,
        max_connections=settings.mllp_max_connections,
        max_connections_per_address=settings.mllp_max_connections_per_address, committed=service.wake_relay,
    )
    service.background.append(mllp.run)
    service.background.append(sweeper(service, labs, settings.sweep_interval))
    service.background.append(purger.run)
    for source in ("broker", "mllp", "fhir"):  # the series exist (at 0) before the first result
        metrics.LAB_RESULTS_ACCEPTED.labels(source=source)
    for target in purger.targets:
        metrics.ERASURE_PURGE_DELETED.labels(stream=target.label)
    return service.app(
        api.routes(service, labs), fhir_api.routes(service, labs), title="nephrotrack labs", description=__doc__ or ""
    )
