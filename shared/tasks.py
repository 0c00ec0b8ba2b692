"""Stopping background tasks without swallowing the stopper's own cancellation.

The usual ``task.cancel()`` then ``with suppress(CancelledError): await task`` hides a second
cancellation: if the code doing the stopping is itself cancelled while it waits (a shutdown
deadline, a test's timeout), the suppress eats that CancelledError too and the stopper goes on
as if nothing happened — a cancelled service start kept running and waited for ever on a
database that had been dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None]) -> None:
    """Cancel ``tasks`` and wait until each has finished; their own outcome (cancelled, crashed)
    is dropped, but a cancellation of the caller still propagates."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
