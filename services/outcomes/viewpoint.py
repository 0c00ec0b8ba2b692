"""The ``as_of`` and ``lock`` parameters every outcomes ``GET`` under ``/v1`` takes, once: a
FastAPI dependency that checks them and hands the route a :class:`Viewpoint`, whose
:meth:`~Viewpoint.open` yields the rows to answer from (services/outcomes/reading.py) — now
(constant time, as before), as a lock froze them, or replayed to a time (docs/time-travel.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import HTTPException, Query, Response

from services.outcomes.locks import is_valid_name
from services.outcomes.queries import Freshness, OutcomesQueries
from services.outcomes.reading import ProjectionView, SqlView
from services.outcomes.time_travel import LogUnavailable, TimeTravel

AS_OF_HELP = (
    "RFC 3339 time with its offset (e.g. 2026-06-30T23:59:59Z): answer from the events recorded up to then, "
    "as the system knew them (replayed from the log: slower than the live answer)"
)
LOCK_HELP = "an analysis lock's name (POST /v1/locks): the answer frozen under it, the same forever"


def parse_as_of(value: str) -> datetime:
    """An RFC 3339 time with an offset, in UTC; 422 with the reason otherwise."""
    hint = " ('+' in a URL query reads as a space: write it %2B, or use Z)" if " " in value else ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"as_of {value[:60]!r} is not an RFC 3339 time, e.g. 2026-06-30T23:59:59Z{hint}") from None
    if moment.tzinfo is None:
        raise HTTPException(422, f"as_of {value[:60]!r} has no offset: give one (Z for UTC, or e.g. +02:00), "
                                 "a naive time is ambiguous")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise HTTPException(422, f"as_of {value[:60]!r} is outside the years 1 to 9999 in UTC") from None


@dataclass(frozen=True)
class Viewpoint:
    """Where a request reads from: ``as_of`` a time, a ``lock``'s frozen rows, or (neither) now."""

    queries: OutcomesQueries
    time_travel: TimeTravel
    as_of: datetime | None = None
    lock: str | None = None

    async def live_freshness(self) -> Freshness | None:
        """The served rows' freshness read alone, for a remembered live answer
        (services/outcomes/answers.py); None where none is remembered: a lock, ``as_of``, SQLite."""
        if self.as_of is not None or self.lock is not None or self.queries.engine.dialect.name != "postgresql":
            return None
        return await self.queries.live_freshness()

    @asynccontextmanager
    async def open(self, stamp: Response | None = None) -> AsyncIterator[ProjectionView]:
        """The rows, with their freshness headers put on ``stamp`` if given. An unknown lock
        answers 404, a log that cannot be replayed 503."""
        if self.as_of is not None:
            try:
                view: ProjectionView = await self.time_travel.view(self.as_of)
            except LogUnavailable as exc:
                raise HTTPException(503, str(exc)) from None
            if stamp is not None:
                stamp.headers.update(view.freshness.headers())
            yield view
            return
        async with self.queries.snapshot() as connection:
            lock = None
            if self.lock is not None:  # a name the rules refuse (a NUL byte, say) is not looked up
                lock = await self.queries.lock(connection, self.lock) if is_valid_name(self.lock) else None
                if lock is None:
                    raise HTTPException(404, f"no analysis lock is named {self.lock[:80]!r}; GET /v1/locks lists them")
            view = SqlView(self.queries, connection, await self.queries.freshness(connection, lock),
                           lock.generation if lock else None)
            if stamp is not None:
                stamp.headers.update(view.freshness.headers())
            yield view


def viewpoints(queries: OutcomesQueries, time_travel: TimeTravel) -> Callable[..., Viewpoint]:
    """The dependency: ``as_of`` and ``lock`` checked (422 for a bad time, or both given)."""

    def viewpoint(
        as_of: Annotated[str | None, Query(description=AS_OF_HELP)] = None,
        lock: Annotated[str | None, Query(description=LOCK_HELP)] = None,
    ) -> Viewpoint:
        if as_of is not None and lock is not None:
            raise HTTPException(422, "as_of and lock exclude each other: a lock already fixes the moment answered")
        return Viewpoint(queries, time_travel, parse_as_of(as_of) if as_of is not None else None, lock)

    return viewpoint
