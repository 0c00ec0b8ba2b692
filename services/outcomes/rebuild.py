"""Rebuild: replay the whole log into a fresh generation, then swap it in atomically.

Where the log comes from. The outcomes service may not read other services' databases, and it
does not need to: every service stream in JetStream keeps every message (limits retention, no
age limit; see ``shared.broker.ensure_streams``), so the broker is the shared record of
everything published. The rebuild reads each source stream from sequence 1 with an ephemeral
pull consumer (no acks, no durable state on the server) — the same messages, in the same
stream order, that the live consumers read.

How. Patients are few and events are many: the rebuild keeps every patient's facts in memory
(recorded in place, one small tuple per lab result: ``domain.FactsRecorder``) and streams the
events past them. Timeline rows go to the database every ``write_every`` events
(or few seconds), in the background while the next messages are applied (one write in flight
at most, so at most two batches of rows are ever held). Every ``flush_every`` events (or
``flush_seconds``) a *checkpoint* writes the touched patients, the remaining timeline rows and
each stream's position to generation N+1 in one transaction, so an interrupted rebuild resumes
from those positions (``projection_state.rebuilding_generation`` stays set); timeline rows
written after the last checkpoint are simply written again, which inserting by event id makes a
no-op. Checkpoints are rare because serialising every patient's facts is the costly part of a
write. The live projection keeps serving generation N meanwhile. The swap, in ONE transaction
that locks ``projection_state`` (live batches wait, readers do not): apply whatever was
published since the last checkpoint, up to the streams' current heads, then make N+1 the
active generation.
Afterwards older generations are deleted. Reading the four streams one after another is correct
because applying events is order-insensitive across streams (see ``projector``).

Reading. Messages come from an ephemeral pull consumer (no acks, memory storage) through a
plain subscription with up to two pull requests outstanding, rather than nats-py's
``PullSubscription.fetch``, which waits for each message separately (an asyncio timer per
message: profiled at more than the whole decoding and projecting cost). docs/performance.md
has the measurements.

A lease (owner + heartbeat in ``projection_state``) keeps two rebuilds — the CLI and the admin
endpoint, say — from writing one generation at once; a rebuild killed without releasing it is
taken over once its heartbeat is ``LEASE_SECONDS`` old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.outcomes import tables
from services.outcomes.projections import load_generation, read_state, set_state, write_changes, write_timeline
from services.outcomes.projector import SOURCES, Incoming, ProjectionChanges
from shared.broker import Topology
from shared.database import create_engine
from shared.keys import KeyErased, KeyMissing, KeyVault, bucket_name
from shared.sealing import SealingCodec
from shared.store import JSON_CODEC, Codec

log = structlog.get_logger(__name__)

LEASE_SECONDS = 30.0
FLUSH_EVERY_EVENTS = 2_000_000
"""Checkpoint (patients + positions) at least this often, in events ..."""
FLUSH_EVERY_SECONDS = 60.0
"""... or in seconds (an interrupted rebuild redoes about this much) — stretched so that
checkpoints take at most ``CHECKPOINT_SHARE`` of the time: each one writes every patient touched
since the last, and with lab results arriving round the cohort that is all of them."""
CHECKPOINT_SHARE = 0.1
WRITE_EVERY_EVENTS = 20_000
"""Timeline rows are written in batches of this many events (bounds the rows held in memory) ..."""
WRITE_EVERY_SECONDS = 5.0
"""... or after this many seconds, whichever comes first; each write renews the lease."""
FETCH_BATCH = 2_000
FETCH_TIMEOUT_SECONDS = 10.0


class RebuildError(RuntimeError):
    """The rebuild cannot go on; the reason says why. The live projection is untouched."""


class RebuildBusy(RebuildError):
    """Another rebuild holds the lease."""


def default_streams(topology: Topology | None = None) -> dict[str, str]:
    """Source service -> JetStream stream name, for this stack's subject prefix."""
    topology = topology or Topology.from_env()
    return {source: topology.service_stream(source).name for source in SOURCES}


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

    generation: int
    resumed: bool
    changes: ProjectionChanges
    started: float = field(default_factory=time.monotonic)
    total: int = 0
    skipped: int = 0
    skipped_erased: int = 0
    last_flush: float = field(default_factory=time.monotonic)
    unflushed: int = 0
    last_write: float = field(default_factory=time.monotonic)
    writer: asyncio.Task[None] | None = None
    checkpoint_seconds: float = 0.0  # how long the last checkpoint took
    checkpoints_total: float = 0.0  # seconds spent in checkpoints, in all
    waited_for_writes: float = 0.0  # seconds the replay waited for a background write


