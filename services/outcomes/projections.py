"""The live outcomes projection: every source service's events, batch by batch, through one
durable consumer per source (``<prefix>-outcomes-<service>``).

Each batch is one transaction (opened by the durable consumer) holding the inbox rows that
make redelivery harmless, the projection rows, and the per-stream checkpoint — so a crash
leaves either all of a batch or none of it: nothing is counted twice and nothing is skipped.
This adapter only parses the messages; projecting them is :func:`handlers.project_batch`.
"""

from __future__ import annotations

from services.outcomes import handlers
from services.outcomes.incoming import Incoming
from services.outcomes.projection_store import ProjectionStore
from services.outcomes.projector import SOURCES
from services.outcomes.settings import OutcomesSettings
from shared.consumer import InboundMessage
from shared.keys import KeyErased
from shared.service import Service
from shared.store import UnitOfWork


class LiveProjection:
    """The batch handler of the consumer of one source service's events."""

    def __init__(self, source: str, projection: ProjectionStore) -> None:
        self.source = source
        self.projection = projection

    async def __call__(self, uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        """A message that is not a decodable envelope raises (the consumer retries it alone,
        then dead-letters it); one whose patient was erased is read without effect."""
        codec = uow.store.codec
        items: list[Incoming] = []
        unreadable: list[tuple[str, int]] = []
        for m in messages:
            try:
                items.append(Incoming.parse(m.stream, m.stream_sequence, self.source, m.data, codec))
            except KeyErased:
                unreadable.append((m.stream, m.stream_sequence))
        await handlers.project_batch(handlers.ProjectBatch(items, unreadable), uow, projection=self.projection)


def register(service: Service, projection: ProjectionStore, settings: OutcomesSettings) -> None:
    """Subscribe the outcomes service to every source service's events (durable consumers)."""
    for source in SOURCES:
        service.consume_service(source, LiveProjection(source, projection), batch_size=settings.batch_size,
                                max_pause_seconds=settings.max_pause_seconds)
