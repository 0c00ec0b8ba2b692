"""Durable JetStream pull consumers with an inbox: at-least-once delivery, exactly-once effect.

A :class:`DurableConsumer` fetches messages in batches through FastStream and handles a whole
batch in one database transaction, recording each message id in the inbox table in that same
transaction — a message seen before is skipped, so redelivery never repeats an effect. If the
batch fails, it is retried message by message so one bad message cannot hold up the others.
A message whose handling fails *for itself* is redelivered with back-off (``nak(delay)``); after
``max_deliver`` tries it is published to the consumer's dead-letter subject with the error in
its headers, and acknowledged so it no longer blocks the stream. A failure that is an outage of
what the handler depends on (database, broker, key vault: :mod:`shared.outages`) is no fault of
the message's and spends none of its tries: the consumer holds its batch (telling JetStream it is
still at work on it), pulls nothing more until the dependency answers, and then handles the same
batch again — however long the outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import structlog
from faststream import Context
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from shared import metrics
from shared.events import Envelope
from shared.outages import Dependency, Outages
from shared.schema import inbox
from shared.store import JSON_CODEC, Codec, EventStore, UnitOfWork

log = structlog.get_logger(__name__)


def _fetch_timeouts_as_nats_errors() -> None:
    """nats-py 2.16's ``PullSubscription.fetch`` raises the builtin ``TimeoutError`` when its
    deadline runs out between its two pull requests, but FastStream's batch pull loop only
    catches ``nats.errors.TimeoutError``: the builtin one kills the loop, which drops the partial
    batch it had fetched — left unacknowledged until ``ack_wait`` (60 s) redelivers it. Re-raise
    it as the nats subclass (still a ``TimeoutError`` for every other caller)."""
    original = JetStreamContext.PullSubscription.fetch
    if getattr(original, "nephrotrack_shim", False):
        return

    async def fetch(self: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any) -> list[Msg]:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    fetch.nephrotrack_shim = True  # type: ignore[attr-defined]
    JetStreamContext.PullSubscription.fetch = fetch  # type: ignore[method-assign]


_fetch_timeouts_as_nats_errors()


def _queued_messages_without_a_task() -> None:
    """nats-py 2.16's ``Subscription.next_msg`` creates two asyncio tasks (its own and
    ``wait_for``'s, on Python 3.11) and a uuid4 for every message, even when the message is
    already waiting in the subscription's queue — which is where a batch ``fetch`` finds almost
    all of its 500. In the labs profile that was ~20 µs per message, more than parsing the
    result. Take a queued message directly (the same bookkeeping as ``next_msg``); wait the
    library's way only when the queue is empty."""
    original = Subscription.next_msg
    if getattr(original, "nephrotrack_shim", False):
        return

    async def next_msg(self: Subscription, timeout: float | None = 1.0) -> Msg:
        if self._cb is None and not self._conn.is_closed:
            try:
                msg = self._pending_queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            else:
                self._pending_size -= len(msg.data)
                self._pending_queue.task_done()
                return msg
        return await original(self, timeout)

    next_msg.nephrotrack_shim = True  # type: ignore[attr-defined]
    Subscription.next_msg = next_msg  # type: ignore[method-assign]


_queued_messages_without_a_task()


@dataclass(frozen=True)
class InboundMessage:
    subject: str
    data: bytes
    headers: dict[str, str]
    message_id: str
    delivery: int
    stream: str
    stream_sequence: int
    codec: Codec = field(default=JSON_CODEC, compare=False, repr=False)
    """Opens the envelope: the consuming store's codec, which unseals patients' payloads."""

    @classmethod
    def from_nats(cls, msg: Msg, codec: Codec = JSON_CODEC) -> InboundMessage:
        headers = dict(msg.headers or {})
        stream_seq = msg.metadata.sequence.stream
        return cls(
            subject=msg.subject,
            data=msg.data,
            headers=headers,
            # Without a Nats-Msg-Id the stream sequence is the only stable identity.
            message_id=inbox_id(headers.get("Nats-Msg-Id")) or f"seq:{stream_seq}",
            delivery=msg.metadata.num_delivered,
            stream=msg.metadata.stream,
            stream_sequence=stream_seq,
            codec=codec,
        )

    def envelope(self) -> Envelope:
        return self.codec.open(self.data)