class Rebuild:
    """One rebuild of the outcomes projection into generation ``active + 1`` (or the one an
    interrupted rebuild left, which it resumes)."""

    def __init__(
        self,
        engine: AsyncEngine,
        js: JetStreamContext,
        streams: Mapping[str, str],
        *,
        on_progress: ProgressCallback | None = None,
        codec: Codec = JSON_CODEC,
        flush_every: int = FLUSH_EVERY_EVENTS,
        flush_seconds: float = FLUSH_EVERY_SECONDS,
        fetch_batch: int = FETCH_BATCH,
        write_every: int = WRITE_EVERY_EVENTS,
        write_seconds: float = WRITE_EVERY_SECONDS,
    ) -> None:
        self.engine = engine
        self.js = js
        self.streams = dict(streams)
        self.on_progress = on_progress or (lambda progress: None)
        self.codec = codec
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.fetch_batch = fetch_batch
        self.write_every = write_every
        self.write_seconds = write_seconds
        self.owner = uuid.uuid4().hex
        self.progress = RebuildProgress("starting", 0, 0, 0, 0.0)

    async def run(self, *, restart: bool = False) -> RebuildProgress:
        """Rebuild and swap; returns the final progress. ``restart`` discards an interrupted
        rebuild instead of resuming it."""
        run: _Run | None = None
        try:
            run = await self._claim(restart)
            await self._replay_all(run, "replaying")
            await self._flush(run)
            await self._replay_all(run, "catching up")  # what arrived meanwhile, outside the lock
            await self._flush(run)
            await self._swap(run)
            self._report(run, "cleaning up")
            await self._delete_older_than(run.generation)
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
                if run.writer is not None:
                    run.writer.cancel()
                    with contextlib.suppress(BaseException):
                        await run.writer
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._release())
            raise

    # --- the lease and the generation ---------------------------------------------------------

    async def _claim(self, restart: bool) -> _Run:
        async with self.engine.begin() as connection:
            state = await read_state(connection, lock="update")
            _check_lease(state)
            now = datetime.now(UTC)
            resumed = state.rebuilding_generation is not None and not restart
            if resumed:
                generation = state.rebuilding_generation
                patients, marks = await load_generation(connection, generation)
            else:
                generation = max(state.active_generation, await _newest_generation(connection)) + 1
                await _delete_generations(connection, lambda g: g != state.active_generation)
                patients, marks = {}, {}
                await set_state(connection, rebuilding_generation=generation, rebuild_started_at=now)
            await set_state(connection, rebuild_owner=self.owner, rebuild_heartbeat_at=now)
        changes = ProjectionChanges(patients, self.codec.is_erased)
        changes.marks.update(marks)
        log.info("rebuild started", generation=generation, resumed=resumed, patients=len(patients))
        run = _Run(generation, resumed, changes)
        self._report(run, "starting")
        return run

    async def _heartbeat(self, connection: AsyncConnection, run: _Run) -> None:
        state = await read_state(connection)
        if state.rebuild_owner != self.owner or state.rebuilding_generation != run.generation:
            raise RebuildError(
                f"the rebuild of generation {run.generation} was taken over or restarted by another process"
            )
        await set_state(connection, rebuild_heartbeat_at=datetime.now(UTC))

    async def _release(self) -> None:
        """Give the lease back on interruption; the generation stays, to be resumed."""
        async with self.engine.begin() as connection:
            state = await read_state(connection, lock="update")
            if state.rebuild_owner == self.owner:
                await set_state(connection, rebuild_owner=None, rebuild_heartbeat_at=None)

    # --- replaying ----------------------------------------------------------------------------

    async def _heads(self) -> dict[str, int]:
        heads = {}
        for stream in self.streams.values():
            try:
                heads[stream] = (await self.js.stream_info(stream)).state.last_seq
            except nats.js.errors.NotFoundError:
                heads[stream] = 0  # nothing was ever published by that service
        return heads

    async def _replay_all(self, run: _Run, phase: str, *, flush: bool = True) -> None:
        """Apply every stream from its mark up to its head as of now. Without ``flush`` (the
        swap) nothing is written on the way: the caller writes it all in its one transaction."""
        heads = await self._heads()
        run.total += sum(max(heads[s] - run.changes.mark(s).last_sequence, 0) for s in self.streams.values())
        self._report(run, phase)
        for source, stream in self.streams.items():
            await self._replay(run, phase, source, stream, heads[stream], flush=flush)

    async def _replay(self, run: _Run, phase: str, source: str, stream: str, head: int, *, flush: bool) -> None:
        after = run.changes.mark(stream).last_sequence
        if head <= after:
            return
        async with _PullReader(self.js, stream, after + 1, self.fetch_batch) as reader:
            while after < head:
                messages = await reader.next_batch(head - after)
                if messages is None:
                    if await reader.exhausted():  # the rest up to the head was deleted (erasure purge)
                        break
                    raise RebuildError(
                        f"stream {stream} delivered nothing after sequence {after} within "
                        f"{FETCH_TIMEOUT_SECONDS:.0f} s although its head was {head}"
                    )
                for message in messages:
                    sequence = _stream_sequence(message)
                    if sequence <= head:
                        self._apply(run, stream, sequence, source, message.data)
                    after = max(after, sequence)
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
            item = Incoming.parse(stream, sequence, source, data, self.codec)
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

    async def _flush(self, run: _Run) -> None:
        """A checkpoint: the touched patients, the timeline rows not written yet and every
        stream's position, in one transaction (after the timeline write in flight, if any)."""
        await self._await_writer(run)
        started = time.monotonic()
        patient_rows = run.changes.patient_rows()  # before the transaction: it is the slow part
        async with self.engine.begin() as connection:
            await write_changes(connection, run.generation, run.changes, patient_rows)
            # Last, so projection_state stays locked (live batches read it FOR SHARE) only for
            # the end of the transaction; if the lease was lost, it raises and all is rolled back.
            await self._heartbeat(connection, run)
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
        async with self.engine.begin() as connection:
            await write_timeline(connection, run.generation, rows)
            await self._heartbeat(connection, run)  # last: see _flush

    @staticmethod
    async def _await_writer(run: _Run) -> None:
        """Wait for the background timeline write; its failure is the rebuild's failure."""
        writer, run.writer = run.writer, None
        if writer is not None:
            started = time.monotonic()
            await writer
            run.waited_for_writes += time.monotonic() - started

    # --- the swap -----------------------------------------------------------------------------

    async def _swap(self, run: _Run) -> None:
        async with self.engine.begin() as connection:
            state = await read_state(connection, lock="update")
            if state.rebuild_owner != self.owner or state.rebuilding_generation != run.generation:
                raise RebuildError(f"the rebuild of generation {run.generation} was taken over before its swap")
            await self._replay_all(run, "swapping", flush=False)
            await write_changes(connection, run.generation, run.changes)
            await set_state(
                connection, active_generation=run.generation, rebuilding_generation=None,
                rebuild_started_at=None, rebuild_owner=None, rebuild_heartbeat_at=None,
                swapped_at=datetime.now(UTC),
            )
        run.changes.clear()
        log.info("rebuild swapped in", generation=run.generation)

    async def _delete_older_than(self, generation: int) -> None:
        async with self.engine.begin() as connection:
            await _delete_generations(connection, lambda g: g < generation)

    def _report(self, run: _Run, phase: str) -> None:
        self.progress = RebuildProgress(
            phase=phase, generation=run.generation, applied=run.changes.applied,
            total=max(run.total, run.changes.applied), elapsed_seconds=time.monotonic() - run.started,
            resumed=run.resumed, skipped_erased=run.skipped_erased,
        )
        self.on_progress(self.progress)


