"""The service shell: what every nephrotrack service process is made of.

A :class:`Service` owns its database (event store + outbox + inbox), its broker connection, the
outbox relay and its durable consumers, and starts and stops with the FastAPI app
:mod:`shared.http` builds around the service's routes. Services differ only in their routes,
their consumers and their domain; everything operational is here and in :mod:`shared.http`, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from fastapi import APIRouter, FastAPI
from faststream.nats import JStream

from shared import metrics
from shared.asyncapi import envelope_schema
from shared.auth import (
    AuthConfigError,
    KeyRing,
)
from shared.broker import NatsUrlError, Topology, ensure_streams, make_broker, until_jetstream_answers
from shared.consumer import BatchHandler, DurableConsumer
from shared.database import keep_statistics
from shared.erasures import erased_subjects
from shared.events import DomainEvent, Envelope, registry
from shared.http import build_app, serve
from shared.keys import KeyVault, bucket_name
from shared.outages import Dependency, Outages
from shared.relay import OutboxRelay
from shared.sealing import SealingCodec
from shared.settings import SERVICES, RuntimeSettings, database_url, service_port
from shared.store import PostgresEventStore, open_store
from shared.store.base import Work
from shared.tasks import cancel_and_wait, within

log = structlog.get_logger(__name__)

T = TypeVar("T")
BackgroundTask = Callable[[], Awaitable[None]]
BROKER_PROBE_SECONDS = 1.5
"""Inside the outage probe's own 2 s limit."""

class Service:
    def __init__(self, name: str, *, database: str | None = None) -> None:
        self.name = name
        self.settings = RuntimeSettings()
        self.topology = Topology.from_env()
        self.keys = KeyRing.from_env()  # AuthConfigError (naming the bad entry) if malformed
        self.vault = KeyVault(bucket_name(self.topology))  # patients' data keys (shared.keys)
        self.store = open_store(
            database or database_url(name, self.settings), subject_for=self._subject_for, codec=SealingCodec(self.vault)
        )
        self.broker = make_broker(self.settings.broker_url(), name=f"nephrotrack-{name}", log=self.settings.broker_log)
        self.consumers: list[DurableConsumer] = []
        self.outages = Outages({
            Dependency.STORE: self.store.ping,
            Dependency.BROKER: self._broker_answers,
            Dependency.KEY_VAULT: self._vault_answers,
        })
        self.background: list[BackgroundTask] = []
        self.relay: OutboxRelay | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- events out -------------------------------------------------------------------------
    def _subject_for(self, envelope: Envelope) -> str | None:
        if registry.knows(envelope.event_type) and not registry.model(envelope.event_type).published:
            return None
        return self.topology.event_subject(self.name, envelope.event_type)

    def wake_relay(self) -> None:
        """Wake the relay after a commit that wrote outbox rows."""
        if self.relay is not None:
            self.relay.notify()

    async def transact(self, work: Work[T]) -> T:
        """Run a use case in one unit of work (``EventStore.transact``: run again on a concurrent
        write, 409 when the conflict outlasts the retries), then wake the relay for what it
        recorded."""
        result = await self.store.transact(work)
        self.wake_relay()
        return result

    def declare_published(self, *models: type[DomainEvent]) -> None:
        """Declare the events this service publishes, for its AsyncAPI document (the relay does
        the actual publishing, from the outbox)."""
        for model in models:
            self.broker.publisher(
                self.topology.event_subject(self.name, model.event_type),
                title=f"{self.name}.{model.event_type}",
                description=(model.__doc__ or "").strip(),
                schema=envelope_schema(model),
            )

    # --- events in --------------------------------------------------------------------------
    def consume(
        self, source: str, stream: JStream, subject: str, handler: BatchHandler, *, workers: int = 1, **options: Any
    ) -> None:
        """Subscribe a durable consumer named ``<service>-<source>`` to ``subject``.

        ``workers`` pull loops share that ONE durable consumer: JetStream hands each message to
        one of them, so batches are fetched and handled concurrently (one transaction each) —
        while one waits for the database, another fetches or decides. Two concurrent batches
        writing one stream make the later commit fail on the stream's version; that batch is
        then retried message by message (the consumer's usual isolation), so concurrency never
        changes the outcome, only the speed."""
        name = f"{self.topology.prefix}-{self.name}-{source}".replace(".", "-")
        options.setdefault("max_deliver", self.settings.consumer_max_deliver)
        options.setdefault("backoff_seconds", self.settings.consumer_backoff_seconds)
        for _ in range(workers):
            consumer = DurableConsumer(
                name=name,
                stream=stream,
                subject=subject,
                handler=handler,
                store=self.store,
                dead_letter_subject=self.topology.dead_letter_subject(name),
                after_commit=self.wake_relay,
                outages=self.outages,
                **options,
            )
            consumer.attach(self.broker)
            self.consumers.append(consumer)

    def consume_service(self, source_service: str, handler: BatchHandler, **options: Any) -> None:
        self.consume(
            source_service,
            self.topology.service_stream(source_service),
            self.topology.service_subjects(source_service),
            handler,
            **options,
        )

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._announce_keys()
        await self.broker.connect()
        js = self.broker.connection.jetstream()
        replicas = self.settings.stream_replicas
        await until_jetstream_answers(
            lambda: ensure_streams(js, self.topology.all_streams(SERVICES), replicas=replicas), "streams")
        await until_jetstream_answers(lambda: self.vault.connect(js, replicas=replicas), "key bucket")
        # before the mirror loads any key; a database not answering yet is waited for
        for subject_id in await self.outages.outlast(lambda: erased_subjects(self.store)):
            self.vault.mark_erased(subject_id)
        self._spawn(self.vault.watch)
        await self.vault.synced()  # every key and erasure known before the first message or request
        await self.broker.start()
        self.relay = OutboxRelay(self.store, self.broker.connection)
        self._spawn(self.relay.run)
        self._spawn(self._watch_consumer_lag)
        if isinstance(self.store, PostgresEventStore):
            self._spawn(self._keep_statistics)
        for task in self.background:
            self._spawn(task)
        log.info("service started", service=self.name)

    def _announce_keys(self) -> None:
        if not self.keys.configured:
            log.warning(
                "NEPHROTRACK_API_KEYS is not set: failing closed, every HTTP request but /healthz is refused "
                "with 401. Set NEPHROTRACK_API_KEYS=role:key,... (roles staff, analyst, operator); "
                "`nephrotrack run` sets it for you.",
                service=self.name,
            )
            return
        log.info("API keys loaded", service=self.name, keys=self.keys.roles())  # fingerprints, never keys
        if self.keys.short_keys:
            log.warning("short API keys (under 16 characters): use long random keys", fingerprints=self.keys.short_keys)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.broker.stop()
        await self.outages.close()  # after the consumers, which start probe loops
        await self.store.close()

    def _spawn(self, factory: BackgroundTask) -> None:
        self._tasks.append(asyncio.create_task(_forever(factory), name=getattr(factory, "__name__", "task")))

    async def _keep_statistics(self) -> None:
        await keep_statistics(self.store.engine)  # spawned for a PostgreSQL store only

    async def _watch_consumer_lag(self) -> None:
        js = self.broker.connection.jetstream()
        while True:
            for consumer in self.consumers:
                with contextlib.suppress(Exception):
                    info = await js.consumer_info(consumer.stream.name, consumer.name)
                    metrics.CONSUMER_PENDING.labels(consumer=consumer.name).set(info.num_pending or 0)
                    metrics.CONSUMER_ACK_PENDING.labels(consumer=consumer.name).set(info.num_ack_pending or 0)
            await asyncio.sleep(5)

    async def _broker_answers(self) -> None:
        """Connected *and* JetStream answering: a connected server whose JetStream cannot serve
        (a cluster electing its meta leader) times out every stream call, which is an outage to
        wait out, not the message's failure."""
        if not self.broker.connection.is_connected:
            raise ConnectionError("not connected to the broker")
        await self.broker.connection.jetstream(timeout=BROKER_PROBE_SECONDS).account_info()

    async def _vault_answers(self) -> None:
        await self._broker_answers()
        await self.vault.synced(timeout=1.0)

    async def ready(self) -> dict[str, str]:
        problems: dict[str, str] = self.outages.problems()
        try:
            await within(2, self.store.ping())
        except Exception as exc:
            problems["store"] = repr(exc)
        try:
            if not self.broker.connection.is_connected:
                problems["broker"] = "not connected"
        except Exception as exc:
            problems["broker"] = repr(exc)
        return problems

    # --- HTTP -------------------------------------------------------------------------------
    def app(self, *routers: APIRouter, title: str, description: str = "", version: str = "1.0.0") -> FastAPI:
        """This service's FastAPI app (:func:`shared.http.build_app`)."""
        return build_app(self, *routers, title=title, description=description, version=version)

    def serve(self, app: FastAPI) -> None:
        """Run the app on the service's contract port until SIGINT/SIGTERM."""
        tune_garbage_collector(self.settings)
        serve(app, name=self.name, host=self.settings.host, port=service_port(self.name),
              log_level=self.settings.log_level)


