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

import logging
import os
from dataclasses import dataclass

from faststream.nats import JStream, NatsBroker
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

LAB_RESULTS_SUBJECT = "labs.results"
LAB_REJECTED_SUBJECT = "labs.rejected"
DUPLICATE_WINDOW_SECONDS = 600.0


def subject_prefix() -> str:
    return os.environ.get("NEPHROTRACK_SUBJECT_PREFIX", "nephrotrack")


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


async def ensure_streams(js: JetStreamContext, streams: list[JStream]) -> None:
    """Create each stream if missing (idempotent; safe when several services start at once).

    Streams keep every message (limits retention, no age limit): the service streams are the
    record other services and rebuilds read, and dead letters wait for an operator.
    """
    for stream in streams:
        config = StreamConfig(
            name=stream.name,
            subjects=list(stream.subjects),
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await js.stream_info(stream.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:  # another process created it between our check and add
                await js.stream_info(stream.name)


def make_broker(url: str, *, name: str) -> NatsBroker:
    """A FastStream NATS broker that reconnects forever: an outage delays, never kills, a service."""
    return NatsBroker(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        logger=None if os.environ.get("NEPHROTRACK_BROKER_LOG") is None else logging.getLogger("faststream"),
    )