class _PullReader:
    """Reads one stream from ``start`` with an ephemeral pull consumer, a batch at a time.

    Pull requests (``CONSUMER.MSG.NEXT``) go out on the JetStream API with a plain subscription
    as their reply inbox; its callback only appends, so a batch costs one wake-up instead of
    one asyncio timer per message. Up to two requests are outstanding, so the server sends the
    next batch while this one is applied; never more, so at most two batches are held."""

    def __init__(self, js: JetStreamContext, stream: str, start: int, batch: int) -> None:
        self.js = js
        self.nc = js._nc  # the JetStream context's connection (no public accessor)
        self.stream = stream
        self.start = start
        self.batch = batch
        self.buffer: list[Msg] = []
        self.arrived = asyncio.Event()
        self.requested = 0  # messages asked for, in total
        self.taken = 0  # messages handed out, in total
        self.consumer: str | None = None
        self.subscription: Any = None

    async def __aenter__(self) -> _PullReader:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.start,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        self.consumer = (await self.js.add_consumer(self.stream, config)).name
        self.inbox = self.nc.new_inbox()
        self.subscription = await self.nc.subscribe(self.inbox, cb=self._received)
        self.next_subject = f"{self.js._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.subscription.unsubscribe()
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(self.stream, self.consumer)

    async def exhausted(self) -> bool:
        """Nothing is left to deliver: the stream's head may still be ahead of what was read,
        when the messages up to it were deleted (labs purges an erased patient's inbound
        messages, and JetStream keeps the last sequence number of a deleted tail)."""
        info = await self.js.consumer_info(self.stream, self.consumer)
        return not self.buffer and info.num_pending == 0

    async def _received(self, msg: Msg) -> None:
        if not msg.reply:
            # A status message (404/408: a request ended unfilled; 409: refused): count what
            # was asked for as answered, so the next call asks again.
            self.requested = self.taken + len(self.buffer)
        else:
            self.buffer.append(msg)
        self.arrived.set()

    async def _request(self, remaining: int) -> None:
        """Keep up to two batches asked for, never more than ``remaining`` (an upper bound of
        the messages left up to the head: sequences may have gaps)."""
        while True:
            outstanding = self.requested - self.taken
            size = min(self.batch, remaining - outstanding)
            if outstanding >= 2 * self.batch or size <= 0:
                return
            request = {"batch": size, "expires": int(FETCH_TIMEOUT_SECONDS * 1e9)}
            await self.nc.publish(self.next_subject, json.dumps(request).encode(), reply=self.inbox)
            self.requested += size

    async def next_batch(self, remaining: int) -> list[Msg] | None:
        """The messages that have arrived (waiting for at least one), or None when nothing
        came within ``FETCH_TIMEOUT_SECONDS``."""
        deadline = time.monotonic() + FETCH_TIMEOUT_SECONDS
        while not self.buffer:
            self.arrived.clear()  # before asking: a status answer arriving meanwhile wakes the wait
            await self._request(remaining)
            if self.buffer:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
        batch, self.buffer = self.buffer, []
        self.taken += len(batch)
        await self._request(max(remaining - len(batch), 0))
        return batch


