"""``as_of``: the projection as the system knew it at a time, replayed from the log.

A replay reads every source stream from its first message up to its head now, keeps the
envelopes *recorded* (``recorded_at``, the service's own clock, not the clinical date) at or
before ``as_of``, and applies them with the live projection's own code
(:class:`~services.outcomes.projector.ProjectionChanges`) into memory. Events of an erased
patient stay unreadable (their key is gone), as in a rebuild: erasure holds in the past too.

Cost: a replay is linear in the log (~25,000 events/s measured here), so the
answers are cached — the last ``as_of_cached`` replays, keyed by the time and the streams'
heads (a message published since may have been recorded before ``as_of``: the relay publishes
after the commit) — and one replay runs at a time; one over ``as_of_timeout_seconds`` answers
503, as does a log that cannot be read. The live answer never comes this way.
docs/time-travel.md has the reasoning.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Mapping
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

log = structlog.get_logger(__name__)


class LogUnavailable(RuntimeError):
    """The log could not be replayed (broker down, a stream stalled, too slow): answer 503."""


def keep(item: Incoming, as_of: datetime) -> bool:
    """Whether a message belongs to the projection as known at ``as_of``."""
    return item.envelope.recorded_at <= as_of


async def replay(
    nc: NATS, streams: Mapping[str, str], heads: Mapping[str, int], codec: Codec, as_of: datetime
) -> ProjectionChanges:
    """Every source stream up to its head, the messages recorded by ``as_of`` applied (marks
    move for those only). Undecodable messages are skipped, as the rebuild skips them."""
    changes = ProjectionChanges({}, codec.is_erased)
    for source, stream in streams.items():
        async for messages in read_up_to(nc, stream, 0, heads[stream], FETCH_BATCH):
            for sequence, message in messages:
                try:
                    item = Incoming.parse(stream, sequence, source, message.data, codec)
                except KeyErased:
                    continue
                except Exception as exc:  # a poison message: the live consumer dead-lettered it
                    log.debug("as_of replay skipped an undecodable message", stream=stream, sequence=sequence,
                              error=repr(exc))
                    continue
                if keep(item, as_of):
                    changes.add(item)
    return changes


class TimeTravel:
    """The ``as_of`` views of one outcomes process: replays, one at a time, and their cache.
    ``nc``: the service's broker client, asked for when a replay starts."""

    def __init__(
        self, nc: Callable[[], NATS], queries: OutcomesQueries, codec: Codec, settings: OutcomesSettings | None = None
    ) -> None:
        self.nc = nc
        self.queries = queries
        self.codec = codec
        self.settings = settings or OutcomesSettings()
        self.cached: OrderedDict[tuple[datetime, tuple[tuple[str, int], ...]], ReplayedView] = OrderedDict()
        self.one_at_a_time = asyncio.Lock()

    async def view(self, as_of: datetime) -> ReplayedView:
        streams = self.queries.streams
        try:
            heads = await asyncio.wait_for(stream_heads(self.nc().jetstream(), streams), 5.0)
        except Exception as exc:
            raise LogUnavailable(f"the event log cannot be read to answer as_of: {exc!r}") from exc
        key = (as_of, tuple(sorted(heads.items())))
        found = self.cached.get(key)
        if found is None:
            async with self.one_at_a_time:  # a request for the same as_of waits, then finds it cached
                found = self.cached.get(key)
                if found is None:
                    found = self.cached[key] = await self._replayed(as_of, heads)
                    while len(self.cached) > self.settings.as_of_cached:
                        self.cached.popitem(last=False)
        if key in self.cached:
            self.cached.move_to_end(key)
        return found

    async def _replayed(self, as_of: datetime, heads: Mapping[str, int]) -> ReplayedView:
        timeout = self.settings.as_of_timeout_seconds
        try:
            changes = await asyncio.wait_for(replay(self.nc(), self.queries.streams, heads, self.codec, as_of), timeout)
        except TimeoutError:
            raise LogUnavailable(f"replaying the log to {as_of.isoformat()} took over {timeout:g} s "
                                 "(NEPHROTRACK_AS_OF_TIMEOUT_SECONDS); use a lock for repeated analyses") from None
        except RebuildError as exc:
            raise LogUnavailable(f"the event log cannot be replayed to answer as_of: {exc}") from exc
        freshness = self.queries.freshness_of(changes.marks, 0, as_of=as_of)
        return ReplayedView(changes, freshness)
