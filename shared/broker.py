"""Broker wiring: subject and stream names, idempotent stream declaration, the FastStream broker.

Subjects (documented in docs/events.md and each service's AsyncAPI document):
- ``<prefix>.<service>.<EventType>``: a service's published events, in stream ``<PREFIX>_<SERVICE>``;
- ``labs.results`` / ``labs.rejected``: the contract's lab subjects, streams ``LABS_RESULTS`` and
  ``LABS_REJECTED``;
- ``<prefix>.dlq.<consumer>``: dead letters of a durable consumer, stream ``<PREFIX>_DLQ``.

The prefix (``NEPHROTRACK_SUBJECT_PREFIX``, default ``nephrotrack``) lets test runs and side-by-side
stacks share one NATS server without seeing each other's events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import structlog
from faststream.nats import JStream, NatsBroker, NatsToken, NatsUserPassword
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError, ServerError, ServiceUnavailableError

from shared.settings import RuntimeSettings

log = structlog.get_logger(__name__)

LAB_RESULTS_SUBJECT = "labs.results"
LAB_REJECTED_SUBJECT = "labs.rejected"
DUPLICATE_WINDOW_SECONDS = 600.0


def subject_prefix() -> str:
    return RuntimeSettings().subject_prefix


@dataclass(frozen=True)
class Topology:
    """Every subject and stream name of one stack, derived from its prefix."""

    prefix: str

    @classmethod
    def from_env(cls) -> Topology:
        return cls(subject_prefix())

    def event_subject(self, service: str, event_type: str) -> str:
        return f"{self.prefix}.{service}.{event_type}"

    def service_subjects(self, service: str) -> str:
        return f"{self.prefix}.{service}.>"

    def service_stream(self, service: str) -> JStream:
        return JStream(name=self._stream_name(service), subjects=[self.service_subjects(service)], declare=False)

    def dead_letter_subject(self, consumer: str) -> str:
        return f"{self.prefix}.dlq.{consumer}"

    @property
    def lab_results_stream(self) -> JStream:
        return JStream(name=self._stream_name("labs_results", lab=True), subjects=[LAB_RESULTS_SUBJECT], declare=False)

    @property
    def lab_rejected_stream(self) -> JStream:
        return JStream(name=self._stream_name("labs_rejected", lab=True), subjects=[LAB_REJECTED_SUBJECT], declare=False)

    @property
    def dead_letter_stream(self) -> JStream:
        return JStream(name=self._stream_name("dlq"), subjects=[f"{self.prefix}.dlq.>"], declare=False)

    def _stream_name(self, name: str, *, lab: bool = False) -> str:
        # The lab subjects are fixed by the contract, so their streams are shared by any prefix.
        return name.upper() if lab else f"{self.prefix}_{name}".upper().replace(".", "_").replace("-", "_")

    def all_streams(self, services: tuple[str, ...]) -> list[JStream]:
        return [
            *(self.service_stream(service) for service in services),
            self.lab_results_stream,
            self.lab_rejected_stream,
            self.dead_letter_stream,
        ]


class NatsUrlError(ValueError):
    """``NATS_URL`` names no server, or its servers carry different credentials."""


@dataclass(frozen=True)
class NatsServers:
    """``NATS_URL`` taken apart: one server or several, comma-separated, and the credentials.

    The credentials are handed to the client as its own ``user``/``password`` rather than left in
    each URL: nats-py authenticates with the URL's credentials only for that URL, and a cluster
    tells its clients about the other nodes (INFO ``connect_urls``) without any — so a client
    reconnecting to a node it learnt of that way would connect anonymously and be refused.
    """

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, urls: str) -> NatsServers:
        servers: list[str] = []
        credentials: set[tuple[str | None, str | None]] = set()
        for url in (part.strip() for part in urls.split(",")):
            if not url:
                continue
            parts = urlsplit(url if "://" in url else f"nats://{url}")
            if parts.username is not None:
                password = None if parts.password is None else unquote(parts.password)
                credentials.add((unquote(parts.username), password))
            host = parts.netloc.rpartition("@")[2]
            servers.append(urlunsplit(parts._replace(netloc=host)))
        if not servers:
            raise NatsUrlError("NATS_URL names no server")
        if len(credentials) > 1:
            raise NatsUrlError("NATS_URL: its servers must carry the same credentials (or only the first one any)")
        user, password = credentials.pop() if credentials else (None, None)
        return cls(tuple(servers), user, password)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``: every server, and the credentials for all of them."""
        options: dict[str, Any] = {"servers": list(self.servers)}
        if self.user is not None and self.password is None:
            options["token"] = self.user  # nats://<token>@host, as nats-py reads a URL
        elif self.user is not None:
            options.update(user=self.user, password=self.password)
        return options

    def security(self) -> NatsUserPassword | NatsToken | None:
        """The credentials as FastStream takes them (its ``security=``)."""
        if self.user is None:
            return None
        return NatsToken(self.user) if self.password is None else NatsUserPassword(self.user, self.password)