def _stream_sequence(message: Msg) -> int:
    """The stream sequence from the reply subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.
    <stream seq>.…`` (nats-py's ``metadata`` parses every field and builds three objects)."""
    tokens = message.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5])
    return message.metadata.sequence.stream


async def ensure_no_lease(engine: AsyncEngine) -> None:
    """Refuse early (RebuildBusy) when another process holds a live rebuild lease."""
    async with engine.connect() as connection:
        _check_lease(await read_state(connection))


def _check_lease(state: Any) -> None:
    now = datetime.now(UTC)
    heartbeat = tables.utc(state.rebuild_heartbeat_at)
    if state.rebuild_owner and heartbeat and now - heartbeat < timedelta(seconds=LEASE_SECONDS):
        raise RebuildBusy(
            f"another rebuild of generation {state.rebuilding_generation} is running "
            f"(last heartbeat {(now - heartbeat).total_seconds():.0f} s ago); wait for it to finish"
        )


async def _newest_generation(connection: AsyncConnection) -> int:
    newest = 0
    for table in tables.GENERATION_TABLES:
        newest = max(newest, await connection.scalar(select(func.max(table.c.generation))) or 0)
    return newest


async def _delete_generations(connection: AsyncConnection, doomed: Callable[[Any], Any]) -> None:
    """Delete the rows whose generation matches ``doomed(generation column)``."""
    for table in tables.GENERATION_TABLES:
        await connection.execute(delete(table).where(doomed(table.c.generation)))



