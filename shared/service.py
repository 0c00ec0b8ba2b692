"""The service shell: what every nephrotrack service process is made of.

A :class:`Service` owns its database (event store + outbox + inbox), its broker connection, the
outbox relay and its durable consumers, and builds the FastAPI app that serves the service's
routes next to ``/healthz``, ``/readyz`` and ``/metrics``. Services differ only in their routes,
their consumers and their domain; everything operational is here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import nats.errors
import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from faststream.nats import JStream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared import metrics
from shared.asyncapi import asyncapi_document, envelope_schema
from shared.audit import audit_routes
from shared.auth import (
    AuthConfigError,
    AuthMiddleware,
    Authorizer,
    KeyRing,
    is_public_endpoint,
    leaf_routes,
    route_patterns,
)
from shared.broker import Topology, ensure_streams, make_broker
from shared.consumer import BatchHandler, DurableConsumer
from shared.database import keep_statistics
from shared.erasures import erased_subjects
from shared.errors import DomainError
from shared.events import CommandContext, DomainEvent, Envelope, registry
from shared.keys import KeyMissing, KeyVault, bucket_name
from shared.logs import configure_logging
from shared.outages import Dependency, Outages, outage_of
from shared.relay import OutboxRelay
from shared.sealing import SealingCodec
from shared.settings import SERVICES, RuntimeSettings, database_url, service_port
from shared.store import PostgresEventStore, UnitOfWork, open_store

log = structlog.get_logger(__name__)

Decide = Callable[[list[DomainEvent]], Sequence[DomainEvent]]
BackgroundTask = Callable[[], Awaitable[None]]

# Documents the bearer scheme in OpenAPI (the "Authorize" button of /docs); enforcement is
# AuthMiddleware's, before routing, so this never refuses anything itself.
_bearer_doc = Depends(HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>` (NEPHROTRACK_API_KEYS)"))


class ServiceApp(FastAPI):
    """A service's FastAPI app, with authentication as the outermost layer of the middleware stack
    (so no middleware added later — metrics, freshness stamps — runs for a refused request)."""

    service: Service

    def build_middleware_stack(self) -> Any:
        inner = super().build_middleware_stack()
        public = route_patterns(
            route for route in leaf_routes(self.routes) if is_public_endpoint(getattr(route, "endpoint", None))
        )
        return AuthMiddleware(inner, Authorizer(self.service.name, self.service.keys, public))


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
        self.broker = make_broker(self.settings.broker_url(), name=f"nephrotrack-{name}")
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

    def committed(self) -> None:
        """Wake the relay after a commit that wrote outbox rows."""
        if self.relay is not None:
            self.relay.notify()

    async def execute(
        self, stream_id: str, decide: Decide, context: CommandContext, *, retries: int = 10
    ) -> list[Envelope]:
        """Load a stream, decide on its history, append with optimistic concurrency.

        A concurrent writer makes the append fail with ConcurrencyError; the command is then
        decided again on the new history (``EventStore.transact``), so no write is ever lost and
        no rule is skipped.
        """

        async def decide_and_append(uow: UnitOfWork) -> list[Envelope]:
            history = await uow.read_stream(stream_id)
            new_events = decide([envelope.decode() for envelope in history])
            return await uow.append(stream_id, new_events, len(history), context)

        envelopes = await self.store.transact(decide_and_append, retries=retries)
        self.committed()
        return envelopes

    def publishes(self, *models: type[DomainEvent]) -> None:
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
                after_commit=self.committed,
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
        await ensure_streams(js, self.topology.all_streams(SERVICES))
        await self.vault.connect(js)
        # before the mirror loads any key; a database not answering yet is waited for
        for subject_id in await self.outages.outlast(lambda: erased_subjects(self.store)):
            self.vault.forget(subject_id)
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.broker.stop()
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
        if not self.broker.connection.is_connected:
            raise ConnectionError("not connected to the broker")

    async def _vault_answers(self) -> None:
        await self._broker_answers()
        await self.vault.synced(timeout=1.0)

    async def ready(self) -> dict[str, str]:
        problems: dict[str, str] = self.outages.problems()
        try:
            await asyncio.wait_for(self.store.ping(), 2)
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
        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        app = ServiceApp(title=title, description=description, version=version, lifespan=lifespan)
        app.service = self
        app.state.service = self
        install_error_handlers(app)
        # Innermost (added first): its refusals, raised from `receive`, must reach the exception
        # handlers directly, not through a BaseHTTPMiddleware's task group. docs/robustness.md
        app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, timeout=BODY_TIMEOUT_SECONDS)
        install_request_metrics(app)
        app.include_router(self._operational_routes())
        app.include_router(audit_routes(self), dependencies=[_bearer_doc])
        for router in routers:
            public = all(is_public_endpoint(getattr(route, "endpoint", None)) for route in router.routes)
            app.include_router(router, dependencies=[] if public else [_bearer_doc])
        return app

    def _operational_routes(self) -> APIRouter:
        router = APIRouter(tags=["operations"])

        @router.get("/healthz", summary="Process alive (open: no key needed)")
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "service": self.name}

        @router.get("/readyz", summary="Store and broker reachable (503 otherwise); role operator",
                    dependencies=[_bearer_doc])
        async def readyz() -> Response:
            problems = await self.ready()
            if problems:
                return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
            return JSONResponse({"status": "ready", "service": self.name})

        @router.get("/metrics", summary="Prometheus metrics; role operator", response_class=PlainTextResponse,
                    dependencies=[_bearer_doc])
        async def prometheus() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        @router.get("/asyncapi.json", dependencies=[_bearer_doc],
                    summary="AsyncAPI 3 document of the events this service publishes and consumes; role operator")
        async def asyncapi() -> Response:
            return JSONResponse(asyncapi_document(self.broker, service=self.name))

        return router

    def serve(self, app: FastAPI) -> None:
        """Run the app on the service's contract port until SIGINT/SIGTERM."""
        configure_logging(self.name, self.settings.log_level)
        tune_garbage_collector()
        uvicorn.run(
            app,
            host=self.settings.host,
            port=service_port(self.name),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            http=_HeadTimeoutProtocol,
            limit_concurrency=MAX_CONCURRENCY,
        )


