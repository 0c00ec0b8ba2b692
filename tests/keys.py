"""A test's view of a stack's patient data keys, to read what the services sealed
(shared/sealing.py) the way a service of that stack would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats

from shared.broker import Topology
from shared.keys import KeyVault, bucket_name
from shared.sealing import SealingCodec
from tests.conftest import NATS_URL


@contextlib.asynccontextmanager
async def stack_codec(
    prefix: str, *, nats_url: str = NATS_URL, delete_bucket: bool = True
) -> AsyncIterator[SealingCodec]:
    """The codec of the stack with this subject prefix (on the machine's NATS unless told which):
    its key bucket, mirrored while open. Deletes the bucket on exit unless told not to (a stack
    other tests go on using)."""
    client = await nats.connect(nats_url)
    vault = KeyVault(bucket_name(Topology(prefix)))
    watch: asyncio.Task[None] | None = None
    try:
        await vault.connect(client.jetstream())
        watch = asyncio.create_task(vault.watch())
        await vault.synced()
        yield SealingCodec(vault)
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if delete_bucket:
            with contextlib.suppress(Exception):
                await client.jetstream().delete_stream(vault.stream)
        await client.drain()
