"""The ingestion step behind every lab input (broker JSON, HL7 v2 over MLLP, FHIR R4, HTTP JSON),
shared by the use cases that ingest (:mod:`services.labs.handlers`: ingest, release, sweep).

An adapter parses its payload into :class:`~services.labs.inputs.IncomingResult` items (the
pure parsers of this package); a use case hands them, a whole batch at a time, to
:func:`ingest_batch` inside one unit of work. Every item ends in exactly one :class:`Outcome`:

- ``accepted``: recorded on ``labresult-<result_id>`` (``LabResultRecorded`` and, when the
  effective eGFR changed, ``LabResultCorrected``/``EgfrComputed``);
- ``duplicate``: that message was already recorded for that result id (no effect);
- ``parked``: the subject is not enrolled with the labs service (yet): the result waits among
  the parked results until the ``PatientEnrolled`` arrives (release) or the configured wait
  expires (sweep, then ``unknown_subject``);
- ``rejected``: a ``LabResultRejected`` event is recorded on its own ``rejection-<uuid>``
  stream; the outbox publishes it on ``labs.rejected`` (contract) and on
  ``<prefix>.labs.LabResultRejected`` (the service's own stream), in the same transaction.

Refusals an adapter meets before it has a result (unparseable payload, a bad OBX) go through
:func:`record_refusals`, the same path. Nothing is dropped silently.

Batching (the broker consumer hands in ~500 results at once): one query for the batch's known
patients, one ``read_streams`` for all its result ids, decisions in memory (several results for
one result id in a batch are folded one after the other), one ``append_many`` for every new
event, one insert each for the result-id index and for parked rows. Metrics are counted only
when the transaction commits.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from contracts.labs import LabResultRejected, Source
from services.labs.catalogue import validate_result
from services.labs.domain import ResultState, decide_result, evolve, stream_id
from services.labs.inputs import IncomingResult, LabRejection, raw_for_report, rejection_event
from services.labs.labs_store import LabsStore, LoggedRejection, ParkedResult
from services.labs.redaction import looks_personal, redact, redact_reason, redact_subject
from services.labs.refused_subject import refused_subject
from shared import metrics
from shared.events import CommandContext, DomainEvent, Envelope, registry
from shared.moments import as_utc
from shared.store import UnitOfWork

RAW_LIMIT = 100_000
"""Characters of the raw payload kept in a ``LabResultRejected`` (and in a parked row). A NATS
message is at most 1 MB by default; a JSON-escaped control character takes 6 bytes, so 100,000
characters always fit. Longer payloads are cut, with a note of how much was cut."""

RAW_PREVIEW = 2000
"""Characters of the raw payload kept in the rejection log that ``GET /v1/rejections`` shows (the
whole capped payload is in the published event)."""
ERASED = "subject_erased"
"""Rejection code of a result about a patient whose data was erased."""
RESULT_STREAM_PREFIX = "labresult-"
REJECTION_STREAM_PREFIX = "rejection-"
_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")


# --------------------------------------------------------------------------- outcomes

OutcomeKind = Literal["accepted", "duplicate", "parked", "rejected"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one incoming result. ``events`` are the events recorded for it (accepted);
    ``rejection`` the refusal (rejected), its reason prefixed with the adapter's location
    (``OBX 2: …``, ``entry[3]: …``) when one was given."""

    kind: OutcomeKind
    result: IncomingResult
    rejection: LabRejection | None = None
    events: tuple[DomainEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal to record and publish: the rejection, the channel, and (optionally) the raw
    payload to report when the rejection does not carry it (e.g. undecodable bytes)."""

    rejection: LabRejection
    source: Source
    raw: str | None = None

    @classmethod
    def of_input(cls, rejection: LabRejection, source: Source, data: bytes, limit: int = 1 << 20) -> Refusal:
        """The refusal of an input its parser refused: reported with the raw text the parser read,
        else with the input's bytes as text (:func:`~services.labs.inputs.raw_for_report`)."""
        return cls(rejection, source, rejection.raw if rejection.raw is not None else raw_for_report(data, limit))


def cap(text: str, limit: int = RAW_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def code_label(code: str | None) -> str:
    """The bounded metric label of a rejection code (codes are a closed set in the parsers; this
    guards the label against anything else)."""
    return code if code and _CODE.fullmatch(code) else "other"


# --------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class Labs:
    """What the labs use cases need besides the unit of work: the labs tables (a
    :class:`~services.labs.labs_store.LabsStore`) and the service's settings.

    ``rejected_also_on``: a second subject every ``LabResultRejected`` is published on (the
    service's own ``<prefix>.labs.LabResultRejected``), besides the store's subject for it
    (``labs.rejected``, set by the app).
    """

    tables: LabsStore
    unknown_patient_wait: timedelta = timedelta(days=1)
    rejected_also_on: str | None = None


async def ingest_batch(
    uow: UnitOfWork,
    labs: Labs,
    incoming: Sequence[IncomingResult],
    now: datetime,
    *,
    where: Sequence[str | None] | None = None,
    context: CommandContext | None = None,
) -> list[Outcome]:
    """Decide and record a batch of results in ``uow``; one :class:`Outcome` per item, in order.

    ``where`` (same length as ``incoming``) prefixes each rejection reason with the item's
    location in its message, for the sender's ACK and for ``labs.rejected``.
    """
    if not incoming:
        return []
    outcomes: list[Outcome | None] = [None] * len(incoming)
    patients = await labs.tables.known_patients(uow, [result.subject_id for result in incoming])

    def reject(index: int, rejection: LabRejection) -> None:
        label = where[index] if where is not None else None
        if label:
            rejection = LabRejection(
                f"{label}: {rejection.reason}", rejection.code, message_id=rejection.message_id,
                subject_id=rejection.subject_id, raw=rejection.raw,
            )
        outcomes[index] = Outcome("rejected", incoming[index], rejection)

    to_decide: list[int] = []
    to_park: list[int] = []
    for index, result in enumerate(incoming):
        if result.subject_id in patients:
            to_decide.append(index)
            continue
        if uow.store.codec.is_erased(result.subject_id):
            reject(index, _erased(result))
            continue
        try:  # refuse now what no enrollment can fix, rather than hold it for a day
            validate_result(result, now)
        except LabRejection as rejection:
            reject(index, rejection)
        else:
            to_park.append(index)
            outcomes[index] = Outcome("parked", result)

    stream_ids = list(dict.fromkeys(stream_id(incoming[i].result_id) for i in to_decide))
    histories = await uow.read_streams(stream_ids) if stream_ids else {}
    versions = {sid: len(history) for sid, history in histories.items()}
    states: dict[str, ResultState | None] = {
        sid: _fold(history) if history else None for sid, history in histories.items()
    }
    pending: dict[str, list[DomainEvent]] = {}
    for index in to_decide:
        result = incoming[index]
        sid = stream_id(result.result_id)
        state = states[sid]
        try:
            new_events = decide_result(state, result, patients[result.subject_id], now=now)
        except LabRejection as rejection:
            reject(index, rejection)
            continue
        except ValueError as error:  # CKD-EPI undefined, e.g. a negative age on collection
            reject(index, LabRejection(
                f"eGFR cannot be computed: {error}", "egfr_not_computable",
                message_id=result.message_id, subject_id=result.subject_id, raw=result.raw,
            ))
            continue
        if not new_events:
            outcomes[index] = Outcome("duplicate", result)
            continue
        for new_event in new_events:
            state = evolve(state, new_event)
        states[sid] = state
        pending.setdefault(sid, []).extend(new_events)
        outcomes[index] = Outcome("accepted", result, events=tuple(new_events))

    if pending:
        await uow.append_many(
            [(sid, new_events, versions[sid]) for sid, new_events in pending.items()],
            context or CommandContext(actor="labs"),
        )
        # Only new streams: had another writer created one meanwhile, its event at version 1
        # would already have made this append fail.
        await labs.tables.index_results(uow, [
            (sid[len(RESULT_STREAM_PREFIX):], new_events[0].subject_id)  # type: ignore[attr-defined]
            for sid, new_events in pending.items()
            if versions[sid] == 0
        ])
    if to_park:
        await labs.tables.park(uow, [_parked(incoming[i], now) for i in to_park])

    done = [outcome for outcome in outcomes if outcome is not None]
    assert len(done) == len(incoming)
    refusals = [Refusal(o.rejection, o.result.source) for o in done if o.rejection is not None]
    if refusals:
        await record_refusals(uow, labs, refusals, now)
    _count_on_commit(uow, done)
    return done


async def record_refusals(uow: UnitOfWork, labs: Labs, refusals: Sequence[Refusal], now: datetime) -> list[Envelope]:
    """Record each refusal as a ``LabResultRejected`` (published on ``labs.rejected`` by the
    outbox), log it for ``GET /v1/rejections`` and count it (on commit)."""
    if not refusals:
        return []
    rejected = [_rejected_event(refusal, uow.store.codec.is_erased) for refusal in refusals]
    envelopes = await uow.append_many(
        [(f"{REJECTION_STREAM_PREFIX}{uuid.uuid4().hex}", [item], 0) for item in rejected],
        CommandContext(actor="labs"),
    )
    await labs.tables.log_rejections(uow, [
        LoggedRejection(
            event_id=envelope.event_id, recorded_at=now, source=item.source, code=code_label(item.code),
            reason=_sql_text(item.reason) or "", message_id=_sql_text(item.message_id),
            subject_id=_sql_text(item.subject_id), raw_preview=_sql_text(cap(item.raw, RAW_PREVIEW)) or "",
        )
        for envelope, item in zip(envelopes, rejected, strict=True)
    ])
    if labs.rejected_also_on:
        await labs.tables.publish_also(uow, [
            {
                "event_id": envelope.event_id, "subject": labs.rejected_also_on,
                "body": envelope.model_dump_json().encode(), "created_at": envelope.recorded_at,
            }
            for envelope in envelopes
        ])
    labels = [(item.source, code_label(item.code)) for item in rejected]

    def count() -> None:
        for source, code in labels:
            metrics.LAB_RESULTS_REJECTED.labels(source=source, reason=code).inc()

    uow.on_commit(count)
    return envelopes


async def ingest_parked(uow: UnitOfWork, labs: Labs, parked: Sequence[ParkedResult], now: datetime) -> list[Outcome]:
    """Ingest results that were parked, in arrival order (a correction after its original)."""
    incoming = [IncomingResult.model_validate_json(item.payload) for item in sorted(parked, key=lambda p: p.id)]
    return await ingest_batch(uow, labs, incoming, now, context=CommandContext(actor="labs:released"))


def expired_refusal(parked: ParkedResult, wait: timedelta) -> Refusal:
    """The refusal (``unknown_subject``) of a result that waited ``wait`` for an enrollment."""
    result = IncomingResult.model_validate_json(parked.payload)
    return Refusal(LabRejection(
        f"subject {result.subject_id} is not enrolled: the result waited "
        f"{_seconds(wait)} for the enrollment (parked at {as_utc(parked.parked_at).isoformat()})",
        "unknown_subject", message_id=result.message_id, subject_id=result.subject_id, raw=result.raw,
    ), result.source)


def _parked(result: IncomingResult, now: datetime) -> ParkedResult:
    # The raw copy is kept for a later refusal's report: without identifiers.
    payload = result.model_copy(update={"raw": redact(cap(result.raw)) or ""}).model_dump_json()
    return ParkedResult(result.source, result.message_id, result.result_id, result.subject_id, payload, now)


def _erased(result: IncomingResult) -> LabRejection:
    """The refusal of a result about a patient whose data was erased: it must not bring the
    patient back (no parking, no event naming them), so neither the refusal's subject nor its
    raw payload names them — docs/erasure.md."""
    return LabRejection(
        "the subject's data was erased at their request (consent withdrawn): results about them are "
        "no longer accepted; the subject id is not recorded",
        ERASED, message_id=redact(result.message_id, also=(result.subject_id,)), subject_id=None,
        raw=redact(result.raw, also=(result.subject_id,)),
    )


def _fold(history: Sequence[Envelope]) -> ResultState | None:
    state: ResultState | None = None
    for envelope in history:
        state = evolve(state, registry.decode(envelope.event_type, envelope.schema_version, envelope.payload))
    return state


def refusal_subject(refusal: Refusal) -> str | None:
    """The subject a refusal is about: the one its parser read, else — a whole message refused —
    the study pseudonym its raw input names (services/labs/refused_subject.py), so that the
    refusal is sealed with that patient's key and erased with their data."""
    rejection = refusal.rejection
    raw = refusal.raw if refusal.raw is not None else rejection.raw
    return rejection.subject_id or refused_subject(refusal.source, raw)


def _rejected_event(refusal: Refusal, is_erased: Callable[[str], bool] = lambda s: False) -> LabResultRejected:
    rejection = refusal.rejection
    raw = refusal.raw if refusal.raw is not None else (rejection.raw or "")
    subject_id = refusal_subject(refusal)
    # No personal identifiers are recorded, not even from refused input (services/labs/redaction.py),
    # nor the id of a patient whose data were erased (docs/erasure.md).
    erased = bool(subject_id) and is_erased(subject_id)
    personal = (subject_id,) if subject_id and (erased or looks_personal(subject_id)) else ()
    item = rejection_event(rejection, source=refusal.source, raw=_clean(cap(redact(raw, also=personal) or "")))
    updates: dict[str, Any] = {
        "reason": redact_reason(item.reason, also=personal),
        "message_id": redact(item.message_id, also=personal),
        "subject_id": None if erased else redact_subject(subject_id),
    }
    for name, limit in (("reason", 2000), ("message_id", 200), ("subject_id", 200)):
        value = updates[name]
        if value is not None:
            updates[name] = _clean(cap(value, limit))
    updates = {name: value for name, value in updates.items() if value != getattr(item, name)}
    return item.model_copy(update=updates) if updates else item


def _clean(text: str) -> str:
    """Lone surrogates (possible in JSON strings like "\\ud800") cannot be encoded as UTF-8 for
    the database or the broker: keep them visible as escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _count_on_commit(uow: UnitOfWork, outcomes: Sequence[Outcome]) -> None:
    accepted: dict[str, int] = {}
    duplicates: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.kind == "accepted":
            accepted[outcome.result.source] = accepted.get(outcome.result.source, 0) + 1
        elif outcome.kind == "duplicate":
            duplicates[outcome.result.source] = duplicates.get(outcome.result.source, 0) + 1
    if not accepted and not duplicates:
        return

    def count() -> None:
        for source, n in accepted.items():
            metrics.LAB_RESULTS_ACCEPTED.labels(source=source).inc(n)
        for source, n in duplicates.items():
            metrics.LAB_RESULTS_DUPLICATE.labels(source=source).inc(n)

    uow.on_commit(count)


def _sql_text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL characters (garbage input may): show them escaped."""
    return value.replace("\x00", "\\x00") if value else value


def _seconds(wait: timedelta) -> str:
    seconds = wait.total_seconds()
    return f"{seconds:g} s" if seconds < 3600 else f"{seconds / 3600:g} h"