GC_THRESHOLDS = (50_000, 20, 20)
"""Allocations between young collections, and young (then middle) collections between older ones.

CPython's default (700, 10, 10) suits scripts, not a service that allocates a few dozen objects
per message handled: the labs process ran its young collection every ~20 results and a full
one, which walks every object of FastAPI, SQLAlchemy and pydantic, every ~2,000 — a fifth of
its CPU per result (docs/labs.md#throughput). Reference counting still frees nearly everything
at once; these only pace the search for reference cycles."""


def tune_garbage_collector() -> None:
    """Freeze what start-up built (modules, the app, its settings and routes: alive for the whole
    process, so never worth walking again — a further 10 % of labs CPU per result) and pace the
    cycle collector for a service (:data:`GC_THRESHOLDS`). ``NEPHROTRACK_GC=default`` keeps
    CPython's own collector as it is (for comparison)."""
    if os.environ.get("NEPHROTRACK_GC") != "default":
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


def command_context(request: Request) -> CommandContext:
    """Who is acting (``<role>:<key fingerprint>``, set by shared.auth) and the caller's correlation id."""
    actor = getattr(request.state, "principal", None) or "anonymous"
    raw = request.headers.get("x-correlation-id")
    try:
        return CommandContext(actor=actor, correlation_id=UUID(raw)) if raw else CommandContext(actor=actor)
    except ValueError:
        return CommandContext(actor=actor)


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal answers ``{"detail": "<specific reason>"}`` (the contract's error shape)."""

    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse({"detail": exc.reason, "code": exc.code}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation_errors(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        # Text PostgreSQL cannot hold (a NUL character in an id): the request's fault, 422.
        if getattr(exc.orig, "sqlstate", None) in ("22021", "22P05"):
            return JSONResponse({"detail": "the request holds a character no text field can store (NUL, \\u0000)"},
                                status_code=422)
        return await outage(request, exc)

    async def outage(_: Request, exc: Exception) -> JSONResponse:
        """A dependency that does not answer (database restarting or refusing connections, broker
        gone, key not loaded yet) is not the request's fault: 503 with a reason and Retry-After,
        rather than an anonymous 500. Anything else is a bug, and stays a 500."""
        dependency = outage_of(exc)
        if dependency is None:
            raise exc
        log.warning("dependency unavailable during a request", dependency=str(dependency), error=type(exc).__name__)
        return JSONResponse({"detail": f"the service's {_DEPENDENCY_NAMES[dependency]} is temporarily unavailable; "
                                       "retry shortly"}, status_code=503, headers={"Retry-After": "1"})

    for error_type in (OSError, KeyMissing, nats.errors.Error):
        app.add_exception_handler(error_type, outage)


_DEPENDENCY_NAMES = {Dependency.STORE: "database", Dependency.BROKER: "broker", Dependency.KEY_VAULT: "key vault"}


def describe_validation_errors(errors: Sequence[Any]) -> str:
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body",))
        message = str(error.get("msg", "invalid"))
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"


def install_request_metrics(app: FastAPI) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")  # the template, never a subject id
        metrics.HTTP_REQUESTS.labels(
            route=template, method=request.method, status=f"{response.status_code // 100}xx"
        ).observe(time.perf_counter() - started)
        return response



# --- bounds on what a client can make a service hold (docs/robustness.md) ---------------------

MAX_BODY_BYTES = int(os.environ.get("NEPHROTRACK_MAX_BODY_BYTES") or 2 * 1024 * 1024)
"""Largest request body any service reads (413 beyond); labs' FHIR (1 MiB) and JSON (64 KiB)
endpoints refuse less, with their own reasons, before this."""
BODY_TIMEOUT_SECONDS = float(os.environ.get("NEPHROTRACK_BODY_TIMEOUT_SECONDS") or 30)
"""A request body must arrive within this (408 otherwise): a client sending 1 byte a second
does not hold a request open for hours."""
HEAD_TIMEOUT_SECONDS = float(os.environ.get("NEPHROTRACK_HEAD_TIMEOUT_SECONDS") or 15)
"""A connection must send a complete request line and headers within this after it opened (or
after its previous response); else it is closed (slowloris)."""
MAX_CONCURRENCY = int(os.environ.get("NEPHROTRACK_HTTP_MAX_CONCURRENCY") or 500)
"""Connections plus requests in progress per service process; uvicorn answers 503 beyond."""


class BodyLimit:
    """ASGI middleware: refuse a body over ``max_bytes`` (declared: 413 before reading; streamed:
    413 once past it) or one that does not arrive within ``timeout`` seconds (408), with the
    contract's ``{"detail": …}``. Raised as FastAPI's HTTPException from ``receive``, which
    FastAPI passes through body parsing untouched (anything else there becomes a 400)."""

    def __init__(self, app: Any, *, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps({"detail": f"request body is {int(declared)} bytes; the limit is {self.max_bytes}"})
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        received = 0
        deadline = time.monotonic() + self.timeout

        async def limited_receive() -> Any:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body is over {self.max_bytes} bytes, the limit",
                                        headers={"Connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


class _HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for each request's line and headers."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self.transport.close)


def run_service(name: str, create_app: Callable[[Service], FastAPI]) -> None:
    """Entry point of a service process (``python -m services.<name>``)."""
    try:
        service = Service(name)
    except AuthConfigError as exc:
        raise SystemExit(f"{name}: {exc}") from None
    service.serve(create_app(service))