INBOX_ID_LENGTH: int = inbox.c.message_id.type.length  # type: ignore[attr-defined]


def inbox_id(header: str | None) -> str | None:
    """The inbox key of a ``Nats-Msg-Id``: itself, or ``sha256:<hex>`` of it when it is longer than
    the inbox column holds — one such id failed its whole batch's inbox insert on PostgreSQL (and
    sent every batch-mate through one-by-one retries); its digest is as stable, so dedupe holds."""
    if header is None or len(header) <= INBOX_ID_LENGTH:
        return header
    return "sha256:" + hashlib.sha256(header.encode("utf-8", "surrogatepass")).hexdigest()


async def _undecoded(message: Any) -> None:
    """Skip FastStream's body decoding: handlers read the raw bytes they need themselves."""
    return None


BatchHandler = Callable[[UnitOfWork, list[InboundMessage]], Awaitable[None]]
MessageHandler = Callable[[UnitOfWork, InboundMessage], Awaitable[None]]


def one_by_one(handler: MessageHandler) -> BatchHandler:
    """Adapt a per-message handler; it still runs inside the batch's single transaction."""

    async def handle(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        for message in messages:
            await handler(uow, message)

    return handle


def pause_after(handled: int, batch_size: int, handling_seconds: float, max_pause_seconds: float) -> float:
    """How long to wait before the next fetch. A full batch means a backlog: none. Otherwise as
    long as the batch took, up to ``max_pause_seconds``: what arrives meanwhile comes as one
    batch. A handler that rewrites everything a batch touches (the outcomes projection rewrites
    each touched patient with their whole history) then does that once per twice as many
    messages, where back-to-back small batches would keep it rewriting as fast as it can — on
    the cores the producers need. A quick batch (a quiet stream) waits next to nothing."""
    if handled >= batch_size or max_pause_seconds <= 0:
        return 0.0
    return min(handling_seconds, max_pause_seconds)


def _in_progress(raw: Sequence[Msg]) -> Callable[[], Awaitable[None]]:
    """Tell JetStream the held messages are still being worked on (no redelivery after ack_wait)."""

    async def keepalive() -> None:
        for msg in raw:
            await msg.in_progress()

    return keepalive


@dataclass
class DurableConsumer:
    name: str
    stream: JStream
    subject: str
    handler: BatchHandler
    store: EventStore
    dead_letter_subject: str
    max_deliver: int = 5
    backoff_seconds: Sequence[float] = (1.0, 5.0, 15.0, 60.0)
    batch_size: int = 200
    batch_timeout: float = 0.2
    after_commit: Callable[[], None] | None = None
    outages: Outages | None = None
    """Shared with the service's other consumers and ``/readyz``; without it every failure counts."""
    max_pause_seconds: float = 0.0
    """Above zero: after a batch that was not full, wait as long as handling it took (at most
    this) before fetching again (:func:`pause_after`). For a handler whose cost is mostly per
    batch rather than per message, fewer and larger batches for a bounded delay."""
    _broker: NatsBroker | None = field(default=None, init=False, repr=False)

    def attach(self, broker: NatsBroker) -> None:
        """Declare the durable pull consumer on ``broker`` (idempotent at start)."""
        self._broker = broker

        async def on_batch(body: Any, message: NatsBatchMessage = Context("message")) -> None:
            await self.handle_batch(message.raw_message)

        broker.subscriber(
            self.subject,
            stream=self.stream,
            durable=self.name,
            pull_sub=PullSub(batch_size=self.batch_size, timeout=self.batch_timeout, batch=True),
            ack_policy=AckPolicy.MANUAL,
            decoder=_undecoded,
            config=ConsumerConfig(
                durable_name=self.name,
                deliver_policy=DeliverPolicy.ALL,
                # JetStream would stop redelivering by itself after max_deliver; we dead-letter
                # on the last try ourselves, so give it one more as a safety net.
                max_deliver=self.max_deliver + 1,
                ack_wait=60,
                max_ack_pending=10_000,
            ),
            title=self.name,
        )(on_batch)

    async def handle_batch(self, raw: Sequence[Msg]) -> None:
        messages = [InboundMessage.from_nats(m, self.store.codec) for m in raw]
        metrics.MESSAGES_CONSUMED.labels(consumer=self.name).inc(len(messages))
        started = time.perf_counter()
        try:
            await self._transact(raw, messages)
        except Exception as exc:
            log.info("batch failed, isolating messages", consumer=self.name, size=len(messages), error=repr(exc))
            for msg, message in zip(raw, messages, strict=True):
                await self._handle_alone(msg, message)
        else:
            for msg in raw:
                await msg.ack()
            metrics.MESSAGES_ACKED.labels(consumer=self.name).inc(len(raw))
        finally:
            metrics.HANDLER_SECONDS.labels(consumer=self.name).observe(time.perf_counter() - started)
        if self.after_commit:
            self.after_commit()
        pause = pause_after(len(raw), self.batch_size, time.perf_counter() - started, self.max_pause_seconds)
        if pause:
            await asyncio.sleep(pause)  # the pull loop fetches the next batch when this returns

    async def _transact(self, raw: Sequence[Msg], messages: list[InboundMessage]) -> None:
        """Handle ``messages`` in one transaction; an outage is waited out and the same messages
        handled again, so only a failure of the messages' own leaves this method."""

        async def handle() -> None:
            async with self.store.transaction() as uow:
                await self._handle_new(uow, messages)

        if self.outages is None:
            await handle()
            return

        def count(dependency: Dependency) -> None:
            metrics.CONSUMER_OUTAGE_RETRIES.labels(consumer=self.name, dependency=dependency).inc()

        await self.outages.outlast(handle, keepalive=_in_progress(raw), on_outage=count)

    async def _handle_new(self, uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        fresh_ids = set(await uow.claim_messages(self.name, [m.message_id for m in messages]))
        fresh: list[InboundMessage] = []
        for message in messages:
            if message.message_id in fresh_ids:
                fresh.append(message)
                fresh_ids.discard(message.message_id)  # a second copy in the same batch is a duplicate too
            else:
                metrics.MESSAGES_DUPLICATE.labels(consumer=self.name).inc()
        if fresh:
            await self.handler(uow, fresh)

    async def _handle_alone(self, msg: Msg, message: InboundMessage) -> None:
        try:
            await self._transact([msg], [message])
        except Exception as exc:
            await self._retry_or_dead_letter(msg, message, exc)
        else:
            await msg.ack()
            metrics.MESSAGES_ACKED.labels(consumer=self.name).inc()

    async def _retry_or_dead_letter(self, msg: Msg, message: InboundMessage, exc: Exception) -> None:
        if message.delivery < self.max_deliver:
            delay = self.backoff_seconds[min(message.delivery - 1, len(self.backoff_seconds) - 1)]
            log.warning(
                "handler failed, will redeliver",
                consumer=self.name,
                message_id=message.message_id,
                delivery=message.delivery,
                retry_in=delay,
                error=repr(exc),
            )
            metrics.MESSAGES_REDELIVERED.labels(consumer=self.name).inc()
            await msg.nak(delay=delay)
            return
        assert self._broker is not None
        headers = {
            **message.headers,
            "Nats-Msg-Id": f"dlq:{self.name}:{message.message_id}",
            "Nephrotrack-Error": repr(exc)[:1000],
            "Nephrotrack-Original-Subject": message.subject,
            "Nephrotrack-Deliveries": str(message.delivery),
        }
        js = self._broker.connection.jetstream()
        await js.publish(self.dead_letter_subject, message.data, headers=headers)
        await msg.ack()
        metrics.MESSAGES_DEAD_LETTERED.labels(consumer=self.name).inc()
        log.error("message dead-lettered", consumer=self.name, message_id=message.message_id, error=repr(exc))
