"""The outcomes service's use cases: project a batch of a source's events, and the steps of a
rebuild. Each is one small function of a command and a unit of work, writing through the
projection port (:class:`~services.outcomes.projection_store.ProjectionStore`); none opens a
transaction — its adapter runs it in one (the durable consumer's, or ``store.transact``).

The outcomes service's only events are its analysis locks (:func:`lock_analysis`: one stream
per name, so a name is taken once); the swap and the lease are kept apart by row locks.
The rebuild's steps take a ``clock`` rather than a time: a heartbeat or a swap is stamped when
its writes are done, which for a large checkpoint or catch-up is seconds after it began.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.outcomes import locks
from services.outcomes.incoming import Incoming
from services.outcomes.projection_store import ProjectionStore
from services.outcomes.projector import ProjectedPatient, ProjectionChanges, SourceMark
from services.outcomes.rebuild.lease import Lease, ensure_free, ensure_held
from shared.erasures import remember_erased
from shared.errors import Conflict
from shared.events import CommandContext
from shared.store import UnitOfWork

Clock = Callable[[], datetime]
"""Now, in UTC (``shared.events.utcnow``; a fixed time in tests)."""

# --- the live projection -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectBatch:
    """A batch of one source's messages, parsed (:class:`Incoming`), and the positions
    ``(stream, sequence)`` of those whose payload belongs to an erased patient (their key is
    deleted: unreadable by design), which only move the stream's mark, as in a rebuild."""

    items: Sequence[Incoming]
    unreadable: Sequence[tuple[str, int]] = ()


async def project_batch(command: ProjectBatch, uow: UnitOfWork, *, projection: ProjectionStore) -> ProjectionChanges:
    """Apply the batch to the served generation: the patients it touches (loaded, locked,
    recomputed and written once), their timeline rows and the checkpoints. An erasure in it
    deletes the patient's rows and is remembered (``uow.erased``) before the batch commits."""
    generation = (await projection.state(uow, lock="share")).active_generation
    patients = await projection.lock_patients(uow, generation, (s for i in command.items if (s := i.patient_subject)))
    changes = ProjectionChanges(patients, uow.store.codec.is_erased)
    for stream, sequence in command.unreadable:
        changes.skip(stream, sequence)
    for item in command.items:
        changes.add(item)
    await remember_erased(uow, changes.erased)  # keys forgotten before commit: waiting batches see it
    await projection.write_changes(uow, generation, changes)
    return changes


# --- the rebuild (services/outcomes/rebuild/) --------------------------------------------------


@dataclass(frozen=True)
class ClaimRebuild:
    """Start a rebuild as ``owner``; ``restart`` discards an interrupted one instead of resuming it."""

    owner: str
    restart: bool = False


@dataclass(frozen=True)
class Claimed:
    lease: Lease
    resumed: bool
    marks: dict[str, SourceMark] = field(default_factory=dict)
    """Where a resumed rebuild's last checkpoint left each stream (nothing for a new one); the
    patients it had written are read a page at a time (:func:`read_rebuilt_patients`)."""


async def claim_rebuild(
    command: ClaimRebuild, uow: UnitOfWork, *, projection: ProjectionStore, clock: Clock
) -> Claimed:
    """Take the lease, unless another rebuild holds it (RebuildBusy), and choose the generation:
    the interrupted one to resume, or a new one above every generation there is (any other but
    the served one deleted first)."""
    state = await projection.state(uow, lock="update")
    now = clock()
    ensure_free(state, now)
    if state.rebuilding_generation is not None and not command.restart:
        generation = state.rebuilding_generation
        claimed = Claimed(Lease(command.owner, generation), True, await projection.marks(uow, generation))
    else:
        generation = max(state.active_generation, await projection.newest_generation(uow)) + 1
        await projection.delete_generations_except(uow, state.active_generation)
        await projection.set_state(uow, rebuilding_generation=generation, rebuild_started_at=now)
        claimed = Claimed(Lease(command.owner, generation), False)
    await projection.set_state(uow, rebuild_owner=command.owner, rebuild_heartbeat_at=now)
    return claimed


@dataclass(frozen=True)
class ReadRebuiltPatients:
    """A page of the patients a resumed rebuild had written: up to ``limit``, after ``after``."""

    lease: Lease
    after: str = ""
    limit: int = 100


async def read_rebuilt_patients(
    command: ReadRebuiltPatients, uow: UnitOfWork, *, projection: ProjectionStore
) -> dict[str, ProjectedPatient]:
    """Read only: a rebuild that lost its lease meanwhile fails at its next write."""
    return await projection.patients_page(uow, command.lease.generation, after=command.after, limit=command.limit)


@dataclass(frozen=True)
class Checkpoint:
    """What the rebuild applied since its last checkpoint; ``patient_rows``: the touched
    patients' rows serialised beforehand, outside the transaction (the slow part; ``[]``: the
    rebuild wrote them already, a chunk at a time, with :func:`write_patients`)."""

    lease: Lease
    changes: ProjectionChanges
    patient_rows: list[dict[str, Any]] | None = None


async def checkpoint(command: Checkpoint, uow: UnitOfWork, *, projection: ProjectionStore, clock: Clock) -> None:
    """Write the touched patients, the timeline rows not written yet and every stream's
    position to the rebuilding generation, so an interrupted rebuild resumes from here."""
    await projection.write_changes(uow, command.lease.generation, command.changes, command.patient_rows)
    await _renew(command.lease, uow, projection, clock)


