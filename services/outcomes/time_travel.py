"""``as_of``: the projection as the system knew it at a time, replayed from the log.

A replay reads every source stream from its first message up to its head now, keeps the
envelopes *recorded* (``recorded_at``, the service's own clock, not the clinical date) at or
before ``as_of``, and applies them with the live projection's own code
(:class:`~services.outcomes.projector.ProjectionChanges`) into memory. Events of an erased
patient stay unreadable (their key is gone), as in a rebuild: erasure holds in the past too.

Cost: a first replay is linear in the log (~25,000 events/s measured here). The last
``as_of_cached`` projections are kept in memory by time; asked for again, one reads only what was
published since (a message published later may have been recorded before ``as_of``: the relay
publishes after the commit), and answers at once when nothing was. One replay runs at a time;
one over ``as_of_timeout_seconds`` answers 503, as does a log that cannot be read. The live
answer never comes this way.
docs/time-travel.md has the reasoning.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from nats.aio.client import Client as NATS

from services.outcomes.incoming import Incoming
from services.outcomes.projector import ProjectionChanges
from services.outcomes.queries import OutcomesQueries
from services.outcomes.reading import ReplayedView
from services.outcomes.rebuild.lease import RebuildError
from services.outcomes.rebuild.reader import FETCH_BATCH, read_up_to, stream_heads
from services.outcomes.settings import OutcomesSettings
from shared.keys import KeyErased
from shared.store import Codec
from shared.tasks import within

log = structlog.get_logger(__name__)


class LogUnavailable(RuntimeError):
    """The log could not be replayed (broker down, a stream stalled, too slow): answer 503."""


def keep(item: Incoming, as_of: datetime) -> bool:
    """Whether a message belongs to the projection as known at ``as_of``."""
    return item.envelope.recorded_at <= as_of


@dataclass
class Replay:
    """One ``as_of`` projection in memory: what was applied, how far each stream was read (its
    head at the last catch-up), and the view answers are served from (rebuilt when it changes)."""

    as_of: datetime
    changes: ProjectionChanges
    read: dict[str, int] = field(default_factory=dict)
    view: ReplayedView | None = None


def parsed(stream: str, sequence: int, source: str, data: bytes, codec: Codec) -> Incoming | None:
    """The message, or None for one that cannot be read: an erased patient's (key deleted) or a
    poison message the live consumer dead-lettered — both skipped, as the rebuild skips them."""
    try:
        return Incoming.parse(stream, sequence, source, data, codec)
    except KeyErased:
        return None
    except Exception as exc:
        log.debug("as_of replay skipped an undecodable message", stream=stream, sequence=sequence, error=repr(exc))
        return None


async def catch_up(replay: Replay, nc: NATS, streams: Mapping[str, str], heads: Mapping[str, int], codec: Codec) -> bool:
    """Read every stream from where ``replay`` stopped up to its head and apply the messages
    recorded by ``as_of``; then forget whoever has been erased since (their rows were applied
    before the erasure: the law still wins). Whether anything changed."""
    changes, changed = replay.changes, False
    for source, stream in streams.items():
        async for messages in read_up_to(nc, stream, replay.read.get(stream, 0), heads[stream], FETCH_BATCH):
            for sequence, message in messages:
                item = parsed(stream, sequence, source, message.data, codec)
                if item is not None and keep(item, replay.as_of):
                    changes.add(item)
                    changed = True
        replay.read[stream] = heads[stream]
    held = {*changes.patients, *(row["subject_id"] for row in changes.timeline)}
    for subject_id in sorted(s for s in held if codec.is_erased(s)):
        changes.erase(subject_id)
        changed = True
    return changed


class TimeTravel:
    """The ``as_of`` projections of one outcomes process: the last few kept (least recently used
    dropped), each caught up with the log — only the messages published since — when asked for
    again after the streams moved on; one catch-up at a time. ``nc``: the service's broker
    client, asked for when needed."""

    def __init__(
        self, nc: Callable[[], NATS], queries: OutcomesQueries, codec: Codec, settings: OutcomesSettings | None = None
    ) -> None:
        self.nc = nc
        self.queries = queries
        self.codec = codec
        self.settings = settings or OutcomesSettings()
        self.cached: OrderedDict[datetime, Replay] = OrderedDict()
        self.one_at_a_time = asyncio.Lock()

    async def view(self, as_of: datetime) -> ReplayedView:
        found = self.cached.get(as_of)
        if found is not None and found.view is not None and found.read == await self._heads():
            self.cached.move_to_end(as_of)
            return found.view  # nothing was published since: the same answer
        async with self.one_at_a_time:  # a request for the same as_of waits, then finds it caught up
            heads = await self._heads()
            replay = self.cached.pop(as_of, None)  # a catch-up that fails leaves nothing half-applied
            if replay is None or any(heads[s] < replay.read.get(s, 0) for s in heads):  # a stream was recreated
                replay = Replay(as_of, ProjectionChanges({}, self.codec.is_erased))
            if await self._caught_up(replay, heads) or replay.view is None:
                replay.view = ReplayedView(replay.changes, self.queries.freshness_of(replay.changes.marks, 0, as_of=as_of))
            self.cached[as_of] = replay
            while len(self.cached) > self.settings.as_of_cached:
                self.cached.popitem(last=False)
            return replay.view

    async def _heads(self) -> dict[str, int]:
        try:
            return await within(5.0, stream_heads(self.nc().jetstream(), self.queries.streams))
        except Exception as exc:
            raise LogUnavailable(f"the event log cannot be read to answer as_of: {exc!r}") from exc

    async def _caught_up(self, replay: Replay, heads: Mapping[str, int]) -> bool:
        timeout = self.settings.as_of_timeout_seconds
        try:
            return await within(timeout, catch_up(replay, self.nc(), self.queries.streams, heads, self.codec))
        except TimeoutError:
            raise LogUnavailable(f"replaying the log to {replay.as_of.isoformat()} took over {timeout:g} s "
                                 "(NEPHROTRACK_AS_OF_TIMEOUT_SECONDS); use a lock for repeated analyses") from None
        except RebuildError as exc:
            raise LogUnavailable(f"the event log cannot be replayed to answer as_of: {exc}") from exc