GC_THRESHOLDS = (50_000, 20, 20)
"""Allocations between young collections, and young (then middle) collections between older ones.

CPython's default (700, 10, 10) suits scripts, not a service that allocates a few dozen objects
per message handled: the labs process ran its young collection every ~20 results and a full
one, which walks every object of FastAPI, SQLAlchemy and pydantic, every ~2,000 — a fifth of
its CPU per result (docs/labs.md#throughput). Reference counting still frees nearly everything
at once; these only pace the search for reference cycles."""


def tune_garbage_collector(settings: RuntimeSettings | None = None) -> None:
    """Freeze what start-up built (modules, the app, its settings and routes: alive for the whole
    process, so never worth walking again — a further 10 % of labs CPU per result) and pace the
    cycle collector for a service (:data:`GC_THRESHOLDS`). ``NEPHROTRACK_GC=default`` keeps
    CPython's own collector as it is (for comparison)."""
    if (settings or RuntimeSettings()).gc != "default":
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)


async def _forever(factory: BackgroundTask) -> None:
    """Run a background loop; if it crashes, log it and start it again (after a pause)."""
    while True:
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("background task crashed, restarting", task=getattr(factory, "__name__", "?"), error=repr(exc))
            await asyncio.sleep(1)


def run_service(name: str, create_app: Callable[[Service], FastAPI]) -> None:
    """Entry point of a service process (``python -m services.<name>``)."""
    try:
        service = Service(name)
    except (AuthConfigError, NatsUrlError) as exc:
        raise SystemExit(f"{name}: {exc}") from None
    service.serve(create_app(service))
