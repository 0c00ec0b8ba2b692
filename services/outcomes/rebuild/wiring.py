"""Where a rebuild runs: in a process of its own (``nephrotrack rebuild``, the benchmarks:
:func:`rebuild`) or in the outcomes service, started by its admin endpoint
(:class:`BackgroundRebuild`). Each builds what the job needs: the outcomes store with a codec
that opens sealed payloads, the broker client, the source streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from functools import partial

import nats
import structlog
from nats.aio.client import Client as NATS

from services.outcomes import handlers
from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.projection_store import ProjectionStore
from services.outcomes.projector import SOURCES
from services.outcomes.rebuild.job import FLUSH_EVERY_EVENTS, ProgressCallback, Rebuild, RebuildProgress
from services.outcomes.rebuild.lease import RebuildBusy, RebuildError
from shared.broker import Topology, nats_connect_options
from shared.events import utcnow
from shared.keys import KeyVault, bucket_name
from shared.sealing import SealingCodec
from shared.settings import RuntimeSettings
from shared.store import EventStore, open_store
from shared.tasks import cancel_and_wait

log = structlog.get_logger(__name__)


def default_streams(topology: Topology | None = None) -> dict[str, str]:
    """Source service -> JetStream stream name, for this stack's subject prefix."""
    topology = topology or Topology.from_env()
    return {source: topology.service_stream(source).name for source in SOURCES}


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
    ``nats_url`` (one server or several, comma-separated; ``streams``: source service -> stream
    name; default: this stack's)."""
    topology = Topology.from_env()
    client = await nats.connect(**nats_connect_options(nats_url))
    vault = KeyVault(bucket_name(topology))
    store = open_store(database_url, codec=SealingCodec(vault))
    watch: asyncio.Task[None] | None = None
    try:
        await vault.connect(client.jetstream(), replicas=RuntimeSettings().stream_replicas)
        watch = asyncio.create_task(vault.watch(), name="rebuild-key-watch")
        await vault.synced()
        job = Rebuild(store, client, streams or default_streams(topology), on_progress=on_progress,
                      flush_every=flush_every)
        return await job.run(restart=restart)
    finally:
        await cancel_and_wait([watch])
        with contextlib.suppress(Exception):
            await client.close()
        await store.close()


class BackgroundRebuild:
    """The rebuild the admin endpoint starts inside the outcomes process (one at a time).
    ``nc``: the service's broker client, asked for when a rebuild starts (it connects after
    the routes are built)."""

    def __init__(
        self, store: EventStore, nc: Callable[[], NATS], streams: Mapping[str, str],
        projection: ProjectionStore | None = None,
    ) -> None:
        self.store = store
        self.nc = nc
        self.streams = dict(streams)
        self.projection = projection or SqlProjectionStore()
        self.task: asyncio.Task[RebuildProgress] | None = None
        self.progress: RebuildProgress | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self, *, restart: bool = False) -> None:
        if self.running:
            raise RebuildBusy("a rebuild started by this outcomes process is still running")
        await self.store.transact(partial(handlers.refuse_while_rebuilding, projection=self.projection, clock=utcnow))
        job = Rebuild(self.store, self.nc(), self.streams, projection=self.projection, on_progress=self._track)
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
        await cancel_and_wait([self.task])
