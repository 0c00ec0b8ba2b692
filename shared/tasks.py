"""Stopping and waiting without swallowing a cancellation.

The usual ``task.cancel()`` then ``with suppress(CancelledError): await task`` hides a second
cancellation: if the code doing the stopping is itself cancelled while it waits (a shutdown
deadline, a test's timeout), the suppress eats that CancelledError too and the stopper goes on
as if nothing happened — a cancelled service start kept running and waited for ever on a
database that had been dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


CANCEL_AGAIN_AFTER_SECONDS = 2.0
"""How long a cancelled task may take to finish (its ``finally`` clean-up) before it is cancelled
again: see :func:`cancel_and_wait`."""


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None]) -> None:
    """Cancel ``tasks`` and wait until each has finished; their own outcome (cancelled, crashed)
    is dropped, but a cancellation of the caller still propagates.

    A task still running :data:`CANCEL_AGAIN_AFTER_SECONDS` later is cancelled again: it may
    have swallowed the cancellation. Python 3.11's ``asyncio.wait_for`` does when the awaited
    work finishes in the same moment, and nats-py awaits every request that way — a service
    stopping just as its consumer-lag watcher got an answer from JetStream waited for ever."""
    pending = {task for task in tasks if task is not None}
    while pending:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_AFTER_SECONDS)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved, so that asyncio does not report it as never retrieved


async def within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """``await awaitable``, raising ``TimeoutError`` after ``seconds`` — ``asyncio.wait_for``
    without its Python 3.11 flaw: a cancellation that arrives while the awaited work finishes
    (an event set a moment before a service stops) is swallowed there, and a loop waiting on
    that event runs on for ever. ``asyncio.timeout`` tells its own cancellation from the caller's."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def woken(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; whether it was set (a loop's wake-up or its timer)."""
    try:
        await within(seconds, event.wait())
    except TimeoutError:
        return False
    return True