@dataclass(frozen=True)
class WritePatients:
    """Some of a checkpoint's patient rows, serialised beforehand."""

    lease: Lease
    rows: list[dict[str, Any]]


async def write_patients(command: WritePatients, uow: UnitOfWork, *, projection: ProjectionStore, clock: Clock) -> None:
    """A chunk of the patients a checkpoint writes, in a short transaction of its own: held open
    while every patient was serialised, a checkpoint's transaction kept its transaction id for
    seconds, and the event stores' gap-free reads on the same server wait for the oldest open
    one. Patient rows ahead of the positions are safe: an interrupted rebuild resumes from the
    last positions and applies the events after them again, which changes nothing (the
    projector ignores a redelivered event). The lease is checked, as for every write."""
    await projection.upsert_patients(uow, command.lease.generation, command.rows)
    await _renew(command.lease, uow, projection, clock)


@dataclass(frozen=True)
class WriteTimeline:
    lease: Lease
    rows: list[dict[str, Any]]


async def write_timeline(command: WriteTimeline, uow: UnitOfWork, *, projection: ProjectionStore, clock: Clock) -> None:
    """Timeline rows between checkpoints (an interrupted rebuild writes them again: a no-op)."""
    await projection.write_timeline(uow, command.lease.generation, command.rows)
    await _renew(command.lease, uow, projection, clock)


async def _renew(lease: Lease, uow: UnitOfWork, projection: ProjectionStore, clock: Clock) -> None:
    """The heartbeat, after the writes: the state row (which live batches read ``FOR SHARE``)
    stays locked for the end of the transaction only; a lease lost raises, and nothing of the
    transaction is kept."""
    ensure_held(await projection.state(uow), lease, lost="taken over or restarted by another process")
    await projection.set_state(uow, rebuild_heartbeat_at=clock())


@dataclass(frozen=True)
class SwapIn:
    """Serve the rebuilt generation; ``changes`` collects what ``catch_up`` applies."""

    lease: Lease
    changes: ProjectionChanges


async def swap_in(
    command: SwapIn, uow: UnitOfWork, *, projection: ProjectionStore,
    catch_up: Callable[[], Awaitable[None]], clock: Clock,
) -> None:
    """In one transaction holding the state row (live batches wait; readers do not): apply
    whatever was published since the last checkpoint (``catch_up``, up to the streams' heads),
    then make the rebuilt generation the served one and give the lease back."""
    ensure_held(await projection.state(uow, lock="update"), command.lease, lost="taken over before its swap")
    await catch_up()
    await projection.write_changes(uow, command.lease.generation, command.changes)
    await projection.set_state(
        uow, active_generation=command.lease.generation, rebuilding_generation=None,
        rebuild_started_at=None, rebuild_owner=None, rebuild_heartbeat_at=None, swapped_at=clock(),
    )


@dataclass(frozen=True)
class ReleaseLease:
    """Give the lease back on interruption; the generation stays, to be resumed."""

    owner: str


async def release_lease(command: ReleaseLease, uow: UnitOfWork, *, projection: ProjectionStore) -> None:
    if (await projection.state(uow, lock="update")).rebuild_owner == command.owner:
        await projection.set_state(uow, rebuild_owner=None, rebuild_heartbeat_at=None)


@dataclass(frozen=True)
class DropGenerationsBefore:
    """After a swap: the generations older than the one now served."""

    generation: int


async def drop_generations_before(
    command: DropGenerationsBefore, uow: UnitOfWork, *, projection: ProjectionStore
) -> None:
    await projection.delete_generations_before(uow, command.generation)


async def refuse_while_rebuilding(uow: UnitOfWork, *, projection: ProjectionStore, clock: Clock) -> None:
    """Refuse early (RebuildBusy) when another process holds a live rebuild lease."""
    ensure_free(await projection.state(uow), clock())


# --- analysis locks (docs/time-travel.md) ------------------------------------------------------


@dataclass(frozen=True)
class LockAnalysis:
    """Freeze the served answers under ``name``, as ``context.actor``."""

    name: str
    context: CommandContext


async def lock_analysis(command: LockAnalysis, uow: UnitOfWork, *, projection: ProjectionStore) -> locks.AnalysisLock:
    """Copy the served generation under a new frozen one, record the lock with each source's
    position, and append ``AnalysisLocked`` — in one transaction. The state row is held ``FOR
    UPDATE`` first: live batches, a swap and another lock wait, so the copy's rows and positions
    are one moment's and two locks never pick the same frozen generation."""
    name = locks.check_name(command.name)
    generation = (await projection.state(uow, lock="update")).active_generation
    stream = locks.stream_id(name)
    if await uow.stream_version(stream):
        raise Conflict(f"a lock named {name!r} exists; choose another name", code="lock_exists")
    frozen = locks.frozen_generation([lock.generation for lock in await projection.locks(uow)])
    await projection.freeze(uow, generation, frozen)
    marks = await projection.marks(uow, frozen)
    positions = {stream_name: mark.last_sequence for stream_name, mark in sorted(marks.items())}
    [envelope] = await uow.append(
        stream, [locks.AnalysisLocked(name=name, generation=frozen, positions=positions)], 0, command.context
    )
    lock = locks.AnalysisLock(name, frozen, envelope.recorded_at, envelope.actor, positions)
    await projection.record_lock(uow, lock)
    return lock