def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return "interrupted; run the rebuild again to resume it"
    return str(exc) or repr(exc)


async def rebuild(
    nats_url: str,
    database_url: str,
    streams: Mapping[str, str] | None = None,
    *,
    restart: bool = False,
    on_progress: ProgressCallback | None = None,
    flush_every: int = FLUSH_EVERY_EVENTS,
) -> RebuildProgress:
    """Rebuild the outcomes projection in ``database_url`` from the JetStream streams at
    ``nats_url`` (``streams``: source service -> stream name; default: this stack's)."""
    engine = create_engine(database_url)
    client = await nats.connect(nats_url)
    vault = KeyVault(bucket_name(Topology.from_env()))
    watch: asyncio.Task[None] | None = None
    try:
        await vault.connect(client.jetstream())
        watch = asyncio.create_task(vault.watch(), name="rebuild-key-watch")
        await vault.synced()
        job = Rebuild(engine, client.jetstream(), streams or default_streams(), on_progress=on_progress,
                      codec=SealingCodec(vault), flush_every=flush_every)
        return await job.run(restart=restart)
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch
        with contextlib.suppress(Exception):
            await client.close()
        await engine.dispose()


class BackgroundRebuild:
    """The rebuild the admin endpoint starts inside the outcomes process (one at a time)."""

    def __init__(
        self, engine: AsyncEngine, js: Callable[[], JetStreamContext], streams: Mapping[str, str],
        codec: Codec = JSON_CODEC,
    ) -> None:
        self.engine = engine
        self.js = js
        self.streams = dict(streams)
        self.codec = codec
        self.task: asyncio.Task[RebuildProgress] | None = None
        self.progress: RebuildProgress | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self, *, restart: bool = False) -> None:
        if self.running:
            raise RebuildBusy("a rebuild started by this outcomes process is still running")
        await ensure_no_lease(self.engine)
        job = Rebuild(self.engine, self.js(), self.streams, on_progress=self._track, codec=self.codec)
        self.progress = job.progress
        self.task = asyncio.create_task(self._run(job, restart), name="outcomes-rebuild")

    def _track(self, progress: RebuildProgress) -> None:
        self.progress = progress

    async def _run(self, job: Rebuild, restart: bool) -> RebuildProgress:
        """The outcome is in ``progress`` (phase ``failed`` with the error); nobody awaits it."""
        try:
            return await job.run(restart=restart)
        except RebuildError as exc:
            log.warning("rebuild refused or failed", error=str(exc))
        except Exception:
            log.exception("rebuild failed")
        return job.progress

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
