"""The one ingestion core behind every lab input (broker JSON, HL7 v2 over MLLP, FHIR R4, HTTP JSON).

An adapter parses its payload into :class:`~services.labs.domain.IncomingResult` items (the
pure parsers of this package) and hands them, a whole batch at a time, to
:meth:`LabIngestion.ingest` inside one database transaction. Every item ends in exactly one
:class:`Outcome`:

- ``accepted``: recorded on ``labresult-<result_id>`` (``LabResultRecorded`` and, when the
  effective eGFR changed, ``LabResultCorrected``/``EgfrComputed``);
- ``duplicate``: that message was already recorded for that result id (no effect);
- ``parked``: the subject is not enrolled with the labs service (yet): the result waits in
  ``parked_results`` until the ``PatientEnrolled`` arrives (:meth:`LabIngestion.release_parked`)
  or the configured wait expires (:meth:`LabIngestion.sweep`, then ``unknown_subject``);
- ``rejected``: a ``LabResultRejected`` event is recorded on its own ``rejection-<uuid>``
  stream; the outbox publishes it on ``labs.rejected`` (contract) and on
  ``<prefix>.labs.LabResultRejected`` (the service's own stream), in the same transaction.

Refusals an adapter meets before it has a result (unparseable payload, a bad OBX) go through
:meth:`LabIngestion.record_rejections`, the same path. Nothing is dropped silently.

Batching (the broker consumer hands in ~500 results at once): one query for the batch's known
patients, one ``read_streams`` for all its result ids, decisions in memory (several results for
one result id in a batch are folded one after the other), one ``append_many`` for every new
event, one insert each for the result-id index and for parked rows. Metrics are counted only
when the transaction commits.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from contracts.labs import LabResultRejected, Source
from services.labs.domain import (
    IncomingResult,
    KnownPatient,
    LabRejection,
    ResultState,
    decide_result,
    evolve,
    rejection_event,
    stream_id,
    validate_result,
)
from services.labs.redaction import looks_personal, redact, redact_reason, redact_subject
from services.labs.refused_subject import refused_subject
from shared import metrics
from shared.database import one_of
from shared.events import CommandContext, DomainEvent, Envelope, registry
from shared.schema import known_patients, outbox
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


class LabsSettings(BaseSettings):
    """The labs service's own settings (environment variables)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    unknown_patient_wait_seconds: float = Field(
        default=86_400, gt=0, alias="NEPHROTRACK_LABS_UNKNOWN_PATIENT_WAIT_SECONDS"
    )
    """How long a result for a subject the labs service has not seen enrolled is held."""
    park_sweep_seconds: float | None = Field(default=None, gt=0, alias="NEPHROTRACK_LABS_PARK_SWEEP_SECONDS")
    """How often parked results are checked (default: a quarter of the wait, 0.2-10 s)."""
    batch_size: int = Field(default=500, ge=1, le=5000, alias="NEPHROTRACK_LABS_BATCH_SIZE")
    consumer_workers: int = Field(default=2, ge=1, le=16, alias="NEPHROTRACK_LABS_CONSUMER_WORKERS")
    """Concurrent pull loops (each its own transaction) on the ``labs.results`` durable consumer."""
    purge_interval_seconds: float = Field(default=30, gt=0, alias="NEPHROTRACK_LABS_PURGE_INTERVAL_SECONDS")
    """How often pending inbound purges are looked for (an erasure handled by this process
    starts its purge at once; this catches the rest, e.g. jobs left by a crash)."""
    mllp_idle_timeout_seconds: float = Field(default=60, gt=0, alias="NEPHROTRACK_MLLP_IDLE_TIMEOUT_SECONDS")
    """How long an MLLP connection may wait between messages (lab systems reconnect when closed)."""
    mllp_read_timeout_seconds: float = Field(default=30, gt=0, alias="NEPHROTRACK_MLLP_READ_TIMEOUT_SECONDS")
    """Deadline of one MLLP frame, from its first byte to its end block."""
    mllp_max_connections: int = Field(default=100, ge=1, alias="NEPHROTRACK_MLLP_MAX_CONNECTIONS")
    mllp_max_connections_per_address: int = Field(
        default=10, ge=1, alias="NEPHROTRACK_MLLP_MAX_CONNECTIONS_PER_ADDRESS"
    )
    """So that one peer address cannot take all ``mllp_max_connections`` and lock the labs out."""

    @property
    def sweep_interval(self) -> float:
        if self.park_sweep_seconds is not None:
            return self.park_sweep_seconds
        return min(10.0, max(0.2, self.unknown_patient_wait_seconds / 4))


# --------------------------------------------------------------------------- tables

labs_metadata = MetaData()
_Id = BigInteger().with_variant(Integer(), "sqlite")

