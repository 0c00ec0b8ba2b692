"""The labs service's use cases: ingest lab results (from any channel), learn enrollments and
erasures, sweep parked results, and the bookkeeping of inbound purges. Each is one small
function of a command and a unit of work, writing through the labs port (``labs.tables``, a
:class:`~services.labs.labs_store.LabsStore`); none opens a transaction — its adapter runs it in
one (``store.transact``, or the durable consumer's), and maps what it returns.

Adapters: broker JSON (:mod:`services.labs.consumers`), HL7 v2 over MLLP (:mod:`services.labs.mllp`),
FHIR R4 (:mod:`services.labs.fhir_api`), HTTP JSON (:mod:`services.labs.api`) all end in
:func:`ingest_results`; the purge worker (:mod:`services.labs.purge`) in the purge steps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from services.labs.ingest import Labs, Outcome, Refusal, expired_refusal, ingest_batch, ingest_parked, record_refusals
from services.labs.inputs import IncomingResult
from shared.consumer import InboundMessage
from shared.events import CommandContext, utcnow
from shared.patients import drop_erased_patients, remember_enrollments
from shared.store import EventStore, UnitOfWork

# --- results in ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestResults:
    """Parsed results and the refusals met while parsing, from one message or batch of one
    channel. ``where`` locates each result in its message (``OBX 2``, ``entry[3]``) for the
    reasons of its refusals; ``actor`` is the channel (``labs:mllp``) or the caller."""

    results: Sequence[IncomingResult]
    refusals: Sequence[Refusal] = ()
    where: Sequence[str | None] | None = None
    actor: str = "labs"
    now: datetime = field(default_factory=utcnow)


async def ingest_results(command: IngestResults, uow: UnitOfWork, *, labs: Labs) -> list[Outcome]:
    """Record the refusals, then decide and record the results: one :class:`Outcome` per result."""
    await record_refusals(uow, labs, command.refusals, command.now)
    return await ingest_batch(
        uow, labs, command.results, command.now, where=command.where, context=CommandContext(actor=command.actor)
    )


# --- patients learned from enrollment -----------------------------------------------------------


@dataclass(frozen=True)
class LearnPatients:
    """A batch of enrollment's events (``PatientEnrolled``, ``PatientDataErased``, others ignored)."""

    messages: list[InboundMessage]
    now: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class PatientsLearned:
    enrolled: list[str]
    released: list[Outcome]
    erased: list[str]


async def learn_patients(command: LearnPatients, uow: UnitOfWork, *, labs: Labs) -> PatientsLearned:
    """Remember enrolled patients and, in the same transaction, ingest what was parked for them;
    drop erased patients and erase what labs holds about them (:func:`erase_subjects`)."""
    enrolled = [patient.subject_id for patient in await remember_enrollments(uow, command.messages)]
    released: list[Outcome] = []
    if enrolled:
        released = await ingest_parked(uow, labs, await labs.tables.take_parked_for(uow, enrolled), command.now)
    erased = await drop_erased_patients(uow, command.messages)
    if erased:
        await erase_subjects(EraseSubjects(erased, command.now), uow, labs=labs)
    return PatientsLearned(enrolled, released, erased)


@dataclass(frozen=True)
class EraseSubjects:
    subject_ids: Sequence[str]
    now: datetime = field(default_factory=utcnow)


async def erase_subjects(command: EraseSubjects, uow: UnitOfWork, *, labs: Labs) -> None:
    """Delete what labs holds outside its log about erased subjects (results still parked for
    them, their rows in the rejection log) and request the purge of their lab messages in clear
    from the broker. Their events stay, sealed with the key that is gone (docs/erasure.md)."""
    await labs.tables.delete_about(uow, command.subject_ids)
    await labs.tables.request_purges(uow, command.subject_ids, command.now)


# --- parked results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepParked:
    now: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class Swept:
    released: list[Outcome]
    expired: int
    still_parked: int


async def sweep_parked(command: SweepParked, uow: UnitOfWork, *, labs: Labs) -> Swept:
    """Release parked results whose subject is known by now (an enrollment that committed while
    the result was being parked), then refuse (``unknown_subject``) those that waited longer
    than the configured wait."""
    released = await ingest_parked(uow, labs, await labs.tables.take_parked_of_known(uow), command.now)
    wait = labs.unknown_patient_wait
    expired = await labs.tables.take_parked_before(uow, command.now - wait)
    await record_refusals(uow, labs, [expired_refusal(parked, wait) for parked in expired], command.now)
    return Swept(released, len(expired), await labs.tables.parked_count(uow))


# --- inbound purges (services/labs/purge.py) ----------------------------------------------------


@dataclass(frozen=True)
class StartPurges:
    limit: int


async def start_purges(command: StartPurges, uow: UnitOfWork, *, labs: Labs) -> list[str]:
    """The subjects of up to ``limit`` pending purge jobs, oldest first (one more attempt each)."""
    return await labs.tables.start_purges(uow, command.limit)


@dataclass(frozen=True)
class CountPurged:
    target: str
    deleted: Mapping[str, int]


async def count_purged(command: CountPurged, uow: UnitOfWork, *, labs: Labs) -> None:
    """Add the messages a pass deleted from one target to the subjects' jobs."""
    await labs.tables.count_purged(uow, command.target, command.deleted)


@dataclass(frozen=True)
class FinishPurges:
    subject_ids: Sequence[str]
    error: str | None = None
    """Why the pass failed (the jobs stay pending), or ``None``: done."""
    now: datetime = field(default_factory=utcnow)


async def finish_purges(command: FinishPurges, uow: UnitOfWork, *, labs: Labs) -> None:
    if command.error is None:
        await labs.tables.finish_purges(uow, command.subject_ids, command.now)
    else:
        await labs.tables.fail_purges(uow, command.subject_ids, command.error)


# --- the runner the result adapters share -------------------------------------------------------

IngestRunner = Callable[[IngestResults], Awaitable[list[Outcome]]]


def ingest_runner(store: EventStore, labs: Labs, committed: Callable[[], None] = lambda: None) -> IngestRunner:
    """:func:`ingest_results` through the one command runner (``store.transact``: a concurrent
    writer's conflict is retried, one that outlasts the retries raises ``shared.errors.Conflict``),
    then ``committed()`` (it wakes the relay)."""

    async def run(command: IngestResults) -> list[Outcome]:
        outcomes = await store.transact(lambda uow: ingest_results(command, uow, labs=labs))
        committed()
        return outcomes

    return run
