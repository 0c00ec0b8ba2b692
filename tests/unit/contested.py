"""A concurrent writer that gets there first, for the handler tests on the in-memory store.

The in-memory store runs one unit of work at a time, so two use cases never really interleave
there. :func:`contested` makes them: the work's first append(s) lose, as they would to a writer
that committed between the work's read and its append — the competitor (if any) is started then
and commits before ``store.transact`` runs the work again, on the new history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from shared.events import CommandContext, DomainEvent, Envelope
from shared.store import ConcurrencyError, EventStore, UnitOfWork

T = TypeVar("T")


class LosingUnitOfWork:
    """A unit of work whose first non-empty append raises ConcurrencyError (after starting the
    competitor); everything else is the real unit of work's."""

    def __init__(self, uow: UnitOfWork, lose: Callable[[], None]) -> None:
        self._uow = uow
        self._lose = lose

    def __getattr__(self, name: str) -> Any:
        return getattr(self._uow, name)

    async def append(
        self, stream_id: str, new_events: Sequence[DomainEvent], expected_version: int,
        context: CommandContext | None = None,
    ) -> list[Envelope]:
        if new_events:
            self._lose()
            raise ConcurrencyError(stream_id, expected_version, expected_version + 1)
        return await self._uow.append(stream_id, new_events, expected_version, context)


def contested(
    store: EventStore,
    work: Callable[[UnitOfWork], Awaitable[T]],
    competitor: Callable[[UnitOfWork], Awaitable[Any]] | None = None,
    *,
    lost: int = 1,
) -> Callable[[UnitOfWork], Awaitable[T]]:
    """``work`` whose first ``lost`` runs lose their append; ``competitor`` (a use case bound to
    its command) commits after the first loss, before the next run."""
    runs = 0
    started: list[asyncio.Task[Any]] = []

    def lose() -> None:
        if competitor is not None and not started:
            started.append(asyncio.create_task(store.transact(competitor)))

    async def run(uow: UnitOfWork) -> T:
        nonlocal runs
        runs += 1
        if runs <= lost:
            return await work(LosingUnitOfWork(uow, lose))  # type: ignore[arg-type]
        return await work(uow)

    return run
