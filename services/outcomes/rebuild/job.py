"""One rebuild, from claiming its generation to swapping it in, and its progress.

Patients are few and events are many: the rebuild keeps every patient's facts in memory
(recorded in place: ``domain.FactsRecorder``) except their lab results, which grow with the log
and go to a scratch file (:mod:`.spill`), and streams the events past them. Timeline rows go to
the database every ``write_every`` events (or few seconds), in the background while the next
messages are applied (one write in flight at most, so at most two batches of rows are ever
held). Every ``flush_every`` events (or ``flush_seconds``) a *checkpoint* writes the touched
patients, the remaining timeline rows and each stream's position to generation N+1, so an
interrupted rebuild resumes from those positions (``projection_state.rebuilding_generation``
stays set); timeline rows written after the last checkpoint are simply written again, which
inserting by event id makes a no-op. Checkpoints are rare because serialising every patient's
facts is the costly part of a write. The live projection keeps serving generation N meanwhile. The swap, in ONE transaction
that locks ``projection_state`` (live batches wait, readers do not): apply whatever was
published since the last checkpoint, up to the streams' current heads, then make N+1 the
active generation.
Afterwards older generations are deleted. Reading the four streams one after another is correct
because applying events is order-insensitive across streams (see ``projector``).

Each write is a use case of :mod:`services.outcomes.handlers` run in the store's unit of work;
this module decides when, and reads the streams (:mod:`.reader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import structlog
from nats.aio.client import Client as NATS

from services.outcomes import handlers
from services.outcomes.incoming import Incoming
from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.projection_store import ProjectionStore
from services.outcomes.projector import ProjectionChanges
from services.outcomes.rebuild.lease import Lease, RebuildError
from services.outcomes.rebuild.reader import FETCH_BATCH, read_up_to, stream_heads
from services.outcomes.rebuild.spill import SPILL_EVERY, SpilledResults
from shared.events import utcnow
from shared.keys import KeyErased, KeyMissing
from shared.store import EventStore
from shared.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

FLUSH_EVERY_EVENTS = 2_000_000
"""Checkpoint (patients + positions) at least this often, in events ..."""
FLUSH_EVERY_SECONDS = 60.0
"""... or in seconds (an interrupted rebuild redoes about this much) — stretched so that
checkpoints take at most ``CHECKPOINT_SHARE`` of the time: each one writes every patient touched
since the last, and with lab results arriving round the cohort that is all of them."""
CHECKPOINT_SHARE = 0.1
PATIENTS_PER_WRITE = 100
"""A checkpoint serialises and writes its patients this many at a time (see ``_flush``) ..."""
RESULTS_PER_WRITE = 5_000
"""... or fewer, holding about this many lab results at once: what a patient holds grows with
their follow-up, what the rebuild holds should not."""
RESUME_PAGE = 100
"""A resumed rebuild reads the patients it had written this many at a time."""
WRITE_EVERY_EVENTS = 20_000
"""Timeline rows are written in batches of this many events (bounds the rows held in memory) ..."""
WRITE_EVERY_SECONDS = 5.0
"""... or after this many seconds, whichever comes first; each write renews the lease."""


@dataclass(frozen=True)
class RebuildProgress:
    """A snapshot for progress bars and ``GET /v1/admin/rebuild``."""

    phase: str  # starting | replaying | catching up | swapping | cleaning up | done | failed
    generation: int
    applied: int
    total: int
    elapsed_seconds: float
    resumed: bool = False
    error: str | None = None
    skipped_erased: int = 0
    """Messages whose payload belongs to an erased patient (key deleted): skipped by design."""

    @property
    def events_per_second(self) -> float:
        return self.applied / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.events_per_second
        return max(self.total - self.applied, 0) / rate if rate > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase, "generation": self.generation, "applied": self.applied,
            "total": self.total, "elapsed_seconds": self.elapsed_seconds,
            "events_per_second": self.events_per_second, "eta_seconds": self.eta_seconds,
            "resumed": self.resumed, "error": self.error, "skipped_erased": self.skipped_erased,
        }


ProgressCallback = Callable[[RebuildProgress], None]


@dataclass
class _Run:
    """The mutable state of one rebuild run."""

    lease: Lease
    resumed: bool
    changes: ProjectionChanges
    spill: SpilledResults
    started: float = field(default_factory=time.monotonic)
    total: int = 0
    skipped: int = 0
    skipped_erased: int = 0
    last_flush: float = field(default_factory=time.monotonic)
    unflushed: int = 0
    unspilled: int = 0
    last_write: float = field(default_factory=time.monotonic)
    writer: asyncio.Task[None] | None = None
    checkpoint_seconds: float = 0.0  # how long the last checkpoint took
    checkpoints_total: float = 0.0  # seconds spent in checkpoints, in all
    waited_for_writes: float = 0.0  # seconds the replay waited for a background write

    @property
    def generation(self) -> int:
        return self.lease.generation


class Rebuild:
    """One rebuild of the outcomes projection into generation ``active + 1`` (or the one an
    interrupted rebuild left, which it resumes). ``store``: the outcomes service's store (its
    units of work, and the codec that opens sealed payloads); ``nc``: the broker client."""

    def __init__(
        self,
        store: EventStore,
        nc: NATS,
        streams: Mapping[str, str],
        *,
        projection: ProjectionStore | None = None,
        on_progress: ProgressCallback | None = None,
        flush_every: int = FLUSH_EVERY_EVENTS,
        flush_seconds: float = FLUSH_EVERY_SECONDS,
        fetch_batch: int = FETCH_BATCH,
        write_every: int = WRITE_EVERY_EVENTS,
        write_seconds: float = WRITE_EVERY_SECONDS,
        spill_every: int = SPILL_EVERY,
    ) -> None:
        self.store = store
        self.nc = nc
        self.streams = dict(streams)
        self.projection = projection or SqlProjectionStore()
        self.on_progress = on_progress or (lambda progress: None)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.fetch_batch = fetch_batch
        self.write_every = write_every
        self.write_seconds = write_seconds
        self.spill_every = spill_every
        self.owner = uuid.uuid4().hex
        self.progress = RebuildProgress("starting", 0, 0, 0, 0.0)

    async def run(self, *, restart: bool = False) -> RebuildProgress:
        """Rebuild and swap; returns the final progress. ``restart`` discards an interrupted
        rebuild instead of resuming it."""
        run: _Run | None = None
        try:
            run = await self._claim(restart)
            if run.resumed:
                await self._read_back(run)
            await self._replay_all(run, "replaying")
            await self._flush(run)
            await self._replay_all(run, "catching up")  # what arrived meanwhile, outside the lock
            await self._flush(run)
            await self._swap(run)
            self._report(run, "cleaning up")
            await self.store.transact(partial(
                handlers.drop_generations_before, handlers.DropGenerationsBefore(run.generation),
                projection=self.projection,
            ))
            self._report(run, "done")
            log.info(
                "rebuild done", generation=run.generation, events=run.changes.applied, skipped=run.skipped,
                skipped_erased=run.skipped_erased,
                seconds=round(time.monotonic() - run.started, 1), checkpoint_seconds=round(run.checkpoints_total, 1),
                waited_for_writes_seconds=round(run.waited_for_writes, 1),
            )
            return self.progress
        except BaseException as exc:
            self.progress = replace(self.progress, phase="failed", error=_describe(exc))
            self.on_progress(self.progress)
            if run is not None:
                await cancel_and_wait([run.writer])
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._release())
            raise
        finally:
            if run is not None:
                run.spill.close()

    async def _claim(self, restart: bool) -> _Run:
        spill = SpilledResults(self.spill_every)
        try:
            claimed = await self.store.transact(partial(
                handlers.claim_rebuild, handlers.ClaimRebuild(self.owner, restart), projection=self.projection,
                clock=utcnow,
            ))
        except BaseException:
            spill.close()
            raise
        changes = ProjectionChanges({}, self.store.codec.is_erased)
        changes.marks.update(claimed.marks)
        log.info("rebuild started", generation=claimed.lease.generation, resumed=claimed.resumed)
        run = _Run(claimed.lease, claimed.resumed, changes, spill)
        self._report(run, "starting")
        return run

    async def _read_back(self, run: _Run) -> None:
        """The patients a resumed rebuild had written, ``RESUME_PAGE`` at a time, their lab
        results straight into the scratch file."""
        after = ""
        while page := await self.store.transact(partial(
            handlers.read_rebuilt_patients, handlers.ReadRebuiltPatients(run.lease, after, RESUME_PAGE),
            projection=self.projection,
        )):
            run.spill.write(page)
            run.changes.patients.update(page)
            after = max(page)
        log.info("rebuild resumed", generation=run.generation, patients=len(run.changes.patients))

    async def _release(self) -> None:
        await self.store.transact(partial(
            handlers.release_lease, handlers.ReleaseLease(self.owner), projection=self.projection,
        ))

    # --- replaying ----------------------------------------------------------------------------

    async def _replay_all(self, run: _Run, phase: str, *, flush: bool = True) -> None:
        """Apply every stream from its mark up to its head as of now. Without ``flush`` (the
        swap) nothing is written on the way: the caller writes it all in its one transaction."""
        heads = await stream_heads(self.nc.jetstream(), self.streams)
        run.total += sum(max(heads[s] - run.changes.mark(s).last_sequence, 0) for s in self.streams.values())
        self._report(run, phase)
        for source, stream in self.streams.items():
            await self._replay(run, phase, source, stream, heads[stream], flush=flush)

    async def _replay(self, run: _Run, phase: str, source: str, stream: str, head: int, *, flush: bool) -> None:
        async for messages in read_up_to(self.nc, stream, run.changes.mark(stream).last_sequence, head, self.fetch_batch):
            for sequence, message in messages:
                self._apply(run, stream, sequence, source, message.data)
            self._spill(run, len(messages))
            self._report(run, phase)
            if flush:
                now = time.monotonic()
                spacing = max(self.flush_seconds, run.checkpoint_seconds / CHECKPOINT_SHARE)
                if run.unflushed >= self.flush_every or now - run.last_flush >= spacing:
                    await self._flush(run)
                elif len(run.changes.timeline) >= self.write_every or now - run.last_write >= self.write_seconds:
                    await self._write_timeline(run)

    def _apply(self, run: _Run, stream: str, sequence: int, source: str, data: bytes) -> None:
        """Apply one message. One that is not a decodable envelope is skipped (the live consumer
        dead-letters it, with the same absence of effect) and logged. One about an erased
        patient is skipped and counted (``skipped_erased``), as the live projection skips it; a
        missing key (``KeyMissing``) fails the rebuild rather than lose a patient."""
        try:
            item = Incoming.parse(stream, sequence, source, data, self.store.codec)
        except KeyErased:
            run.skipped_erased += 1
            run.changes.skip(stream, sequence)
        except KeyMissing as exc:
            raise RebuildError(f"{exc} (stream {stream}, sequence {sequence}); run the rebuild again") from exc
        except Exception as exc:
            run.skipped += 1
            run.changes.skip(stream, sequence)
            log.warning("rebuild skipped an undecodable message", stream=stream, sequence=sequence, error=repr(exc))
        else:
            run.changes.add(item)
        run.unflushed += 1

    @staticmethod
    def _spill(run: _Run, applied: int) -> None:
        """Every ``spill.every`` messages, move the lab results recorded since to disk; an
        erasure's at once (the patient's results on disk go as their rows do)."""
        run.unspilled += applied
        if run.unspilled >= run.spill.every:
            run.spill.write(run.changes.patients)
            run.unspilled = 0
        run.spill.forget(run.changes.erased)

    # --- writing ------------------------------------------------------------------------------

    async def _flush(self, run: _Run) -> None:
        """A checkpoint (after the timeline write in flight, if any): the touched patients a
        chunk at a time (a bounded number of patients and of lab results), each chunk given its
        lab results back, serialised outside any transaction and written in one of its own (held
        at once, the whole projection's rows were the rebuild's peak memory), then the timeline
        rows left and the positions."""
        await self._await_writer(run)
        started = time.monotonic()
        touched = sorted(run.changes.touched)
        for chunk in run.spill.chunks(touched, patients=PATIENTS_PER_WRITE, results=RESULTS_PER_WRITE):
            patients = {subject_id: run.changes.patients[subject_id] for subject_id in chunk}
            with run.spill.restored(patients):
                rows = [patient.row() for patient in patients.values()]
            await self.store.transact(partial(
                handlers.write_patients, handlers.WritePatients(run.lease, rows),
                projection=self.projection, clock=utcnow,
            ))
        await self.store.transact(partial(
            handlers.checkpoint, handlers.Checkpoint(run.lease, run.changes, patient_rows=[]),
            projection=self.projection, clock=utcnow,
        ))
        run.changes.clear()
        run.unflushed = 0
        run.last_flush = run.last_write = time.monotonic()
        run.checkpoint_seconds = run.last_flush - started
        run.checkpoints_total += run.checkpoint_seconds

    async def _write_timeline(self, run: _Run) -> None:
        """Hand the timeline rows gathered so far to a background write (after the previous
        one finished: one in flight at most) and go on applying messages meanwhile."""
        await self._await_writer(run)
        rows = run.changes.take_timeline()
        run.last_write = time.monotonic()
        run.writer = asyncio.create_task(self._insert_timeline(run, rows), name="rebuild-timeline-write")

    async def _insert_timeline(self, run: _Run, rows: list[dict[str, Any]]) -> None:
        await self.store.transact(partial(
            handlers.write_timeline, handlers.WriteTimeline(run.lease, rows), projection=self.projection, clock=utcnow,
        ))

    @staticmethod
    async def _await_writer(run: _Run) -> None:
        """Wait for the background timeline write; its failure is the rebuild's failure."""
        writer, run.writer = run.writer, None
        if writer is not None:
            started = time.monotonic()
            await writer
            run.waited_for_writes += time.monotonic() - started

    async def _swap(self, run: _Run) -> None:
        await self.store.transact(partial(
            handlers.swap_in, handlers.SwapIn(run.lease, run.changes), projection=self.projection,
            catch_up=partial(self._catch_up, run), clock=utcnow,
        ))
        run.changes.clear()
        log.info("rebuild swapped in", generation=run.generation)

    async def _catch_up(self, run: _Run) -> None:
        """The swap's replay, up to the heads: its patients are written with their lab results
        (only those published during the last checkpoint: it came just before)."""
        await self._replay_all(run, "swapping", flush=False)
        run.spill.put_back({subject_id: run.changes.patients[subject_id] for subject_id in run.changes.touched})

    def _report(self, run: _Run, phase: str) -> None:
        self.progress = RebuildProgress(
            phase=phase, generation=run.generation, applied=run.changes.applied,
            total=max(run.total, run.changes.applied), elapsed_seconds=time.monotonic() - run.started,
            resumed=run.resumed, skipped_erased=run.skipped_erased,
        )
        self.on_progress(self.progress)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return "interrupted; run the rebuild again to resume it"
    return str(exc) or repr(exc)
