"""The HTTP side of every service: the app around its routes, the errors it answers, the limits it
keeps. Each service's routes are its own (its ``api.py``); what every service answers the same way —
``/healthz``, ``/readyz``, ``/metrics``, ``/asyncapi.json``, authentication, the contract's
``{"detail": …}`` refusals, 503 for an outage, body and header limits — is here, once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from uuid import UUID

import nats.errors
import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared import metrics
from shared.asyncapi import asyncapi_document
from shared.audit import audit_routes
from shared.auth import AuthMiddleware, Authorizer, is_public_endpoint, leaf_routes, route_patterns
from shared.errors import DomainError
from shared.events import CommandContext
from shared.keys import KeyMissing
from shared.logs import configure_logging
from shared.outages import Dependency, outage_of
from shared.tasks import within

if TYPE_CHECKING:
    from shared.service import Service

log = structlog.get_logger(__name__)

# Documents the bearer scheme in OpenAPI (the "Authorize" button of /docs); enforcement is
# AuthMiddleware's, before routing, so this never refuses anything itself.
BEARER_DOC = Depends(HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>` (NEPHROTRACK_API_KEYS)"))


class HttpSettings(BaseSettings):
    """Bounds on what a client can make a service hold (docs/robustness.md, "Limits")."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    max_body_bytes: int = Field(default=2 * 1024 * 1024, gt=0, alias="NEPHROTRACK_MAX_BODY_BYTES")
    """Largest request body any service reads (413 beyond); labs' FHIR (1 MiB) and JSON (64 KiB)
    endpoints refuse less, with their own reasons, before this."""
    body_timeout_seconds: float = Field(default=30.0, gt=0, alias="NEPHROTRACK_BODY_TIMEOUT_SECONDS")
    """A request body must arrive within this (408 otherwise): a client sending 1 byte a second
    does not hold a request open for hours."""
    head_timeout_seconds: float = Field(default=15.0, gt=0, alias="NEPHROTRACK_HEAD_TIMEOUT_SECONDS")
    """A connection must send a complete request line and headers within this after it opened (or
    after its previous response); else it is closed (slowloris)."""
    max_concurrency: int = Field(default=500, gt=0, alias="NEPHROTRACK_HTTP_MAX_CONCURRENCY")
    """Connections plus requests in progress per service process; uvicorn answers 503 beyond."""


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


def build_app(
    service: Service, *routers: APIRouter, title: str, description: str = "", version: str = "1.0.0",
    settings: HttpSettings | None = None,
) -> FastAPI:
    """The service's FastAPI app: its routers next to the operational ones, authentication
    outermost, the body limits innermost; the service starts and stops with the app."""
    settings = settings or HttpSettings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = ServiceApp(title=title, description=description, version=version, lifespan=lifespan)
    app.service = service
    app.state.service = service
    install_error_handlers(app)
    # Innermost (added first): its refusals, raised from `receive`, must reach the exception
    # handlers directly, not through a BaseHTTPMiddleware's task group. docs/robustness.md
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout_seconds)
    install_request_metrics(app)
    app.include_router(_operational_routes(service))
    app.include_router(audit_routes(service), dependencies=[BEARER_DOC])
    for router in routers:
        public = all(is_public_endpoint(getattr(route, "endpoint", None)) for route in router.routes)
        app.include_router(router, dependencies=[] if public else [BEARER_DOC])
    return app


def _operational_routes(service: Service) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Process alive (open: no key needed)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service.name}

    @router.get("/readyz", summary="Store and broker reachable (503 otherwise); role operator",
                dependencies=[BEARER_DOC])
    async def readyz() -> Response:
        problems = await service.ready()
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready", "service": service.name})

    @router.get("/metrics", summary="Prometheus metrics; role operator", response_class=PlainTextResponse,
                dependencies=[BEARER_DOC])
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/asyncapi.json", dependencies=[BEARER_DOC],
                summary="AsyncAPI 3 document of the events this service publishes and consumes; role operator")
    async def asyncapi() -> Response:
        return JSONResponse(asyncapi_document(service.broker, service=service.name))

    return router


def serve(app: FastAPI, *, name: str, host: str, port: int, log_level: str, settings: HttpSettings | None = None) -> None:
    """Run ``app`` with uvicorn on ``host:port`` until SIGINT/SIGTERM, with the limits of ``settings``."""
    settings = settings or HttpSettings()
    configure_logging(name, log_level)
    protocol = type("HeadTimeoutProtocol", (_HeadTimeoutProtocol,), {"head_timeout": settings.head_timeout_seconds})
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        http=protocol,
        limit_concurrency=settings.max_concurrency,
    )


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
                message = await within(max(deadline - time.monotonic(), 0.001), receive())
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

    head_timeout: float = 15.0
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
        self._head_timer = self.loop.call_later(self.head_timeout, self.transport.close)