parked_results = Table(
    "parked_results",
    labs_metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("source", String(10), nullable=False),
    Column("message_id", String(200), nullable=False),
    Column("result_id", String(200), nullable=False),
    Column("subject_id", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False),
)

lab_result_index = Table(
    "lab_result_index",
    labs_metadata,
    Column("result_id", String(200), primary_key=True),
    Column("subject_id", String(64), nullable=False),
)

lab_rejections = Table(
    "lab_rejections",
    labs_metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("event_id", Uuid, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("source", String(10), nullable=False),
    Column("code", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("message_id", Text, nullable=True),
    Column("subject_id", Text, nullable=True),
    Column("raw_preview", Text, nullable=False),
)


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


def cap(text: str, limit: int = RAW_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def code_label(code: str | None) -> str:
    """The bounded metric label of a rejection code (codes are a closed set in the parsers; this
    guards the label against anything else)."""
    return code if code and _CODE.fullmatch(code) else "other"


# --------------------------------------------------------------------------- the core


class LabIngestion:
    """The ingestion core, bound to the service's settings.

    ``rejected_also_on``: a second subject every ``LabResultRejected`` is published on (the
    service's own ``<prefix>.labs.LabResultRejected``), besides the store's subject for it
    (``labs.rejected``, set by the app).
    """

    def __init__(self, *, unknown_patient_wait: float = 86_400, rejected_also_on: str | None = None) -> None:
        self.unknown_patient_wait = timedelta(seconds=unknown_patient_wait)
        self.rejected_also_on = rejected_also_on

    async def ingest(
        self,
        uow: UnitOfWork,
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
        patients = await self._patients(uow, {result.subject_id for result in incoming})

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
            index_rows = [
                {"result_id": sid[len(RESULT_STREAM_PREFIX):], "subject_id": new_events[0].subject_id}  # type: ignore[attr-defined]
                for sid, new_events in pending.items()
                if versions[sid] == 0
            ]
            # Only new streams: had another writer created one meanwhile, its event at version 1
            # would already have made this append fail.
            await uow.insert_rows(lab_result_index, index_rows)
        if to_park:
            await self._park(uow, [incoming[i] for i in to_park], now)

        done = [outcome for outcome in outcomes if outcome is not None]
        assert len(done) == len(incoming)
        refusals = [Refusal(o.rejection, o.result.source) for o in done if o.rejection is not None]
        if refusals:
            await self.record_rejections(uow, refusals, now)
        _count_on_commit(uow, done)
        return done

    async def record_rejections(
        self, uow: UnitOfWork, refusals: Sequence[Refusal], now: datetime | None = None
    ) -> list[Envelope]:
        """Record each refusal as a ``LabResultRejected`` (published on ``labs.rejected`` by the
        outbox), log it for ``GET /v1/rejections`` and count it (on commit)."""
        if not refusals:
            return []
        rejected = [_rejected_event(refusal, uow.store.codec.is_erased) for refusal in refusals]
        envelopes = await uow.append_many(
            [(f"{REJECTION_STREAM_PREFIX}{uuid.uuid4().hex}", [item], 0) for item in rejected],
            CommandContext(actor="labs"),
        )
        recorded_at = now or datetime.now(UTC)
        await uow.connection.execute(
            insert(lab_rejections),
            [
                {
                    "event_id": envelope.event_id, "recorded_at": recorded_at, "source": item.source,
                    "code": code_label(item.code), "reason": _sql_text(item.reason),
                    "message_id": _sql_text(item.message_id), "subject_id": _sql_text(item.subject_id),
                    "raw_preview": _sql_text(cap(item.raw, RAW_PREVIEW)),
                }
                for envelope, item in zip(envelopes, rejected, strict=True)
            ],
        )
        if self.rejected_also_on:
            await uow.insert_rows(
                outbox,
                [
                    {
                        "event_id": envelope.event_id, "subject": self.rejected_also_on,
                        "body": envelope.model_dump_json().encode(), "created_at": envelope.recorded_at,
                    }
                    for envelope in envelopes
                ],
            )
        labels = [(item.source, code_label(item.code)) for item in rejected]

        def count() -> None:
            for source, code in labels:
                metrics.LAB_RESULTS_REJECTED.labels(source=source, reason=code).inc()

        uow.on_commit(count)
        return envelopes

    async def release_parked(self, uow: UnitOfWork, subject_ids: Iterable[str], now: datetime) -> list[Outcome]:
        """Ingest the results parked for these (now enrolled) subjects, oldest first."""
        subject_ids = list(dict.fromkeys(subject_ids))
        rows: list[Any] = []
        for start in range(0, len(subject_ids), 500):
            chunk = subject_ids[start : start + 500]
            rows.extend(
                await uow.connection.execute(
                    delete(parked_results)
                    .where(parked_results.c.subject_id.in_(chunk))
                    .returning(parked_results.c.id, parked_results.c.payload)
                )
            )
        return await self._ingest_parked(uow, rows, now)

    async def sweep(self, uow: UnitOfWork, now: datetime) -> tuple[list[Outcome], int]:
        """Release parked results whose subject is known by now (an enrollment that committed
        while the result was being parked), then refuse (``unknown_subject``) those that waited
        longer than the configured wait. Returns (released outcomes, number expired)."""
        known = select(known_patients.c.subject_id)
        released_rows = list(
            await uow.connection.execute(
                delete(parked_results)
                .where(parked_results.c.subject_id.in_(known))
                .returning(parked_results.c.id, parked_results.c.payload)
            )
        )
        released = await self._ingest_parked(uow, released_rows, now)
        wait = self.unknown_patient_wait
        expired_rows = sorted(
            await uow.connection.execute(
                delete(parked_results)
                .where(parked_results.c.parked_at < now - wait)
                .returning(parked_results.c.id, parked_results.c.payload, parked_results.c.parked_at)
            ),
            key=lambda row: row.id,
        )
        refusals = []
        for row in expired_rows:
            result = IncomingResult.model_validate_json(row.payload)
            refusals.append(Refusal(LabRejection(
                f"subject {result.subject_id} is not enrolled: the result waited "
                f"{_seconds(wait)} for the enrollment (parked at {_aware(row.parked_at).isoformat()})",
                "unknown_subject", message_id=result.message_id, subject_id=result.subject_id, raw=result.raw,
            ), result.source))
        await self.record_rejections(uow, refusals, now)
        return released, len(expired_rows)

    async def forget(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> None:
        """Drop what labs holds outside its log about erased subjects: results still parked for
        them and their rows in the rejection log (``GET /v1/rejections``). Their events stay,
        sealed with the key that is gone (docs/erasure.md)."""
        for table in (parked_results, lab_rejections):
            await uow.connection.execute(delete(table).where(table.c.subject_id.in_(subject_ids)))

    async def parked_count(self, uow: UnitOfWork) -> int:
        return int(await uow.connection.scalar(select(func.count()).select_from(parked_results)) or 0)

    # ------------------------------------------------------------------ internals

    async def _patients(self, uow: UnitOfWork, subject_ids: set[str]) -> dict[str, KnownPatient]:
        found: dict[str, KnownPatient] = {}
        ids = list(subject_ids)
        columns = (known_patients.c.subject_id, known_patients.c.sex, known_patients.c.age_years,
                   known_patients.c.enrolled_on)
        for start in range(0, len(ids), 500):
            rows = await uow.connection.execute(
                select(*columns).where(
                    one_of(known_patients.c.subject_id, ids[start : start + 500], postgres=uow.store.is_postgres)
                )
            )
            for row in rows:
                found[row.subject_id] = KnownPatient(row.subject_id, row.sex, row.age_years, row.enrolled_on)
        return found

    async def _park(self, uow: UnitOfWork, results: Sequence[IncomingResult], now: datetime) -> None:
        rows = [
            {
                "source": result.source, "message_id": result.message_id, "result_id": result.result_id,
                "subject_id": result.subject_id, "parked_at": now,
                # The raw copy is kept for a later refusal's report: without identifiers.
                "payload": result.model_copy(update={"raw": redact(cap(result.raw)) or ""}).model_dump_json(),
            }
            for result in results
        ]
        # The same message parked twice (resent while waiting) is held once.
        await uow.connection.execute(_insert_ignore(uow, parked_results), rows)

    async def _ingest_parked(self, uow: UnitOfWork, rows: list[Any], now: datetime) -> list[Outcome]:
        rows.sort(key=lambda row: row.id)  # arrival order: a correction after its original
        incoming = [IncomingResult.model_validate_json(row.payload) for row in rows]
        return await self.ingest(uow, incoming, now, context=CommandContext(actor="labs:released"))


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


def _insert_ignore(uow: UnitOfWork, table: Table) -> Any:
    dialect_insert = pg_insert if uow.store.is_postgres else sqlite_insert
    return dialect_insert(table).on_conflict_do_nothing()


def _sql_text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL characters (garbage input may): show them escaped."""
    return value.replace("\x00", "\\x00") if value else value


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _seconds(wait: timedelta) -> str:
    seconds = wait.total_seconds()
    return f"{seconds:g} s" if seconds < 3600 else f"{seconds / 3600:g} h"


_default = LabIngestion()


async def ingest(uow: UnitOfWork, incoming: Sequence[IncomingResult], now: datetime) -> list[Outcome]:
    """:meth:`LabIngestion.ingest` with the default settings (tests, tools)."""
    return await _default.ingest(uow, incoming, now)
