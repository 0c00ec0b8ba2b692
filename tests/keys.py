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
async def stack_codec(prefix: str) -> AsyncIterator[SealingCodec]:
    """The codec of the stack with this subject prefix: its key bucket, mirrored while open.
    Deletes the bucket on exit (the stack's streams are the caller's to delete)."""
    client = await nats.connect(NATS_URL)
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
        with contextlib.suppress(Exception):
            await client.jetstream().delete_stream(vault.stream)
        await client.drain()
