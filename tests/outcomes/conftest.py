"""Fixtures for the outcomes adapter tests: a migrated outcomes database on each backend and
builders of broker messages carrying the real event models."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from shared.consumer import InboundMessage
from shared.database import migrate
from shared.events import CommandContext, DomainEvent, Envelope
from shared.store import EventStore, open_store
from tests.conftest import drop_database, new_database_url


@pytest.fixture
async def outcomes_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    url = new_database_url(backend, tmp_path, "outcomes")
    await asyncio.to_thread(migrate, "outcomes", url)
    yield url
    await drop_database(url)


@pytest.fixture
async def outcomes_store(outcomes_url: str) -> AsyncIterator[EventStore]:
    store = open_store(outcomes_url)
    yield store
    await store.close()


class Feed:
    """Wraps events in envelopes as their services would, and numbers them per stream as
    JetStream would (``stream_version`` per aggregate stream, ``sequence`` per broker stream)."""

    STREAMS = {"enrollment": "T_ENROLLMENT", "pulse": "T_PULSE", "cells": "T_CELLS", "labs": "T_LABS"}

    def __init__(self, streams: Mapping[str, str] | None = None) -> None:
        self.streams = dict(streams or self.STREAMS)
        self.sequences = {stream: itertools.count(1) for stream in self.streams.values()}
        self.versions: dict[str, int] = {}

    def envelope(self, event: DomainEvent, stream_id: str | None = None, version: int | None = None) -> Envelope:
        stream_id = stream_id or f"{type(event).__name__}-{getattr(event, 'subject_id', '')}"
        if version is None:
            version = self.versions[stream_id] = self.versions.get(stream_id, 0) + 1
        return Envelope.wrap(event, stream_id=stream_id, stream_version=version, context=CommandContext())

    def message(self, source: str, envelope: Envelope) -> InboundMessage:
        stream = self.streams[source]
        return InboundMessage(
            subject=f"t.{source}.{envelope.event_type}", data=envelope.model_dump_json().encode(), headers={},
            message_id=str(envelope.event_id), delivery=1, stream=stream, stream_sequence=next(self.sequences[stream]),
        )

    def messages(self, source: str, *events: DomainEvent) -> list[InboundMessage]:
        return [self.message(source, self.envelope(e)) for e in events]


@pytest.fixture
def feed() -> Feed:
    return Feed()
