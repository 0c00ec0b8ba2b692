"""A loop that sleeps until it is woken or its timer runs out stops when it is cancelled — also
when the cancellation comes just as it is woken.

Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives while the awaited work
finishes: the relay (woken after every commit) or the key purge job (woken by a failed purge)
then ran on, and ``Service.stop``, waiting for them, waited for ever. That is the likely end of a
CI run's erasure test, which hung until its timeout while stopping its services. Every wait with
a time limit goes through shared.tasks (``asyncio.timeout``) now; nats-py still waits for every
request that way, so stopping cancels again a task that swallowed its cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats
import pytest

from services.enrollment.key_purge import KeyPurger
from shared.broker import Topology
from shared.keys import KeyVault, bucket_name
from shared.relay import OutboxRelay
from shared.store import EventStore
from shared.tasks import cancel_and_wait, within, woken


async def stops_when_cancelled_as_woken(run: Callable[[], Awaitable[None]], wake: Callable[[], None]) -> list[bool]:
    """For a cancellation in the same loop iteration as the wake-up and one or two later: did
    the loop stop?"""
    stopped = []
    for ticks in range(3):
        task = asyncio.create_task(run())
        await asyncio.sleep(0.2)  # idle: waiting for its wake-up
        wake()
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        stopped.append(bool(done))
        if not done:  # the defect: stop the loop that ran on
            task.cancel()
            await asyncio.wait([task], timeout=2)
    return stopped


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_the_relay_stops_when_cancelled_as_it_is_woken(store: EventStore, nats_client: nats.NATS) -> None:
    relay = OutboxRelay(store, nats_client, idle_seconds=30)
    assert await stops_when_cancelled_as_woken(relay.run, relay.notify) == [True, True, True]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_the_key_purge_job_stops_when_cancelled_as_it_is_woken(store: EventStore, prefix: str) -> None:
    purger = KeyPurger(store, KeyVault(bucket_name(Topology(prefix))), interval=30)
    assert await stops_when_cancelled_as_woken(purger.run, purger._wake.set) == [True, True, True]


async def test_within_and_woken_time_out_and_answer() -> None:
    event = asyncio.Event()
    assert await woken(event, 0.01) is False
    event.set()
    assert await woken(event, 0.01) is True
    assert await within(1, asyncio.sleep(0, "done")) == "done"
    with pytest.raises(TimeoutError):
        await within(0.01, asyncio.Event().wait())


async def test_stopping_ends_a_task_that_swallowed_its_cancellation_in_asyncio_wait_for() -> None:
    """A loop asking JetStream something every few seconds (the consumer-lag watcher), cancelled
    just as an answer arrives: Python 3.11's ``wait_for`` returns the answer instead of raising,
    and the one cancellation ``Service.stop`` sent left it waiting for ever (a service whose
    HTTP port was taken never exited)."""
    answers: list[asyncio.Future[str]] = []

    async def ask_jetstream_again_and_again() -> None:
        while True:
            answers.append(asyncio.get_running_loop().create_future())
            await asyncio.wait_for(answers[-1], 30)
            await asyncio.sleep(5)

    task = asyncio.create_task(ask_jetstream_again_and_again())
    await asyncio.sleep(0.05)  # waiting for its first answer
    answers[-1].set_result("consumer info")  # the answer arrives ...
    async with asyncio.timeout(10):
        await cancel_and_wait([task])  # ... as the service stops
    assert task.done() and len(answers) == 1