def nats_connect_options(urls: str, **options: Any) -> dict[str, Any]:
    """``nats.connect(**nats_connect_options(NATS_URL, name=…))``: see :class:`NatsServers`."""
    return {**NatsServers.parse(urls).connect_options(), **options}


JETSTREAM_NOT_READY = (NatsTimeoutError, NoRespondersError, ServiceUnavailableError, ServerError)
"""What the JetStream API answers while it cannot serve yet: a cluster electing its meta leader
(seconds after its nodes start or one is lost), a node still recovering its store."""
T = TypeVar("T")


async def until_jetstream_answers(step: Callable[[], Awaitable[T]], what: str, *, first_pause: float = 0.5,
                                  longest_pause: float = 5.0) -> T:
    """``step()`` again, with growing pauses, for as long as JetStream is not ready: a service
    starting beside a cluster that is still electing waits for it instead of exiting."""
    pause = first_pause
    while True:
        try:
            return await step()
        except JETSTREAM_NOT_READY as error:
            log.warning("JetStream is not answering yet: trying again", step=what, error=repr(error), retry_in=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest_pause)


async def ensure_streams(js: JetStreamContext, streams: list[JStream], *, replicas: int = 1) -> None:
    """Create each stream if missing, with ``replicas`` copies (idempotent; safe when several
    services start at once); one with fewer replicas is raised to ``replicas`` (:func:`ensure_replicas`).

    Streams keep every message (limits retention, no age limit): the service streams are the
    record other services and rebuilds read, and dead letters wait for an operator.
    """
    for stream in streams:
        config = StreamConfig(
            name=stream.name,
            subjects=list(stream.subjects),
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            num_replicas=replicas,
        )
        await ensure_stream(js, config)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream of ``config`` if missing, else give it at least ``config.num_replicas``."""
    assert config.name is not None
    try:
        await ensure_replicas(js, config.name, config.num_replicas or 1)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError:  # another process created it between our check and add
            await ensure_replicas(js, config.name, config.num_replicas or 1)


async def ensure_replicas(js: JetStreamContext, name: str, replicas: int, *, attempts: int = 5) -> None:
    """Raise an existing stream to ``replicas`` copies (JetStream copies its messages to the new
    peers by RAFT while it keeps serving); never lowers them: a stream an operator scaled up
    stays so. :class:`NotFoundError` if there is no such stream.

    Every service does this at start, so several often ask at once: a request that times out or
    is refused meanwhile is answered by reading the stream again (another's update counts)."""
    for attempt in range(attempts):
        info = await js.stream_info(name)
        current = info.config.num_replicas or 1
        if current >= replicas:
            return
        if attempt == 0:
            log.warning("raising the replicas of a stream", stream=name, replicas_before=current, replicas=replicas)
        try:
            await js.update_stream(replace(info.config, num_replicas=replicas))
            return
        except (NatsTimeoutError, BadRequestError) as error:
            log.info("stream update not confirmed, reading the stream again", stream=name, error=repr(error))
            await asyncio.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"stream {name} still has fewer than {replicas} replicas after {attempts} updates")


def make_broker(url: str, *, name: str, log: bool = False) -> NatsBroker:
    """A FastStream NATS broker that reconnects forever: an outage delays, never kills, a service.
    ``url``: ``NATS_URL``, one server or several (:class:`NatsServers`); ``log``: FastStream's own
    log lines (``NEPHROTRACK_BROKER_LOG``)."""
    servers = NatsServers.parse(url)
    return NatsBroker(
        list(servers.servers),
        security=servers.security(),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        logger=logging.getLogger("faststream") if log else None,
    )
