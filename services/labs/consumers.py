"""The labs service's broker adapters and background loop: ``labs.results`` batches, enrollment's
events, and the sweep of parked results. Each parses, runs a use case of
:mod:`services.labs.handlers` in the consumer's transaction, and maps what it returns to the
effects outside the store (waking the relay or the purge worker, deleting inbound messages).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from services.labs.broker_messages import parse_broker_result
from services.labs.handlers import (
    IngestResults,
    LearnPatients,
    SweepParked,
    ingest_results,
    learn_patients,
    sweep_parked,
)
from services.labs.ingest import ERASED, Labs, Refusal, refusal_subject
from services.labs.inputs import LabRejection
from services.labs.redaction import carries_personal_data
from shared import metrics
from shared.consumer import BatchHandler, InboundMessage
from shared.service import BackgroundTask, Service
from shared.store import UnitOfWork

log = structlog.get_logger(__name__)

DeleteInbound = Callable[[UnitOfWork, list[InboundMessage]], None]
"""Deletes these ``labs.results`` messages from the inbound stream once ``uow`` has committed."""


def results_handler(labs: Labs, delete_inbound: DeleteInbound | None = None) -> BatchHandler:
    """``labs.results`` batches (already de-duplicated by the inbox): parse, then one ingest.
    The messages that carried personal identifiers — in fields labs does not read, in a refused
    payload, or about an erased patient — go to ``delete_inbound``
    (:func:`delete_inbound_after_commit`)."""

    async def on_results(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        results = []
        carriers: list[InboundMessage] = []  # the message of each parsed result, in order
        refusals = []
        personal = []
        for message in messages:
            try:
                result = parse_broker_result(message.data, message.headers)
            except LabRejection as rejection:
                refusal = Refusal.of_input(rejection, "broker", message.data)
                refusals.append(refusal)
                if _personal_refusal(uow, refusal):
                    personal.append(message)
                continue
            results.append(result)
            carriers.append(message)
            if carries_personal_data(None, result.raw):  # identifiers in fields we do not read
                personal.append(message)
        outcomes = await ingest_results(IngestResults(results, refusals, actor="labs:broker"), uow, labs=labs)
        # A result about an erased patient is refused without naming them; its inbound copy goes too.
        personal += [m for m, o in zip(carriers, outcomes, strict=True) if o.rejection and o.rejection.code == ERASED]
        if personal and delete_inbound is not None:
            delete_inbound(uow, personal)

    return on_results


def _personal_refusal(uow: UnitOfWork, refusal: Refusal) -> bool:
    """Whether a refused message names an erased patient or carries personal identifiers."""
    subject_id = refusal_subject(refusal)  # an erased patient's: recorded without naming them
    erased = subject_id is not None and uow.store.codec.is_erased(subject_id)
    return erased or carries_personal_data(refusal.rejection.code, refusal.raw)


def delete_inbound_after_commit(service: Service) -> DeleteInbound:
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

    def delete_inbound(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        def on_commit() -> None:
            for message in messages:
                task = asyncio.get_running_loop().create_task(delete(message.stream, message.stream_sequence))
                pending.add(task)
                task.add_done_callback(pending.discard)

        uow.on_commit(on_commit)

    return delete_inbound


def enrollment_handler(labs: Labs, purge_requested: Callable[[], None] | None = None) -> BatchHandler:
    """Enrollment's events: :func:`~services.labs.handlers.learn_patients`; ``purge_requested``
    is called once an erasure's purge request committed (it wakes the purge worker)."""

    async def on_enrollment(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        learned = await learn_patients(LearnPatients(messages), uow, labs=labs)
        if learned.erased and purge_requested is not None:
            uow.on_commit(purge_requested)

    return on_enrollment


def sweeper(service: Service, labs: Labs, interval: float) -> BackgroundTask:
    """The background loop that runs :func:`~services.labs.handlers.sweep_parked` every ``interval``."""

    async def sweep_parked_results() -> None:
        while True:
            swept = await service.store.transact(lambda uow: sweep_parked(SweepParked(), uow, labs=labs))
            if swept.released or swept.expired:
                service.wake_relay()
                log.info("parked lab results swept", released=len(swept.released), expired=swept.expired,
                         parked=swept.still_parked)
            metrics.LAB_RESULTS_PARKED.set(swept.still_parked)
            await asyncio.sleep(interval)

    return sweep_parked_results
