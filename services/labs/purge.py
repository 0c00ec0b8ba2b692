"""Inbound purge: after an erasure, delete from the broker the lab messages that name the patient in clear.

Crypto-shredding (docs/erasure.md) makes every *sealed* copy of a patient's data unreadable, but
two kinds of lab message travel in clear and cannot be sealed: the lab systems' own results on
``labs.results`` (they have no keys) and the contract's ``LabResultRejected`` on ``labs.rejected``
(and on ``<prefix>.labs.LabResultRejected``), which may carry the subject id and a redacted raw
payload. When labs learns of a ``PatientDataErased`` it records, in the same transaction, a
durable purge job (:func:`services.labs.handlers.erase_subjects`); :class:`InboundPurger` (a background
task) scans the streams for the pending subjects and deletes each message that names one with
the server's secure erase (``STREAM.MSG.DELETE`` without ``no_erase``: overwritten on disk),
then marks the jobs done with what it deleted.

Why this shape:

- **Durable and idempotent.** The job commits with the erasure's handling, so it survives any
  crash; a pass interrupted halfway leaves the jobs pending and the next pass scans again from
  the start — what was deleted is gone, so nothing is counted twice (a message deleted between
  the scan and the deletion, by another replica's pass, answers "no message found" and is
  skipped).
- **One scan for many erasures.** A pass takes up to :data:`MAX_JOBS` pending subjects and reads
  each stream once for all of them.
- **Never in ingestion's way.** It reads messages by sequence (``STREAM.MSG.GET`` with
  ``next_by_subj``), never through a consumer: the durable consumers are untouched, and the labs
  NATS user needs no right on any consumer but its own (a right to pull from the streams'
  consumers would let it take messages meant for outcomes). It holds a database transaction
  only to record progress.
- **Bounded memory.** :data:`READERS` messages in flight at a time, and the sequences to delete
  of one chunk per reader.
- **Bounded work.** A stream is read up to the sequence it had when its scan began; what is
  published later is for the next erasure's pass (docs/erasure.md, limits).

A message *names* a subject when the id appears in it as a whole token (``IGA-A-1`` does not
match ``IGA-A-10``), or when its ``subject_id`` field (a result's, or an envelope payload's, or
in malformed JSON as far as it can be read) is that id — the field check catches JSON-escaped
spellings the text search cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.js.errors
import structlog
from nats.js import JetStreamContext

from contracts.labs import LabResultRejected
from services.labs.handlers import CountPurged, FinishPurges, StartPurges, count_purged, finish_purges, start_purges
from services.labs.ingest import Labs
from services.labs.labs_store import PurgeJob
from services.labs.refused_subject import refused_subject
from shared import metrics
from shared.broker import LAB_REJECTED_SUBJECT, LAB_RESULTS_SUBJECT, Topology
from shared.store import EventStore
from shared.tasks import woken

log = structlog.get_logger(__name__)

MAX_JOBS = 100
"""Subjects purged in one pass (one scan of each stream serves them all)."""
READERS = 16
"""Chunks read at once, one message request in flight each: what a pass holds in memory (a lab
message is at most 1 MB, a typical one about 1 KB), and what makes it faster than one request
at a time (a round trip per message)."""
CHUNK = 2000
"""Stream sequences per chunk."""
ERROR_LIMIT = 500  # characters of a failed pass's error kept in the job's last_error
ALREADY_GONE = frozenset({10043, 10057})
"""JetStream's error codes for deleting a message no longer in the stream: "sequence … not found",
or "no message found" (when the stream holds no message any more)."""


def purge_view(job: PurgeJob) -> dict[str, Any]:
    """A job as ``GET /v1/admin/erasures`` shows it."""
    return {
        "subject_id": job.subject_id,
        "status": "done" if job.done_at else "pending",
        "requested_at": job.requested_at.isoformat(),
        "done_at": job.done_at.isoformat() if job.done_at else None,
        "attempts": job.attempts,
        "last_error": job.last_error,
        "deleted": dict(job.deleted),
    }


# --------------------------------------------------------------------------- what is scanned


@dataclass(frozen=True, slots=True)
class Target:
    """The messages on ``subject`` in ``stream``, to scan."""

    label: str
    """One of :data:`services.labs.labs_store.PURGE_TARGETS` (and the metric's ``stream`` label)."""
    stream: str
    subject: str


def targets(topology: Topology) -> tuple[Target, ...]:
    """Where lab messages stay in clear: ``LABS_RESULTS`` (as the labs sent them),
    ``LABS_REJECTED``, and the labs service stream's ``LabResultRejected`` (its other events are
    sealed, and kept: they are the log)."""
    results, rejected = topology.lab_results_stream, topology.lab_rejected_stream
    return (
        Target("labs_results", results.name, LAB_RESULTS_SUBJECT),
        Target("labs_rejected", rejected.name, LAB_REJECTED_SUBJECT),
        Target("labs_events", topology.service_stream("labs").name,
               topology.event_subject("labs", LabResultRejected.event_type)),
    )


class SubjectMatcher:
    """Which of a set of subject ids a message body names (see the module doc)."""

    def __init__(self, subject_ids: Iterable[str]) -> None:
        self.subject_ids = frozenset(subject_ids)
        alternatives = "|".join(re.escape(s) for s in sorted(self.subject_ids, key=len, reverse=True))
        # Subject ids are letters, digits, '-', '_' and '.': a token ends where none continues it
        # (a trailing '.' ends a sentence, not an id).
        self._pattern = re.compile(rf"(?<![A-Za-z0-9_.-])(?:{alternatives})(?![A-Za-z0-9_-]|\.[A-Za-z0-9_-])")

    def named_in(self, body: bytes) -> set[str]:
        text = body.decode("utf-8", "replace")
        named = set(self._pattern.findall(text))
        if named:
            return named
        try:
            document = json.loads(body)
        except ValueError:  # malformed JSON: its subject_id as far as the refusal could read it
            return {refused_subject("broker", text)} & self.subject_ids
        if isinstance(document, dict):
            for holder in (document, document.get("payload")):
                subject_id = holder.get("subject_id") if isinstance(holder, dict) else None
                if subject_id in self.subject_ids:
                    named.add(subject_id)
        return named


# --------------------------------------------------------------------------- the worker


class InboundPurger:
    """The background task that works through ``inbound_purges`` (module doc).

    ``jetstream`` is called for each pass (the broker's connection exists only once the service
    has started); :meth:`wake` starts a pass at once instead of after ``interval`` seconds.
    """

    def __init__(
        self, store: EventStore, labs: Labs, jetstream: Callable[[], JetStreamContext], targets: Sequence[Target], *,
        interval: float,
    ) -> None:
        self.store = store
        self.labs = labs
        self.jetstream = jetstream
        self.targets = tuple(targets)
        self.interval = interval
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Pass after pass until cancelled; a failed pass leaves its jobs pending (logged, and
        in the job's ``last_error``) for the next one."""
        while True:
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as error:  # noqa: BLE001 - the jobs stay pending; retried next pass
                log.warning("inbound purge pass failed; will retry", error=repr(error))
            await woken(self._wake, self.interval)

    async def run_once(self) -> int:
        """One pass over the pending jobs; returns how many it finished."""
        subject_ids = await self.store.transact(
            lambda uow: start_purges(StartPurges(MAX_JOBS), uow, labs=self.labs)
        )
        await self._count_pending()
        if not subject_ids:
            return 0
        matcher = SubjectMatcher(subject_ids)
        js = self.jetstream()
        try:
            for target in self.targets:
                await self._scan(js, target, matcher)
        except Exception as error:
            await self._failed(subject_ids, error)
            raise
        await self.store.transact(lambda uow: finish_purges(FinishPurges(subject_ids), uow, labs=self.labs))
        await self._count_pending()
        log.info("inbound purge done", subjects=len(subject_ids))  # no subject ids in logs
        return len(subject_ids)

    async def _scan(self, js: JetStreamContext, target: Target, matcher: SubjectMatcher) -> None:
        """Read ``target`` from its first sequence to its last at the start, in chunks of
        :data:`CHUNK` sequences, :data:`READERS` chunks at a time; delete what each chunk found."""
        try:
            state = (await js.stream_info(target.stream)).state
        except nats.js.errors.NotFoundError:
            return  # the stream was never created: nothing to delete
        if not state.messages:
            return
        end = state.last_seq + 1
        chunks = iter(range(state.first_seq, end, CHUNK))

        async def reader() -> None:
            for first in chunks:  # one iterator shared by the readers: each chunk read once
                found = await self._read_chunk(js, target, matcher, first, min(first + CHUNK, end))
                await self._delete(js, target, found)

        async with asyncio.TaskGroup() as readers:  # one failing cancels the others
            for _ in range(READERS):
                readers.create_task(reader())

    async def _read_chunk(
        self, js: JetStreamContext, target: Target, matcher: SubjectMatcher, first: int, end: int
    ) -> list[tuple[int, set[str]]]:
        """The messages of sequences ``first`` to ``end - 1`` on the target's subject that name
        a subject, as (sequence, subjects named). ``next_by_subj`` steps over deleted sequences
        and other subjects on the server."""
        found = []
        scanned = 0
        sequence = first
        while sequence < end:
            try:
                message = await js.get_msg(target.stream, sequence, subject=target.subject, next=True)
            except nats.js.errors.NotFoundError:
                break  # nothing on the subject from here to the stream's end
            if message.seq is None or message.seq >= end:
                break
            scanned += 1
            if named := matcher.named_in(message.data or b""):
                found.append((message.seq, named))
            sequence = message.seq + 1
        metrics.ERASURE_PURGE_SCANNED.inc(scanned)
        return found

    async def _delete(self, js: JetStreamContext, target: Target, found: list[tuple[int, set[str]]]) -> None:
        """Securely erase each found message, and add what was deleted to the jobs' counts (one
        transaction per chunk, written even when a deletion fails: a count is lost only when
        the process dies between a deletion and that transaction)."""
        deleted: Counter[str] = Counter()
        try:
            for sequence, named in found:
                try:
                    await js.delete_msg(target.stream, sequence)
                except nats.js.errors.APIError as error:
                    if error.err_code not in ALREADY_GONE:
                        raise
                    continue  # deleted meanwhile (another replica's pass, the ingestion)
                metrics.ERASURE_PURGE_DELETED.labels(stream=target.label).inc()
                deleted.update(named)
        finally:
            if deleted:
                await self._count_deleted(target, deleted)

    async def _count_deleted(self, target: Target, deleted: Counter[str]) -> None:
        command = CountPurged(target.label, deleted)
        await self.store.transact(lambda uow: count_purged(command, uow, labs=self.labs))

    async def _failed(self, subject_ids: list[str], error: Exception) -> None:
        command = FinishPurges(subject_ids, error=(repr(error) or type(error).__name__)[:ERROR_LIMIT])
        with contextlib.suppress(Exception):
            await self.store.transact(lambda uow: finish_purges(command, uow, labs=self.labs))

    async def _count_pending(self) -> None:
        async with self.store.transaction() as uow:
            pending = await self.labs.tables.pending_purges(uow)
        metrics.ERASURE_PURGES_PENDING.set(pending)
