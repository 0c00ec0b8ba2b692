"""Reading a stream for the rebuild: an ephemeral pull consumer (no acks, no durable state on
the server, memory storage), from a start sequence, a batch at a time.

Why not nats-py's ``PullSubscription.fetch``: it waits for each message separately (an asyncio
timer per message: profiled at more than the whole decoding and projecting cost). Here pull
requests go out through a plain subscription with up to two requests outstanding, which costs
one wake-up per batch. docs/performance.md has the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DEFAULT_PREFIX, AckPolicy, ConsumerConfig, DeliverPolicy

from services.outcomes.rebuild.lease import RebuildError
from shared.tasks import woken

FETCH_BATCH = 2_000
FETCH_TIMEOUT_SECONDS = 10.0


async def stream_heads(js: JetStreamContext, streams: Mapping[str, str]) -> dict[str, int]:
    """Each stream's last sequence now (0 for a stream nothing was ever published to)."""
    heads = {}
    for stream in streams.values():
        try:
            heads[stream] = (await js.stream_info(stream)).state.last_seq
        except nats.js.errors.NotFoundError:
            heads[stream] = 0  # nothing was ever published by that service
    return heads


class StreamReader:
    """Reads one stream from ``start`` with an ephemeral pull consumer, a batch at a time.

    Pull requests (``CONSUMER.MSG.NEXT``) go out on the JetStream API with a plain subscription
    as their reply inbox; its callback only appends, so a batch costs one wake-up instead of
    one asyncio timer per message. Up to two requests are outstanding, so the server sends the
    next batch while this one is applied; never more, so at most two batches are held."""

    def __init__(self, nc: NATS, stream: str, start: int, batch: int, *, api_prefix: str = DEFAULT_PREFIX) -> None:
        self.nc = nc
        self.js = nc.jetstream(prefix=api_prefix)
        self.api_prefix = api_prefix
        self.stream = stream
        self.start = start
        self.batch = batch
        self.buffer: list[Msg] = []
        self.arrived = asyncio.Event()
        self.requested = 0  # messages asked for, in total
        self.taken = 0  # messages handed out, in total
        self.consumer: str | None = None
        self.subscription: Any = None

    async def __aenter__(self) -> StreamReader:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.start,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        self.consumer = (await self.js.add_consumer(self.stream, config)).name
        self.inbox = self.nc.new_inbox()
        self.subscription = await self.nc.subscribe(self.inbox, cb=self._received)
        self.next_subject = f"{self.api_prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.subscription.unsubscribe()
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(self.stream, self.consumer)

    async def exhausted(self) -> bool:
        """Nothing is left to deliver: the stream's head may still be ahead of what was read,
        when the messages up to it were deleted (labs purges an erased patient's inbound
        messages, and JetStream keeps the last sequence number of a deleted tail)."""
        info = await self.js.consumer_info(self.stream, self.consumer)
        return not self.buffer and info.num_pending == 0

    async def _received(self, msg: Msg) -> None:
        if not msg.reply:
            # A status message (404/408: a request ended unfilled; 409: refused): count what
            # was asked for as answered, so the next call asks again.
            self.requested = self.taken + len(self.buffer)
        else:
            self.buffer.append(msg)
        self.arrived.set()

    async def _request(self, remaining: int) -> None:
        """Keep up to two batches asked for, never more than ``remaining`` (an upper bound of
        the messages left up to the head: sequences may have gaps)."""
        while True:
            outstanding = self.requested - self.taken
            size = min(self.batch, remaining - outstanding)
            if outstanding >= 2 * self.batch or size <= 0:
                return
            request = {"batch": size, "expires": int(FETCH_TIMEOUT_SECONDS * 1e9)}
            await self.nc.publish(self.next_subject, json.dumps(request).encode(), reply=self.inbox)
            self.requested += size

    async def next_batch(self, remaining: int) -> list[Msg] | None:
        """The messages that have arrived (waiting for at least one), or None when nothing
        came within ``FETCH_TIMEOUT_SECONDS``."""
        deadline = time.monotonic() + FETCH_TIMEOUT_SECONDS
        while not self.buffer:
            self.arrived.clear()  # before asking: a status answer arriving meanwhile wakes the wait
            await self._request(remaining)
            if self.buffer:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await woken(self.arrived, left)
        batch, self.buffer = self.buffer, []
        self.taken += len(batch)
        await self._request(max(remaining - len(batch), 0))
        return batch


class StreamStalled(RebuildError):
    """A stream stopped delivering before its head: the broker is down or overloaded."""


async def read_up_to(
    nc: NATS, stream: str, after: int, head: int, batch: int
) -> AsyncIterator[list[tuple[int, Msg]]]:
    """The messages of ``stream`` after sequence ``after`` up to ``head``, a batch at a time, each
    with its sequence (what a rebuild and an ``as_of`` replay both read). A tail deleted up to the
    head (an erasure's purge) ends it early; silence before the head raises StreamStalled."""
    if head <= after:
        return
    async with StreamReader(nc, stream, after + 1, batch) as reader:
        while after < head:
            messages = await reader.next_batch(head - after)
            if messages is None:
                if await reader.exhausted():
                    return
                raise StreamStalled(
                    f"stream {stream} delivered nothing after sequence {after} within "
                    f"{FETCH_TIMEOUT_SECONDS:.0f} s although its head was {head}"
                )
            numbered = [(stream_sequence(message), message) for message in messages]
            after = max(after, *(sequence for sequence, _ in numbered))
            yield [(sequence, message) for sequence, message in numbered if sequence <= head]


def stream_sequence(message: Msg) -> int:
    """The stream sequence from the reply subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.
    <stream seq>.…`` (nats-py's ``metadata`` parses every field and builds three objects)."""
    tokens = message.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5])
    return message.metadata.sequence.stream
